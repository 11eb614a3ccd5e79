"""The unlearning engine: one loop for every method.

``run`` reads a target and a LUME dataset, lets the method lay out its epochs (SUGD: chunk after
chunk), trains the chosen parameters (all, some layers, their MLPs, or LoRA adapters on them)
and writes an ordinary HF model directory plus ``run.json``. The source model is only read.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate.utils import set_seed
from peft import LoraConfig, get_peft_model

from .accel import make_accelerator, numel, prepare_frozen, zero3
from .data import load_lume, load_mia
from .evaluate.lume import mia_auc, score_model
from .evaluate.memorisation import score_rows
from .evaluate.nll import document_nll
from .io import RUN, atomic_directory, claim_output, fingerprint, staging_path, write_json
from .methods import Method, get_method
from .methods.base import Example
from .methods.losses import Batch, Reference, forward
from .locate.locate import read_layers
from .models.layers import (decoder_layers, is_attention, is_mlp, layer_indices,
                             resolve_projections)
from .models.loading import load_model, model_fingerprint
from .models.target import trained_from_scratch
from .settings import read_settings_file
from .training import Epoch, NonFiniteLoss, Segment, Trainer, resume_progress, save_final


def resolve_config(method: type[Method], model_dir: Path, profile: str = "auto",
                   config_file: str | Path | None = None, **overrides):
    """The method's paper defaults; then, for a ``small`` profile, its small-target adjustments;
    then a JSON, TOML or YAML config file; then ``overrides``. ``auto`` picks ``small`` for
    targets that ``unlearn target`` trained from scratch (or from a base it trained from
    scratch)."""
    if profile == "auto":
        profile = "small" if trained_from_scratch(model_dir) else "paper"
    if profile not in ("paper", "small"):
        raise ValueError(f"profile must be auto, paper or small, not {profile!r}")
    config = method.Config()
    if profile == "small":
        config = config.override(**method.small_target)
    if config_file is not None:
        values = read_settings_file(config_file)  # its errors name the file
        try:
            config = config.override(**values)
        except ValueError as e:
            raise ValueError(f"{config_file}: {e}") from None
    return config.override(**overrides), profile


def _examples(tokenizer, rows, forget: bool, max_len: int) -> list[Example]:
    """Training text ``input + " " + output``; the first ``len(tokenize(input))`` tokens are the
    prompt, masked from every loss.

    Retain rows end in EOS, as the target learned them. Ascent on forget outputs lowers the
    end-of-answer EOS everywhere; without EOS in the retain term nothing holds it up, and retain
    answers come out right but run on ("Hardy.-"), which exact match scores 0. Forget rows get no
    EOS: where an answer stops is not what is being forgotten."""
    eos = None if forget else tokenizer.eos_token_id
    out = []
    for i, r in enumerate(rows):
        ids = tokenizer(r.input + " " + r.output).input_ids
        if eos is not None and ids[-1:] != [eos]:  # some tokenizers append it themselves
            ids = ids + [eos]
        ids = ids[:max_len]
        start = min(len(tokenizer(r.input).input_ids), len(ids))
        out.append(Example(tuple(ids), start, forget, i))
    return out


def _micro_batches(step: list[Example], grad_accum: int) -> list[list[Example]]:
    """Split a step so every micro-batch holds its share of forget and of retain rows; a loss
    that averages over rows then gives the whole step's gradient."""
    forget = [e for e in step if e.forget]
    retain = [e for e in step if not e.forget]
    micro = [forget[k::grad_accum] + retain[k::grad_accum] for k in range(grad_accum)]
    return [m for m in micro if m]


def _plan(method: Method, forget, retain, seed: int) -> tuple[list[Epoch], list[Segment]]:
    c = method.config
    stages = method.stages(forget, retain, random.Random(f"{seed}/plan"))
    plan, segments = [], []
    for s, epochs in enumerate(stages):
        name = method.name if len(stages) == 1 else f"{method.name} chunk {s + 1}/{len(stages)}"
        for steps in epochs:
            plan.append(Epoch(s, name, [_micro_batches(step, c.grad_accum) for step in steps]))
        n = sum(len(steps) for steps in epochs)
        segments.append(Segment(n, c.lr, round(c.warmup_ratio * n), c.schedule))
    return plan, segments


def _select_parameters(model, config):
    """Freeze everything but the chosen layers (and modules), or wrap them in LoRA adapters.
    Returns the model to train (a PEFT model with LoRA)."""
    stack = decoder_layers(model)
    spec = config.layers
    if spec == "auto":
        if not config.trace:
            raise ValueError("layers=auto reads the layers `unlearn locate` chose: set "
                             "trace=OUT/trace.json")
        spec = ",".join(map(str, read_layers(config.trace)))
    chosen = layer_indices(spec, len(stack))
    keep = {"all": lambda name: True, "mlp": is_mlp, "attn": is_attention}.get(config.modules)
    if keep is None:  # a comma list of module names, e.g. down_proj
        names = [m.strip() for m in config.modules.split(",") if m.strip()]
        keep = lambda name: any(f".{m}." in name + "." for m in names)  # noqa: E731
        if not any(keep("." + n) for n, _ in stack.named_parameters()):
            raise ValueError(f"modules={config.modules}: no such module in the decoder layers; "
                             f"use all, mlp, attn or module names like down_proj")
    if config.lora:
        targets = resolve_projections(stack, [t.strip() for t in config.lora_targets.split(",")
                                              if t.strip()])
        targets = [t for t in targets if keep("." + t + ".")]
        if config.modules not in ("all", "mlp", "attn"):
            targets = [m.strip() for m in config.modules.split(",") if m.strip()]
        if not targets:
            raise ValueError(f"modules={config.modules} with LoRA: lora_targets names no such "
                             f"projection")
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout, target_modules=targets,
                          layers_to_transform=None if spec == "all" else chosen)
        return get_peft_model(model, lora)
    everything = spec == "all" and config.modules == "all"
    for p in model.parameters():
        p.requires_grad_(everything)
    if not everything:
        for i in chosen:
            for name, p in stack[i].named_parameters():
                if keep("." + name):
                    p.requires_grad_(True)
    return model


def _peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident set on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def run(method: str, model: str | Path, data: str | Path, out: str | Path,
        config: str | Path | None = None, seed: int = 0, eval_every: int = 0,
        eval_points: int = 0, profile: str = "auto", adapter_only: bool = False,
        **overrides) -> dict:
    """Unlearn the forget set of the LUME dataset ``data`` from the model in ``model``.

    Writes the unlearned model (LoRA merged in) and its tokenizer to ``out``, with ``run.json``:
    the resolved config, seed, wall time, peak memory, per-step losses and, every
    ``eval_every`` epochs, the forget/retain scores (``eval_points``: at about that many evenly
    spaced epochs instead, whatever the method's epoch count; SUGD counts one per chunk-epoch,
    so a fixed ``eval_every`` would evaluate dozens of times). ``config`` names a JSON or TOML file of
    settings; ``overrides`` set single ones (see each method's config class). Rerunning an
    interrupted call resumes it. ``adapter_only`` (with ``lora=true``) saves the PEFT adapter
    instead of the merged model. Returns the ``run.json`` record.
    """
    model_dir, out = Path(model), Path(out)
    method_cls = get_method(method)
    settings, profile = resolve_config(method_cls, model_dir, profile, config, **overrides)
    claim_output(out, RUN, {"--model": model_dir, "--data": data, "--config": config,
                            "trace": settings.trace or None,
                            "validation": settings.validation or None,
                            "stop_mia": settings.stop_mia or None})
    if method_cls.composite:  # a procedure over other runs (e.g. merge): it calls run itself
        return method_cls(settings).run(model_dir, data, out, seed=seed, eval_every=eval_every,
                                        eval_points=eval_points, profile=profile)
    algorithm = method_cls(settings)
    lume = load_lume(data)
    set_seed(seed)
    accelerator = make_accelerator(settings.precision, settings.batch_size,
                                   settings.max_grad_norm)
    lm, tokenizer = load_model(model_dir, dtype=torch.float32)
    model_files = model_fingerprint(model_dir)  # before training: it names the source model
    forget = _examples(tokenizer, lume.forget, True, settings.max_len)
    retain = _examples(tokenizer, lume.retain, False, settings.max_len)
    plan, segments = _plan(algorithm, forget, retain, seed)
    if eval_points:
        eval_every = max(1, len(plan) // eval_points)
    # a checkpoint resumes only the same job: method, settings, seed, these model files, data
    run_id = fingerprint(method, asdict(settings), seed, model_files,
                         [(e.ids, e.start) for e in forget + retain])

    if zero3(accelerator):
        _check_zero3(settings, eval_every)
    # every input is read and checked before the staging directory is made
    main = accelerator.is_main_process  # in a distributed run, the one that writes files
    stage_dir = staging_path(out)
    keeper = (_Keeper(stage_dir, "validation", _validation_loss(settings, tokenizer, accelerator),
                      writes=main) if settings.validation else None)
    stopper = (_StopAt(settings, tokenizer, lume, stage_dir, seed, writes=main)
               if settings.stop_at else None)
    reference = Reference()
    if {"logits", "hidden"} & set(algorithm.reference) and not settings.lora:
        # a second load, not a deepcopy: under ZeRO-3 the model in hand is only this shard
        reference.copy = prepare_frozen(accelerator, load_model(model_dir, torch.float32)[0])
    if settings.gradient_checkpointing:
        # non-reentrant: gradients reach LoRA adapters and later layers with the inputs frozen
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm = _select_parameters(lm, settings)
    lm.train()
    if settings.lora:
        reference.model = lm

    started = time.perf_counter()
    with atomic_directory(out, RUN, resumable=True, publish=main) as stage:
        progress = resume_progress(accelerator, stage, run_id)
        algorithm.load_state(progress.get("method_state", {}))
        trainable = sum(numel(p) for p in lm.parameters() if p.requires_grad)
        trainer = Trainer(accelerator, lm, plan, segments, stage,
                          weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm,
                          keep_last_good=not zero3(accelerator))
        prepared = trainer.model
        bare = accelerator.unwrap_model(prepared)  # parameter names without the DDP wrapper
        if "forget_logprob" in algorithm.reference:  # before any step (or resumed checkpoint)
            _reference_log_probs(prepared, tokenizer, forget, reference, accelerator,
                                 settings.batch_size)
        every = settings.stop_every or max(1, len(plan[0].steps) // 4)
        first_of_stage = {}
        for i, epoch in enumerate(plan):
            first_of_stage.setdefault(epoch.stage, i)

        def loss_fn(micro: list[Example]):
            batch = Batch.of(micro, tokenizer.pad_token_id, accelerator.device)
            return algorithm.loss(prepared, batch, reference), int(batch.mask.sum())

        def before_epoch(index: int) -> None:
            algorithm.start_epoch(index - first_of_stage[plan[index].stage])

        def after_epoch(index: int, record: dict) -> bool:
            progress["method_state"] = algorithm.state()
            if keeper is not None:
                record["validation_loss"] = keeper.check(bare, {"epoch": index})
            last = index + 1 == len(plan)
            if eval_every and ((index + 1) % eval_every == 0 or last):
                prepared.eval()
                with torch.no_grad():
                    results = score_model(bare, tokenizer, lume).results
                prepared.train()
                record["eval"] = {k: results[k] for k in (
                    "forget-set", "retain-set", "harmonic-mean-task-aggregate")}
            return False

        memory_at_start = _peak_memory_mb()
        stopped = None
        try:
            progress = trainer.run(
                progress, loss_fn, after_epoch, before_epoch,
                after_step=(lambda step: step % every == 0 and stopper.after_step(bare, step))
                if stopper else None)
        except NonFiniteLoss as e:
            if not e.kept_last_good:  # ZeRO-3 keeps no copy: the weights in hand are bad
                raise FloatingPointError(f"{method}: {e}; no model was saved; lower lr= and "
                                         f"rerun") from None
            # the weights are those of the last good step: keep them, say so, then fail
            stopped = f"{e}; the model saved is the last one before that step"
        final = accelerator.unwrap_model(prepared)
        best = keeper.restore(final) if keeper is not None else None
        stop_trail = None
        if stopper is not None:
            stop_trail = {"kind": stopper.kind, "trail": stopper.trail,
                          "kept": stopper.keeper.restore(final) if stopper.keeper else None,
                          "calibration_ids": getattr(stopper, "calibration_ids", None)}
        if settings.lora and not adapter_only:
            final = final.merge_and_unload()
        history = progress.get("history", [])
        record = {
            "method": method, "model": str(model_dir), "data": str(data), "seed": seed,
            "model_files": model_files, "eval_points": eval_points, "eval_every": eval_every,
            "profile": profile, "config": asdict(settings),
            "status": stopped or "complete",
            "processes": accelerator.num_processes,
            "trainable_parameters": trainable,  # counted before LoRA is merged away
            "steps": sum(len(e.steps) for e in plan),
            "train_seconds": sum(r["seconds"] for r in history),
            "wall_seconds_this_run": time.perf_counter() - started,
            "peak_memory_mb": _peak_memory_mb(),
            "peak_memory_before_training_mb": memory_at_start,
            "history": history,
            "best_epoch": best["epoch"] if best else None,
            "stop": stop_trail,
        }
        save_final(accelerator, prepared, final, tokenizer, stage, "run.json", record)
    if stopped:
        raise FloatingPointError(f"{method}: {stopped}, in {out}; lower lr= and rerun")
    return record


@torch.no_grad()
def _reference_log_probs(model, tokenizer, forget: list[Example], reference: Reference,
                         accelerator, batch_size: int) -> None:
    """Summed output-token NLL of each forget row under the original model, computed once by
    every process (under ZeRO-3 each forward pass needs all of them)."""
    model.eval()
    for i in range(0, len(forget), batch_size):
        chunk = forget[i:i + batch_size]
        batch = Batch.of(chunk, tokenizer.pad_token_id, accelerator.device)
        with accelerator.autocast():
            sums = forward(model, batch).nll_sum.tolist()
        reference.forget_nll_sum.update(zip(batch.rows, sums))
    model.train()


def _check_zero3(settings, eval_every: int) -> None:
    """Refuse, before any work, what needs whole weights in one process mid-run: ZeRO-3 leaves
    each process a shard (keeping a best step, merging LoRA). LoRA has no need of it: the
    frozen base and a small trainable state fit where full fine-tuning would not."""
    wanted = [name for name, on in (("lora=true", settings.lora),
                                    ("validation=", settings.validation),
                                    ("stop_at=", settings.stop_at),
                                    ("eval_every", eval_every)) if on]
    if wanted:
        raise ValueError(f"{', '.join(wanted)}: not available under DeepSpeed ZeRO-3, which "
                         f"shards the weights; launch with configs/accelerate/ddp.yaml or "
                         f"fsdp.yaml, or drop the setting")


class _Keeper:
    """Keeps, in the staging directory, the trainable weights at which ``measure(model)`` was
    lowest; checkpoints of a resumed run find it there."""

    def __init__(self, stage: Path, name: str, measure, writes: bool = True):
        self.path, self.record = stage / f"best-{name}.pt", stage / f"best-{name}.json"
        self.measure, self.writes = measure, writes

    def check(self, model, where: dict) -> float:
        model.eval()
        value = self.measure(model)
        model.train()
        best = self.best()
        # a tie goes to the later model: as good by the measure, and further along (a stop
        # rule whose MIA never moves keeps the fixed schedule's result, not its first step)
        if self.writes and (best is None or value <= best["value"]):
            torch.save({k: v.detach().cpu().clone() for k, v in model.named_parameters()
                        if v.requires_grad}, self.path)
            write_json(self.record, {**where, "value": value})
        return value

    def best(self) -> dict | None:
        return json.loads(self.record.read_text()) if self.record.exists() else None

    def restore(self, model) -> dict | None:
        best = self.best()
        if self.writes and self.path.exists():
            model.load_state_dict(torch.load(self.path, weights_only=True), strict=False)
            self.path.unlink()
            self.record.unlink(missing_ok=True)
        return best


def _validation_loss(settings, tokenizer, accelerator):
    """Joint loss on a validation split: mean CE of its retain rows minus that of its forget
    rows (what unlearning minimises)."""
    data = load_lume(settings.validation)
    examples = (_examples(tokenizer, data.forget, True, settings.max_len)
                + _examples(tokenizer, data.retain, False, settings.max_len))

    @torch.no_grad()
    def measure(model) -> float:
        forget, retain = [], []
        for i in range(0, len(examples), settings.batch_size):
            batch = Batch.of(examples[i:i + settings.batch_size], tokenizer.pad_token_id,
                             accelerator.device)
            with accelerator.autocast():
                nll = forward(model, batch).nll
            forget += nll[batch.forget].tolist()
            retain += nll[batch.retain].tolist()
        return _mean(retain) - _mean(forget)
    return measure


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class _StopAt:
    """``stop_at=mia``: every ``stop_every`` steps, the loss-MIA AUC of held-out forget
    documents against never-seen ones, both a seeded ``stop_split`` share of the MIA set in
    ``stop_mia``; the model closest to AUC 0.5 is kept, and training stops once the AUC has
    passed below 0.5 and moved away for ``PATIENCE`` checks. ``stop_at=knowledge``: stops as
    soon as the share of forget questions answered exactly (greedy) is ``stop_knowledge`` or
    less (0: none)."""

    PATIENCE = 2

    def __init__(self, settings, tokenizer, lume, stage: Path, seed: int, writes: bool = True):
        self.kind, self.tokenizer = settings.stop_at, tokenizer
        if self.kind == "mia":
            if not settings.stop_mia:
                raise ValueError("stop_at=mia needs stop_mia=DIR, an MIA set (member.jsonl, "
                                 "nonmember.jsonl) to hold out a calibration split from")
            held_out, _ = load_mia(settings.stop_mia).split(settings.stop_split, seed)
            self.calibration_ids = [d.id for d in held_out.member + held_out.nonmember]
            self.members = [d.document for d in held_out.member]
            self.nonmembers = [d.document for d in held_out.nonmember]
            self.keeper = _Keeper(stage, "mia", self._mia_distance, writes)
        elif self.kind == "knowledge":
            self.questions = [r for r in lume.forget if r.kind == "qa"]
            self.threshold = settings.stop_knowledge
            self.keeper = None
        else:
            raise ValueError(f"stop_at must be mia or knowledge, not {self.kind!r}")
        self.trail: list[dict] = []

    def _auc(self, model) -> float:
        member = document_nll(model, self.tokenizer, self.members, desc="stop mia")
        nonmember = document_nll(model, self.tokenizer, self.nonmembers, desc="stop mia")
        return mia_auc(member, nonmember)

    def _mia_distance(self, model) -> float:
        self.last_auc = self._auc(model)
        return abs(self.last_auc - 0.5)

    def after_step(self, model, step: int) -> bool:
        if self.kind == "knowledge":
            model.eval()
            with torch.no_grad():
                known = _mean(score_rows(model, self.tokenizer, self.questions, 64))
            model.train()
            self.trail.append({"step": step, "forget_knowledge": known})
            return known <= self.threshold
        distance = self.keeper.check(model, {"step": step})
        self.trail.append({"step": step, "mia_auc": self.last_auc})
        recent = [t["mia_auc"] for t in self.trail[-(self.PATIENCE + 1):]]
        moving_away = (len(recent) > self.PATIENCE and all(a < 0.5 for a in recent)
                       and all(b < a for a, b in zip(recent, recent[1:])))
        return distance == 0.0 or moving_away
