"""The training loop shared by the target builder and every unlearning method.

A run is a *plan* fixed up front by its seed: a list of epochs, each a list of optimizer steps,
each a list of micro-batches (gradient accumulation). Because the plan is data, the learning-rate
schedule knows its length and a resumed run sees exactly the batches an uninterrupted one would.
Epochs belong to *stages*; a new stage starts with fresh optimizer state and its own schedule
segment (SUGD unlearns chunk after chunk this way; everything else has one stage per phase).

Checkpoints (accelerate ``save_state``: weights, optimizer, scheduler, RNG, plus the progress
record) are taken at epoch boundaries in a staging directory, so rerunning the same job
continues where it stopped. A checkpoint is written beside the previous one and swapped in by
renames, so a process killed at any instant leaves one complete, self-consistent checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from safetensors import SafetensorError
from tqdm.auto import tqdm

from .accel import whole_state_dict, zero3
from .io import reset_staging, write_json, writing
from .settings import shown

CHECKPOINT_MINUTES_VARIABLE = "UNLEARN_CHECKPOINT_MINUTES"
CHECKPOINT_SHARE = 0.05  # at most this share of a run's time goes to checkpoints, by default


def checkpoint_minutes() -> float:
    """Minutes between checkpoints (taken at the next epoch boundary): at least 2 and long
    enough that writing them takes at most ``CHECKPOINT_SHARE`` of the run, or exactly what
    the environment variable ``UNLEARN_CHECKPOINT_MINUTES`` says (0: every epoch)."""
    text = os.environ.get(CHECKPOINT_MINUTES_VARIABLE, "2")
    try:
        minutes = float(text)
    except ValueError:
        minutes = math.nan
    if not minutes >= 0 or math.isinf(minutes):
        raise ValueError(f"{CHECKPOINT_MINUTES_VARIABLE}={shown(text)}: expected a number of "
                         f"minutes, at least 0 (e.g. 2); set it so or unset it")
    return minutes


SCHEDULES = ("linear", "cosine", "constant")  # the learning rate's shape after warm-up


@dataclass
class Epoch:
    stage: int  # epochs of one stage share optimizer state and a schedule segment
    name: str  # shown on the progress bar and recorded in the history
    steps: list[list[Any]]  # optimizer steps, each a list of micro-batches


@dataclass(frozen=True)
class Segment:
    """The learning rate over one stage: linear warm-up to ``peak``, then ``shape`` decay."""

    steps: int
    peak: float
    warmup: int = 0
    shape: str = "cosine"  # cosine | linear | constant

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        if self.shape == "constant":
            return self.peak
        if self.shape == "linear":
            return self.peak * (1 - progress)
        if self.shape == "cosine":
            return self.peak * 0.5 * (1 + math.cos(math.pi * progress))
        raise ValueError(f"unknown schedule shape {self.shape!r}; use cosine, linear or constant")


def piecewise(segments: list[Segment]) -> Callable[[int], float]:
    """One LR function over the whole run, segment after segment (for ``LambdaLR`` at lr=1)."""
    def lr_at(step: int) -> float:
        for segment in segments:
            if step < segment.steps:
                return segment.lr(step)
            step -= segment.steps
        return 0.0
    return lr_at


def _checkpoints(staging: Path) -> list[Path]:
    """Where a complete checkpoint may lie, newest first (``.old`` only survives a kill
    between the two renames of a swap)."""
    return [staging / "checkpoint", staging / "checkpoint.old"]


def _latest_checkpoint(staging: Path) -> Path | None:
    """The complete checkpoint to resume from (it holds its progress record), if any."""
    return next((d for d in _checkpoints(staging) if (d / "progress.json").is_file()), None)


def resume_progress(accelerator: Accelerator, staging: Path, run_id: str) -> dict:
    """The progress record of the latest complete checkpoint when it belongs to ``run_id``;
    otherwise (other inputs or settings) the staging directory is emptied and a fresh record
    returned. In a distributed run the main process resets, the others wait."""
    latest = _latest_checkpoint(staging)
    progress = json.loads((latest / "progress.json").read_text()) if latest else {}
    accelerator.wait_for_everyone()  # all have read progress before main may reset it
    if progress.get("run_id") == run_id:
        return progress
    if accelerator.is_main_process:
        reset_staging(staging)
    accelerator.wait_for_everyone()
    return {"run_id": run_id}


def remove_checkpoints(staging: Path) -> None:
    for directory in [*_checkpoints(staging), staging / "checkpoint.new"]:
        shutil.rmtree(directory, ignore_errors=True)


def save_final(accelerator: Accelerator, prepared, model, tokenizer, staging: Path,
               record_name: str, record: dict, dtype: torch.dtype | None = None) -> None:
    """Write the finished ``model`` (unwrapped from ``prepared``; cast to ``dtype`` when given),
    its tokenizer and its record into the staging directory in place of the checkpoints. Every
    process must call this: where the weights are sharded they all take part in gathering
    them; the main process writes."""
    weights = whole_state_dict(accelerator, prepared)
    accelerator.wait_for_everyone()
    if dtype is not None and weights is None:  # training is over: out as the source came in
        model.to(dtype)
    elif dtype is not None:  # sharded: the gathered copy, not the shards still in training
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
        model.config.dtype = dtype
    if accelerator.is_main_process:
        # the checkpoints go only once the model is written: a full disk meanwhile leaves
        # the point to resume from (and the record last: without it nothing is finished)
        with writing(staging):
            model.save_pretrained(staging, state_dict=weights)
            tokenizer.save_pretrained(staging)
        remove_checkpoints(staging)
        write_json(staging / record_name, record)
    accelerator.wait_for_everyone()


def save_copy(accelerator: Accelerator, prepared, model, tokenizer, directory: Path) -> None:
    """Write ``model`` as it is now (a training run goes on) to ``directory``, whole or not at
    all: it appears by a rename once written. Every process must call this (see save_final)."""
    weights = whole_state_dict(accelerator, prepared)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        new = directory.with_name(directory.name + ".new")
        shutil.rmtree(new, ignore_errors=True)
        try:
            with writing(new):
                model.save_pretrained(new, state_dict=weights)
                tokenizer.save_pretrained(new)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)  # a half-written copy only takes room
            raise
        shutil.rmtree(directory, ignore_errors=True)
        new.rename(directory)
    accelerator.wait_for_everyone()


class CheckpointError(ValueError):
    """A checkpoint that is damaged, or holds what a safe loader refuses (code to run)."""


class NonFiniteLoss(FloatingPointError):
    """The loss or the gradient became NaN or infinite. ``kept_last_good``: the weights are
    those of the last step whose loss and gradient were finite (else the bad ones remain)."""

    def __init__(self, message: str, kept_last_good: bool):
        super().__init__(message)
        self.kept_last_good = kept_last_good


def scalars(record: dict, prefix: str) -> dict[str, float]:
    """The numbers of a (nested) record, keyed by their path: what a tracker can draw."""
    found = {}
    for key, value in record.items():
        if isinstance(value, dict):
            found.update(scalars(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[f"{prefix}/{key}"] = value
    return found


def share(micro_batches: list[list], processes: int, rank: int,
          fixed_weight: float | None = None) -> list[tuple[list, float]]:
    """Process ``rank``'s micro-batches of a step with their weights: each micro-batch's share
    of the step's rows, or ``fixed_weight`` whatever its rows (HF Trainer's 1/accumulation).

    Processes take every ``processes``-th micro-batch. When their number does not divide
    evenly, each is first cut into ``processes`` interleaved parts, each weighing its share
    of the micro-batch, so every process trains on real rows every step (``grad_accum=1``
    under 8 GPUs is 8 GPUs' speed, not one). Backward passes must all join the all-reduce:
    only where a step holds too few rows to go round does a process run a micro-batch at
    weight 0."""
    rows = sum(len(m) for m in micro_batches)
    weighted = [(m, fixed_weight or len(m) / rows) for m in micro_batches]
    if len(weighted) % processes:
        weighted = [(part, w * len(part) / len(m)) for m, w in weighted
                    for part in (m[i::processes] for i in range(processes)) if part]
    mine = weighted[rank::processes]
    return mine + [(micro_batches[0], 0.0)] * (-(-len(weighted) // processes) - len(mine))


class Trainer:
    """Runs a plan: ``loss_fn(micro_batch) -> (loss, tokens)`` for each micro-batch, one AdamW
    step per plan step, checkpoints in ``staging/checkpoint``. Prepares ``model`` (with the
    optimizer) for the accelerator: train ``trainer.model``. A NaN or infinite loss or gradient
    stops the run (:class:`NonFiniteLoss`); with ``keep_last_good`` the weights are then those
    of the last step whose loss and gradient were finite."""

    def __init__(self, accelerator: Accelerator, model, plan: list[Epoch],
                 segments: list[Segment], staging: Path, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), max_grad_norm: float = 1.0,
                 keep_last_good: bool = False, micro_batch_weight: float | None = None):
        self.acc, self.plan, self.staging = accelerator, plan, staging
        self.max_grad_norm = max_grad_norm
        # None: each micro-batch weighs its share of the step's rows; else this, whatever its
        # rows (HF Trainer's 1/gradient_accumulation_steps)
        self.micro_batch_weight = micro_batch_weight
        # lr is set absolutely by the schedule (LambdaLR multiplies the base lr of 1)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel over all parameters instead of a dozen per tensor list
        optimizer = torch.optim.AdamW(trainable, lr=1.0, betas=betas,
                                      weight_decay=weight_decay, fused=True)
        # Model and optimizer are prepared together (DeepSpeed builds one engine of both).
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        # The schedule drives the prepared optimizer, the one that steps (with optimizer
        # offload, a DeepSpeedCPUAdam accelerate builds from the torch one's parameter groups,
        # tested in test_distributed). It is not prepared itself:
        # accelerate would step it once per process per step, running the schedule
        # num_processes times too fast. Nor is it registered for accelerate's checkpoints,
        # which pickle it and unpickle it with code execution allowed: its state is a few
        # numbers, kept as JSON beside the checkpoint.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, piecewise(segments))
        # clipped as prepared: FSDP swaps in sharded parameters
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # A copy of the trainable weights before each update (one more copy of them in
        # memory), so that a loss that turns NaN after a bad update can give back the weights
        # that were still good. Not under ZeRO-3, where each process holds a shard.
        self.last_good = ([torch.empty_like(p) for p in self.params] if keep_last_good
                          else None)
        self.have_last_good = False

    def save(self, progress: dict) -> None:
        current, old = _checkpoints(self.staging)
        new = self.staging / "checkpoint.new"
        if self.acc.is_main_process:
            shutil.rmtree(new, ignore_errors=True)
        self.acc.wait_for_everyone()
        # Nothing in a checkpoint runs code when loaded: weights as safetensors (a tied
        # LM-head weight is stored once and restored by safetensors' load_model), optimizer
        # and RNG state loaded by accelerate with torch.load(weights_only=True), JSON for the rest
        try:
            with writing(new), self._trainable_only():
                self.acc.save_state(str(new), safe_serialization=True)
        except BaseException:  # the previous checkpoint stays the one to resume from
            if self.acc.is_main_process:
                shutil.rmtree(new, ignore_errors=True)
            raise
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            write_json(new / "scheduler.json", self.scheduler.state_dict())
            write_json(new / "progress.json", progress)
            shutil.rmtree(old, ignore_errors=True)
            if current.exists():
                os.replace(current, old)
            os.replace(new, current)
            shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    @contextmanager
    def _trainable_only(self):
        """Checkpoints hold the trainable weights only (with LoRA, the adapters: megabytes
        where the whole model of a 7B is 28 GB); the frozen rest is the source model's, loaded
        again by a resumed run before the checkpoint is. ZeRO-3 saves through DeepSpeed."""
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}

        def keep(models, weights, output_dir):
            for i, state in enumerate(weights):
                weights[i] = {k: v for k, v in state.items() if k in names}

        handle = self.acc.register_save_state_pre_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    def _any_process(self, flag: bool) -> bool:
        """True on every process when it is true on one (clocks differ between processes)."""
        if self.acc.num_processes == 1:
            return flag
        return bool(self.acc.reduce(torch.tensor(float(flag), device=self.acc.device), "max"))

    def _main_decides(self, flag: bool) -> bool:
        """The main process's decision, on every process: each measures a stop rule on its own
        (scores a float rounding apart), and one process leaving the loop while another goes on
        would leave that one waiting in an all-reduce for ever."""
        if self.acc.num_processes == 1:
            return bool(flag)
        decision = torch.tensor([float(bool(flag))], device=self.acc.device)
        return bool(broadcast(decision, from_process=0).item())

    def resume(self, progress: dict) -> int:
        """The epoch to start from; loads the checkpoint ``progress`` came from (see
        :func:`resume_progress`) when there is one."""
        if not progress.get("epoch"):
            return 0
        latest = _latest_checkpoint(self.staging)
        if latest is not None:
            try:
                # strict=False: the frozen weights are not in it (see _trainable_only)
                self.acc.load_state(str(latest), **({} if zero3(self.acc) else {"strict": False}))
                self.scheduler.load_state_dict(json.loads((latest / "scheduler.json").read_text()))
            except (pickle.UnpicklingError, SafetensorError, RuntimeError, OSError, KeyError,
                    ValueError) as e:
                raise CheckpointError(f"{latest}: the checkpoint cannot be read safely "
                                      f"({type(e).__name__}); delete {self.staging} and rerun "
                                      f"to start afresh") from None
            return progress["epoch"]
        raise FileNotFoundError(f"{self.staging}: progress says epoch {progress['epoch']} "
                                "but no checkpoint holds it; delete the directory and rerun")

    @contextmanager
    def _accumulating(self):
        """Backward passes inside only add to the gradients: no all-reduce (DDP), and no
        optimizer step (DeepSpeed, which steps in ``backward`` unless told otherwise)."""
        self.acc.sync_gradients = False
        try:
            with self.acc.no_sync(self.model):
                yield
        finally:
            self.acc.sync_gradients = True

    def step(self, micro_batches: list, loss_fn, where: str) -> tuple[float, int]:
        """One optimizer step over the micro-batches; the loss of each is weighted by its share
        of the step's rows, so accumulation gives the gradient of the whole batch. Processes
        split the micro-batches between them (:func:`share`) and scale the weights so that the
        averaged gradient equals the one-process gradient: a run's result does not depend on
        how many processes ran it (exactly so when ``grad_accum`` is a multiple of them)."""
        processes = self.acc.num_processes
        mine = share(micro_batches, processes, self.acc.process_index,
                     self.micro_batch_weight)
        total, tokens = 0.0, 0
        for i, (micro, weight) in enumerate(mine):
            last = i == len(mine) - 1
            # gradients are all-reduced across processes once per step, not per micro-batch
            with self._accumulating() if not last else nullcontext():
                with self.acc.autocast():
                    loss, n = loss_fn(micro)
                loss_sum = loss.detach() * weight
                if processes > 1:
                    loss_sum = self.acc.reduce(loss_sum, "sum")
                if not torch.isfinite(loss_sum):  # every process sees it: they stop together
                    # these weights gave it: back to those before the last update
                    self._stop(f"{where}: loss became {loss_sum.item()}", restore=True)
                self.acc.backward(loss * weight * processes)  # DDP averages over processes
            total += loss_sum.item()
            tokens += n if weight else 0
        # max_grad_norm=0 turns clipping off; the norm (at an infinite bound) is still checked
        norm = self.acc.clip_grad_norm_(self.params, self.max_grad_norm or math.inf)
        if norm is not None and not torch.isfinite(torch.as_tensor(norm)):
            # the weights gave a finite loss: they are the last good ones; no update is made
            self._stop(f"{where}: gradient norm became {float(norm)}", restore=False)
        if self.last_good is not None:
            with torch.no_grad():
                for copy, p in zip(self.last_good, self.params):
                    copy.copy_(p)
            self.have_last_good = True
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, tokens

    def _stop(self, message: str, restore: bool):
        """Raise :class:`NonFiniteLoss`, first putting back the weights from before the last
        update when ``restore`` (the current ones gave a NaN) and there is a copy of them."""
        self.optimizer.zero_grad(set_to_none=True)
        if restore and self.have_last_good:
            with torch.no_grad():
                for copy, p in zip(self.last_good, self.params):
                    p.copy_(copy)
        # without a copy yet no update was made: the weights are those the run started from
        raise NonFiniteLoss(message, kept_last_good=not restore or self.last_good is not None)

    def run(self, progress: dict, loss_fn, after_epoch=None, before_epoch=None,
            after_step=None) -> dict:
        """Train from the checkpointed epoch on. ``before_epoch(index)`` is told each epoch
        before it starts; ``after_epoch(index, record)`` and ``after_step(step)`` (the global
        step count so far) may measure and return True to stop early. Raises
        :class:`NonFiniteLoss` with the model untouched by the bad step."""
        start = self.resume(progress)
        if progress.get("done"):
            return progress
        history = progress.setdefault("history", [])
        bar = tqdm(total=sum(len(e.steps) for e in self.plan),
                   initial=sum(len(e.steps) for e in self.plan[:start]), unit="step",
                   dynamic_ncols=True)
        last_save, every = time.monotonic(), checkpoint_minutes() * 60
        adapt = CHECKPOINT_MINUTES_VARIABLE not in os.environ
        global_step = sum(len(e.steps) for e in self.plan[:start])
        for index in range(start, len(self.plan)):
            epoch = self.plan[index]
            if index == 0 or self.plan[index - 1].stage != epoch.stage:
                self.optimizer.state.clear()  # a fresh optimizer for a new stage
            if before_epoch:
                before_epoch(index)
            bar.set_description(epoch.name)
            losses, tokens, t0 = [], 0, time.perf_counter()
            stop = False
            for step in epoch.steps:
                step_start = time.perf_counter()
                loss, n = self.step(step, loss_fn, f"{epoch.name} (epoch {index})")
                losses.append(loss)
                tokens += n
                global_step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}",
                                tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
                self.acc.log({"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0],
                              "train/tokens_per_second": n / (time.perf_counter() - step_start)},
                             step=global_step)
                if after_step is not None and self._main_decides(after_step(global_step)):
                    stop = True
                    break
            record = {"epoch": index, "stage": epoch.stage, "name": epoch.name,
                      "loss": fmean(losses) if losses else None, "step_losses": losses,
                      "tokens": tokens, "seconds": time.perf_counter() - t0}
            if after_epoch and self._main_decides(after_epoch(index, record)):
                stop = True
            self.acc.log(scalars(record, "epoch"), step=global_step)
            history.append(record)
            progress["epoch"] = index + 1
            if stop:
                break
            if self._any_process(time.monotonic() - last_save > every):
                started = time.monotonic()
                self.save(progress)
                last_save = time.monotonic()
                if adapt:  # a large model's checkpoint takes long: take fewer of them
                    every = max(every, (last_save - started) / CHECKPOINT_SHARE)
        bar.close()
        progress["done"] = True
        return progress
