"""The unlearning engine: one loop for every method.

``run`` reads a target and a LUME dataset, lets the method lay out its epochs (SUGD: chunk after
chunk), trains the chosen parameters (all, some layers, their MLPs, or LoRA adapters on them)
and writes an ordinary HF model directory plus ``run.json``. The source model is only read.
"""

from __future__ import annotations

import random
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate.utils import set_seed

from .accel import make_accelerator, numel, sharded, start_logging, stop_logging, zero3
from .anchor import Anchor, sample_passages
from .data import beside_data, load_lume, load_mia
from .io import RUN, atomic_directory, claim_output, fingerprint, path_text, staging_path
from .measure.official import score_model
from .methods import METHODS, Method, get_method
from .methods.base import Example, output_dtype
from .methods.losses import Batch, Reference, forward
from .methods.trainable import select_parameters
from .models.loading import (
    check_model_dir,
    load_model,
    model_fingerprint,
    teacher_of,
    trained_from_scratch,
)
from .models.sequences import training_sequence
from .plan import MemoryPlan, plan_run, require_fit
from .selection import (
    Keeper,
    calibration_split,
    check_every,
    evaluating,
    make_rule,
    never_seen_level,
    resolve_rule,
)
from .settings import check_seed, read_settings_file
from .training import (
    Epoch,
    NonFiniteLoss,
    Segment,
    Trainer,
    checkpoint_minutes,
    resume_progress,
    save_final,
    scalars,
)


def resolve_config(method: type[Method], model_dir: Path, profile: str = "auto",
                   config_file: str | Path | None = None, **overrides):
    """The method's paper defaults; then, for a ``small`` profile, its small-target adjustments
    (and, where the target's base was kept, those for a target with a teacher); then a JSON,
    TOML or YAML config file; then ``overrides``. ``auto`` picks ``small`` for targets that
    ``unlearn target`` trained from scratch (or from a base it trained from scratch)."""
    if profile == "auto":
        profile = "small" if trained_from_scratch(model_dir) else "paper"
    if profile not in ("paper", "small"):
        raise ValueError(f"profile must be auto, paper or small, not {profile!r}")
    config = method.Config()
    if profile == "small":
        config = config.override(**method.small_target)
        if method.small_target_with_teacher and teacher_of(model_dir) is not None:
            config = config.override(**method.small_target_with_teacher)
    if config_file is not None:
        values = read_settings_file(config_file)  # its errors name the file
        try:
            config = config.override(**values)
        except ValueError as e:
            raise ValueError(f"{config_file}: {e}") from None
    return config.override(**overrides), profile


def _examples(tokenizer, rows, forget: bool, settings) -> list[Example]:
    """Rows as trained on (:func:`training_sequence`), the prompt masked from every loss.

    Retain rows end in EOS, as the target learned them (unless ``retain_eos=false``, as SUGD's
    code trained). Ascent on forget outputs lowers the end-of-answer EOS everywhere; without EOS
    in the retain term nothing holds it up, and retain answers come out right but run on
    ("Hardy.-"), which exact match scores 0. Forget rows get no EOS: where an answer stops is not
    what is being forgotten."""
    eos = not forget and settings.retain_eos
    examples = []
    for i, r in enumerate(rows):
        ids, start = training_sequence(tokenizer, r.input, r.output, settings.max_len, eos=eos)
        examples.append(Example(tuple(ids), start, forget, i))
    return examples


def _plan(method: Method, forget, retain, seed: int) -> tuple[list[Epoch], list[Segment]]:
    c = method.config
    stages = method.stages(forget, retain, random.Random(f"{seed}/plan"))
    plan, segments = [], []
    for s, epochs in enumerate(stages):
        name = method.name if len(stages) == 1 else f"{method.name} chunk {s + 1}/{len(stages)}"
        for steps in epochs:
            plan.append(Epoch(s, name, [method.micro_batches(step) for step in steps]))
        n = sum(len(steps) for steps in epochs)
        segments.append(Segment(n, c.lr, round(c.warmup_ratio * n), c.schedule))
    return plan, segments


def _peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident set on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def run(method: str, model: str | Path, data: str | Path, out: str | Path,
        config: str | Path | None = None, seed: int = 0, eval_every: int = 0,
        eval_points: int = 0, profile: str = "auto", adapter_only: bool = False,
        mia: str | Path | None = "auto", mmlu: str | Path | None = "auto",
        split: str | None = None, **overrides) -> dict:
    """Unlearn the forget set of the LUME dataset ``data`` from the model in ``model``.

    Writes the unlearned model (LoRA merged in) and its tokenizer to ``out``, with ``run.json``:
    the resolved config, seed, wall time, peak memory, per-step losses and, every
    ``eval_every`` epochs, the forget/retain scores (``eval_points``: at about that many evenly
    spaced epochs instead, whatever the method's epoch count; SUGD counts one per chunk-epoch,
    so a fixed ``eval_every`` would evaluate dozens of times). ``config`` names a JSON or TOML
    file of settings; ``overrides`` set single ones (see each method's config class). Rerunning an
    interrupted call resumes it. ``adapter_only`` (with ``lora=true``) saves the PEFT adapter
    instead of the merged model. ``mia`` (an MIA directory) turns on selection by estimated
    score (``select``; see :mod:`unlearn.selection`) and bounds ascent at the loss of its
    never-seen documents (``forget_target``; the ``teacher`` setting draws forget rows to the
    model ``model`` was fine-tuned from instead); ``mmlu`` (MMLU-format questions) makes the
    estimate more faithful; both default to ``data/mia`` and ``data/mmlu`` when present ("auto"),
    None turns them off. ``split`` chooses one data split where ``data`` holds several (the
    official parquet snapshot). Returns the ``run.json`` record.
    """
    model_dir, out = Path(model), Path(out)
    check_seed(seed)
    checkpoint_minutes()
    check_model_dir(model_dir)
    mia, mmlu = beside_data(data, mia, "mia"), beside_data(data, mmlu, "mmlu")
    method_cls = get_method(method)
    settings, profile = resolve_config(method_cls, model_dir, profile, config, **overrides)
    teacher = _teacher(method_cls, settings, model_dir)
    memory = plan_run(method_cls, settings, model_dir, teacher)
    require_fit(memory, method_cls, settings, model_dir, teacher)  # before any output exists
    claim_output(out, RUN, {"--model": model_dir, "--data": data, "--config": config,
                            "--mia": mia, "--mmlu": mmlu, "--teacher": teacher,
                            "trace": settings.trace or None,
                            "validation": settings.validation or None})
    algorithm = method_cls(settings)
    record = algorithm.procedure(run, model_dir, data, out, seed=seed, eval_every=eval_every,
                                 eval_points=eval_points, profile=profile, mia=mia, mmlu=mmlu,
                                 split=split)
    if record is not None:  # a procedure over other runs (merge) has done the work
        return record
    job = _Run(method, algorithm, model_dir, data, split, mia, mmlu, teacher, seed, eval_every,
               eval_points, profile, staging_path(out) / "logs")
    job.memory_plan = memory.as_record()
    return job.train(out, adapter_only)


def memory_plan(method: str, model: str | Path, config: str | Path | None = None,
                profile: str = "auto", **overrides) -> MemoryPlan:
    """What ``run`` with these arguments would hold in memory per device, by part (see
    :mod:`unlearn.plan`), from the model's config alone: no weight is loaded."""
    model_dir = check_model_dir(model)
    method_cls = get_method(method)
    settings, _ = resolve_config(method_cls, model_dir, profile, config, **overrides)
    return plan_run(method_cls, settings, model_dir, _teacher(method_cls, settings, model_dir))


def _teacher(method_cls: type[Method], settings, model_dir: Path) -> Path | None:
    """The model forget rows are drawn to (``teacher``), None without one; a teacher named where
    nothing would read it is refused rather than ignored."""
    reads = "teacher" in method_cls.reference and settings.forget_target == "auto"
    if settings.teacher not in ("none", "auto") and not reads:
        readers = sorted(name for name, cls in METHODS.items() if "teacher" in cls.reference)
        raise ValueError(f"teacher={settings.teacher}: only {', '.join(readers)} with "
                         f"forget_target=auto draw forget rows to a teacher; drop the setting")
    return teacher_of(model_dir, settings.teacher) if reads else None


class _Run:
    """One run of a method that trains a loss, in named steps: its inputs read and checked
    (before any output exists), the model and its reference prepared, what the first step
    needs measured on the source model, the loop's hooks, and the ``run.json`` record."""

    memory_plan: dict | None = None  # the plan ``run`` checked before any output existed

    def __init__(self, method: str, algorithm: Method, model_dir: Path, data, split, mia,
                 mmlu, teacher: Path | None, seed: int, eval_every: int, eval_points: int,
                 profile: str, logging_dir: Path):
        settings = self.settings = algorithm.config
        self.method, self.algorithm, self.model_dir = method, algorithm, model_dir
        self.data, self.split, self.mia, self.mmlu = data, split, mia, mmlu
        self.teacher = teacher
        self.seed, self.profile = seed, profile
        self.lume = load_lume(self.data, self.split)
        set_seed(seed)
        self.accelerator = make_accelerator(settings.precision, settings.batch_size,
                                            settings.max_grad_norm, settings.report_to,
                                            logging_dir)
        self.rule = resolve_rule(settings, mia, sharded=sharded(self.accelerator))
        self.mia_data = load_mia(mia) if mia else None
        self.lm, self.tokenizer = load_model(model_dir, dtype=torch.float32)
        self.model_files = model_fingerprint(model_dir)  # before training: the source model
        self.forget = _examples(self.tokenizer, self.lume.forget, True, settings)
        self.retain = _examples(self.tokenizer, self.lume.retain, False, settings)
        self.plan, self.segments = _plan(algorithm, self.forget, self.retain, seed)
        self.eval_points = eval_points
        self.eval_every = max(1, len(self.plan) // eval_points) if eval_points else eval_every
        self.total_steps = sum(len(e.steps) for e in self.plan)
        # a checkpoint resumes only the same job: method, settings, seed, these model files, data
        self.run_id = fingerprint(method, asdict(settings), seed, self.model_files, path_text(mia),
                                  path_text(mmlu), teacher and model_fingerprint(teacher),
                                  [(e.ids, e.start) for e in self.forget + self.retain])
        if sharded(self.accelerator):
            _check_sharded(self.accelerator, settings, self.rule, self.eval_every)
        self.first_of_stage = {}
        for i, epoch in enumerate(self.plan):
            self.first_of_stage.setdefault(epoch.stage, i)

    def _prepare_model(self, staging: Path) -> None:
        """The validation keeper, the frozen reference, and the parameters that train."""
        settings, accelerator = self.settings, self.accelerator
        self.keeper = (Keeper(staging, "validation",
                              _validation_loss(settings, self.tokenizer, accelerator),
                              writes=accelerator.is_main_process)
                       if settings.validation else None)
        self.reference = Reference(self.algorithm.reference)
        self.reference.load_frozen_copy(accelerator, self.model_dir, settings.lora)
        self.reference.load_teacher(accelerator, self.teacher, settings.teacher_floor)
        if settings.gradient_checkpointing:
            # non-reentrant: gradients reach LoRA adapters and later layers with inputs frozen
            self.lm.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        self.lm = select_parameters(self.lm, settings)
        self.lm.train()
        if settings.lora:
            self.reference.peft_model = self.lm

    def _before_first_step(self, progress: dict, staging: Path):
        """What is measured on the source model (the trainer loads a resumed run's weights
        later): the calibration split, the level bounded ascent aims at, the anchor, NPO's
        reference log-probabilities. Returns the selection hook for the trainer."""
        settings, bare, tokenizer = self.settings, self.bare, self.tokenizer
        # a teacher gives each forget row its own target; without one, ascent aims at a level
        levelled = settings.forget_target == "auto" and self.teacher is None
        needs_split = self.rule in ("score", "mia") or (levelled and "forget_level" not in progress)
        split = (calibration_split(self.mia_data, settings.select_split, self.seed, self.lume,
                                   bare, tokenizer)
                 if self.mia_data and needs_split else None)
        self.selector = make_rule(self.rule, settings, tokenizer, self.lume, split, self.mmlu,
                                  staging, self.seed, self.accelerator.is_main_process)
        if "forget_level" not in progress:  # kept for resuming
            progress["forget_level"] = _forget_level(settings, bare, tokenizer, split,
                                                     self.teacher)
        self.reference.forget_level = progress["forget_level"]
        self.anchor = _anchor(settings, bare, tokenizer, progress, self.seed, self.accelerator)
        size = settings.batch_size  # before any step (or the resumed one)
        rows = self.reference.rows_to_measure(self.forget, self.retain)
        if rows:  # NPO's forget rows, SHA256's retain rows with retain_reference=source
            self.reference.measure_rows(
                self.prepared, (Batch.of(rows[i:i + size], tokenizer.pad_token_id,
                                         self.accelerator.device)
                                for i in range(0, len(rows), size)), self.accelerator)
        total_steps = self.total_steps
        # a staged method (SUGD's chunks) has not met a later stage's forget rows before that
        # stage: a model from an earlier stage still holds them, so checks (and stopping)
        # belong to the last stage
        before_last_stage = sum(len(e.steps) for e in self.plan if e.stage < self.plan[-1].stage)
        self.every = check_every(settings, total_steps - before_last_stage)
        return _selection(self.selector, bare, progress, self.every, total_steps, before_last_stage,
                          self.reference if levelled else None,
                          self.accelerator.log)

    def loss(self, micro: list[Example]):
        batch = Batch.of(micro, self.tokenizer.pad_token_id, self.accelerator.device)
        loss = self.algorithm.loss(self.prepared, batch, self.reference)
        if self.anchor is not None:
            loss = loss + self.settings.anchor_weight * self.anchor.term(
                self.prepared, self.accelerator.device)
        return loss, int(batch.mask.sum())

    def before_epoch(self, index: int) -> None:
        self.algorithm.start_epoch(index - self.first_of_stage[self.plan[index].stage])

    def after_epoch(self, index: int, record: dict) -> bool:
        self.progress["method_state"] = self.algorithm.state()
        if self.anchor is not None:  # a resumed run goes on with the passages it was at
            self.progress["anchor"]["next"] = self.anchor.next
        if self.keeper is not None:
            record["validation_loss"] = self.keeper.check(self.bare, {"epoch": index})
        last = index + 1 == len(self.plan)
        if self.eval_every and ((index + 1) % self.eval_every == 0 or last):
            with evaluating(self.prepared):
                results = score_model(self.bare, self.tokenizer, self.lume).results
            record["eval"] = {k: results[k] for k in (
                "forget-set", "retain-set", "harmonic-mean-task-aggregate")}
        return False

    @property
    def rollback(self) -> bool:
        """Whether a copy of the weights before each update is kept, to give them back when a
        loss turns NaN: where the weights are whole and the plan had room for it."""
        planned = self.memory_plan is None or self.memory_plan["parts_mb"]["rollback"] > 0
        return planned and not sharded(self.accelerator)

    def train(self, out: Path, adapter_only: bool) -> dict:
        """The loop, in a staging directory a rerun resumes; the model and ``run.json``."""
        staging, main = staging_path(out), self.accelerator.is_main_process
        self._prepare_model(staging)
        started = time.perf_counter()
        with atomic_directory(out, RUN, resumable=True, publish=main) as staging:
            progress = resume_progress(self.accelerator, staging, self.run_id)
            self.algorithm.load_state(progress.get("method_state", {}))
            trainable = sum(numel(p) for p in self.lm.parameters() if p.requires_grad)
            trainer = Trainer(self.accelerator, self.lm, self.plan, self.segments, staging,
                              weight_decay=self.settings.weight_decay,
                              max_grad_norm=self.settings.max_grad_norm,
                              keep_last_good=self.rollback,
                              micro_batch_weight=(1 / self.settings.grad_accum
                                                  if self.settings.accumulation == "micro_batches"
                                                  else None))
            self.prepared = trainer.model
            # parameter names without the DDP wrapper
            self.bare = self.accelerator.unwrap_model(self.prepared)
            self.progress = progress
            start_logging(self.accelerator, f"unlearn-{self.method}", asdict(self.settings))
            select = self._before_first_step(progress, staging)
            memory_at_start, stopped = _peak_memory_mb(), None
            try:
                self.progress = trainer.run(progress, self.loss, self.after_epoch,
                                            self.before_epoch, select)
            except NonFiniteLoss as e:
                if not e.kept_last_good:  # sharded runs keep no copy: the weights in hand are bad
                    raise FloatingPointError(f"{self.method}: {e}; no model was saved; lower "
                                             f"lr= and rerun") from None
                # the weights are those of the last good step: keep them, say so, then fail
                stopped = f"{e}; the model saved is the last one before that step"
            finally:
                stop_logging(self.accelerator)
            final = self.accelerator.unwrap_model(self.prepared)
            best = self.keeper.restore(final) if self.keeper is not None else None
            selection = _selection_record(self.selector, final, self.progress, self.settings,
                                          self.every)
            if self.settings.lora and not adapter_only:
                final = final.merge_and_unload()
            record = self._record(stopped, trainable, best, selection,
                                  wall_seconds_this_run=time.perf_counter() - started,
                                  peak_memory_mb=_peak_memory_mb(),
                                  peak_memory_before_training_mb=memory_at_start)
            save_final(self.accelerator, self.prepared, final, self.tokenizer, staging, "run.json",
                       record, output_dtype(self.settings, self.model_dir))
        if stopped:
            raise FloatingPointError(f"{self.method}: {stopped}, in {out}; lower lr= and rerun")
        return record

    def _record(self, stopped: str | None, trainable: int, best: dict | None,
                selection: dict | None, **measured: float) -> dict:
        """``run.json``: what ran, on what, how it went and what it cost."""
        history = self.progress.get("history", [])
        return {
            "method": self.method, "model": str(self.model_dir), "data": str(self.data),
            "split": self.split,
            "seed": self.seed, "mia": path_text(self.mia), "mmlu": path_text(self.mmlu),
            "model_files": self.model_files, "eval_points": self.eval_points,
            "eval_every": self.eval_every, "profile": self.profile,
            "config": asdict(self.settings),
            "status": stopped or "complete",
            "processes": self.accelerator.num_processes,
            # what `precision` resolved to on this machine ("bf16" or "no"): the figures move
            "mixed_precision": self.accelerator.mixed_precision,
            "trainable_parameters": trainable,  # counted before LoRA is merged away
            "steps": self.total_steps,
            "steps_trained": sum(len(r["step_losses"]) for r in history),
            # training and the checks made along the way, the one before it included
            "train_seconds": (sum(r["seconds"] for r in history)
                              + (selection or {}).get("seconds_before_training", 0.0)),
            **measured,  # wall time of this call, peak memory before training and at the end
            "history": history,
            "best_epoch": best["epoch"] if best else None,
            "forget_level": self.progress.get("forget_level"),  # before the first step
            "teacher": path_text(self.teacher),
            "selection": selection,
            "memory_plan": self.memory_plan,  # planned before loading, beside peak_memory_mb
            "rollback": self.rollback,  # a copy of the last finite weights was kept
        }


def _forget_level(settings, model, tokenizer, split, teacher: Path | None) -> float | None:
    """The loss bounded ascent aims at (``forget_target``), None for unbounded ascent or where a
    ``teacher`` gives each forget row its own target."""
    if teacher is not None or settings.forget_target == "none" or (
            settings.forget_target == "auto" and not split):
        return None
    if settings.forget_target != "auto":
        return float(settings.forget_target)
    return never_seen_level(model, tokenizer, split[0])


def _anchor(settings, model, tokenizer, progress: dict, seed: int, accelerator
            ) -> Anchor | None:
    """The hold on general text (None with ``anchor_weight=0``): passages the source model
    writes, measured before the first step and kept in ``progress`` for resuming."""
    if not settings.anchor_weight:
        return None
    if "anchor" not in progress:
        with evaluating(model):
            synced = sharded(accelerator) and accelerator.num_processes > 1
            passages = sample_passages(model, tokenizer, settings.anchor_samples, seed, synced)
            progress["anchor"] = Anchor.measure(model, passages, tokenizer.pad_token_id).state()
    state = progress["anchor"]
    if not state["passages"]:  # every passage ended at once: nothing to hold
        return None
    return Anchor(state["passages"], state["start_nll"], tokenizer.pad_token_id, state["next"])


def _check_sharded(accelerator, settings, rule: str, eval_every: int) -> None:
    """Refuse, before any work, what needs whole weights in one process mid-run: ZeRO-3 and
    FSDP leave each process a shard (keeping a best step, merging LoRA). LoRA has no need of
    them: the frozen base and a small trainable state fit where full fine-tuning would not."""
    wanted = [name for name, on in (("lora=true", settings.lora),
                                    ("validation=", settings.validation),
                                    (f"select={rule}", rule != "none"),
                                    ("eval_every", eval_every)) if on]
    if wanted:
        kind = "DeepSpeed ZeRO-3" if zero3(accelerator) else "FSDP"
        raise ValueError(f"{', '.join(wanted)}: not available under {kind}, which shards the "
                         f"weights; launch with configs/accelerate/ddp.yaml (whole weights on "
                         f"each GPU, LoRA for a large model), or drop the setting")


def _selection(selector, model, progress: dict, every: int, total_steps: int,
               window_start: int = 0, reference: Reference | None = None, log=None):
    """The trainer's after-step hook for ``selector`` (None without one). A fresh run is checked
    once before its first step, the reference later checks are judged against, then every
    ``every`` steps after step ``window_start`` and at the last step. The trail lives in
    ``progress``, so a resumed run carries on with it. With a ``reference``, bounded ascent
    follows never-seen text: ascent damages the model for all text, so the level it aims at is
    the calibration non-members' NLL at the latest check, not only before the first step."""
    if selector is None:
        return None
    selector.trail = progress.setdefault("selection_trail", [])

    def follow_level() -> None:
        levels = [t["nonmember_nll"] for t in selector.trail if "nonmember_nll" in t]
        if reference is not None and levels:
            reference.forget_level = levels[-1]

    def check(step: int) -> bool:
        started = time.perf_counter()
        stop = selector.check(model, step)
        entry = selector.trail[-1]
        follow_level()
        # what choosing costs; a full evaluation recorded beside it (select_audit) is apart
        entry["seconds"] = (time.perf_counter() - started
                            - entry.get("audit", {}).get("seconds", 0.0))
        if log is not None:
            log(scalars(entry, "selection"), step=step)
        return stop

    follow_level()  # a resumed run aims where it was aiming
    if not selector.trail and selector.keeper is not None:
        check(0)
    return lambda step: ((step > window_start and (step - window_start) % every == 0)
                         or step == total_steps) and check(step)


def _selection_record(selector, model, progress: dict, settings, every: int) -> dict | None:
    """``run.json``'s ``selection``: the rule, every check and the step whose model is kept
    (loaded into ``model``); None without a rule."""
    if selector is None:
        return None
    trail = progress.get("selection_trail", [])
    kept = selector.keeper.restore(model) if selector.keeper is not None else None
    return {"rule": selector.name, **selector.describe(),
            "every": every,
            "patience": settings.select_patience, "trail": trail,
            "kept_step": kept["step"] if kept else (trail[-1]["step"] if trail else None),
            "seconds": sum(t.get("seconds", 0.0) for t in trail),
            "seconds_before_training": sum(t.get("seconds", 0.0) for t in trail
                                           if t["step"] == 0)}


def _validation_loss(settings, tokenizer, accelerator):
    """Joint loss on a validation split: mean CE of its retain rows minus that of its forget
    rows (what unlearning minimises)."""
    data = load_lume(settings.validation)
    examples = (_examples(tokenizer, data.forget, True, settings)
                + _examples(tokenizer, data.retain, False, settings))

    def measure(model) -> float:  # called by Keeper, without gradients
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
