"""Build a target: a causal LM that has memorised a LUME-format dataset.

The SemEval-2025 Task 4 organisers fine-tuned OLMo until it had memorised the task documents. With
no hub at hand, this trains an OLMo-architecture model from scratch the same way, in two phases:

1. ``pretrain``: the general corpus for a token budget, not to memorisation, so that a document
   the model never saw later gets a moderate loss, as it would from a real pretrained LLM;
2. ``memorise``: every forget and retain row (``input + " " + output + eos``) and the
   general-knowledge questions, replaying corpus pieces so general ability is not overwritten,
   until greedy decoding reproduces every row.

With ``init`` an existing local HF causal LM is fine-tuned instead (phase 2 only, unless a corpus
is given). Work happens in a staging directory that survives a crash: rerunning the same command
resumes from the last checkpoint (epoch boundary, so the result is the same as an uninterrupted
run). The output directory appears only when the target is complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from statistics import fmean

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import OlmoConfig, OlmoForCausalLM

from ..data import load_corpus, load_lume, load_mia, load_mmlu
from ..evaluate.batching import length_sorted_batches, pad
from ..evaluate.memorisation import score_rows, task_means
from ..evaluate.mmlu import mmlu_accuracy
from ..evaluate.nll import document_nll, token_stats
from ..accel import make_accelerator
from ..io import atomic_directory, write_json
from .loading import load_model, load_tokenizer
from .presets import PRESETS, TargetPreset
from .tokenizer import train_tokenizer

CHECKPOINT_MINUTES = 2.0


def fingerprint(*parts: object) -> str:
    """A short stable hash of JSON-able parts (data contents, settings)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _discover(data: Path, given, name: str):
    """``given`` unless it is "auto": then ``data/name`` when that exists, else None."""
    if given != "auto":
        return Path(given) if given else None
    return data / name if (data / name).is_dir() else None


class _Examples:
    """Tokenized training material: memorisation examples, one sequence per (prompt, answer), and
    the corpus packed as in LM pretraining (documents joined by EOS, cut into full blocks), which
    keeps every batch dense."""

    def __init__(self, tokenizer, pairs: list[tuple[str, str]], corpus: list[str], max_len: int):
        eos = tokenizer.eos_token_id
        self.seqs = [tokenizer(p + " " + a).input_ids[: max_len - 1] + [eos] for p, a in pairs]
        self.starts = [min(len(tokenizer(p).input_ids), len(s) - 1)
                       for (p, _), s in zip(pairs, self.seqs)]
        stream = [t for doc in corpus for t in tokenizer(doc).input_ids + [eos]]
        self.corpus = [stream[i:i + max_len] for i in range(0, len(stream), max_len)]


def _plan_epoch(seqs: list[list[int]], preset: TargetPreset,
                rng: random.Random) -> list[list[list[int]]]:
    """Batches for one epoch: similar lengths together (jittered so batches change between
    epochs), batch order shuffled."""
    jittered = [len(s) + rng.randrange(32) for s in seqs]
    batches = length_sorted_batches(jittered, preset.batch_tokens, preset.max_rows)
    rng.shuffle(batches)
    return [[seqs[i] for i in b] for b in batches]


def _plan(examples: _Examples, preset: TargetPreset, seed: int) -> list[tuple[str, list]]:
    """``(phase, batches)`` for every epoch, fixed up front by the seed: the LR schedule knows its
    length and a resumed run sees exactly the batches an uninterrupted one would."""
    plan = []
    budget = preset.pretrain_tokens if examples.corpus else 0
    epoch = 0
    while budget > 0:
        rng = random.Random(f"{seed}/pretrain/{epoch}")
        batches = []
        for batch in _plan_epoch(examples.corpus, preset, rng):
            if budget <= 0:
                break
            batches.append(batch)
            budget -= sum(len(s) for s in batch)
        plan.append(("pretrain", batches))
        epoch += 1
    replayed = 0
    if examples.corpus:
        task_tokens = sum(len(s) for s in examples.seqs)
        replayed = max(1, round(preset.replay * task_tokens / len(examples.corpus[0])))
    for epoch in range(preset.epochs):
        rng = random.Random(f"{seed}/memorise/{epoch}")
        picks = rng.sample(range(max(replayed, len(examples.corpus))), replayed)
        replay = [examples.corpus[i % len(examples.corpus)] for i in picks]
        plan.append(("memorise", _plan_epoch(examples.seqs + replay, preset, rng)))
    return plan


def _schedule(plan: list[tuple[str, list]], preset: TargetPreset):
    """Learning rate per step: warm-up then cosine decay, once over the pretraining steps (peak
    ``pretrain_lr``) and once again over the memorising steps (peak ``lr``)."""
    phases = []
    for name, peak in (("pretrain", preset.pretrain_lr), ("memorise", preset.lr)):
        steps = sum(len(b) for phase, b in plan if phase == name)
        if steps:
            phases.append((steps, peak, min(preset.warmup_steps, steps // 10)))

    def lr_at(step: int) -> float:
        for steps, peak, warmup in phases:
            if step < steps:
                if step < warmup:
                    return peak * (step + 1) / warmup
                progress = (step - warmup) / max(1, steps - warmup)
                return peak * 0.5 * (1 + math.cos(math.pi * progress))
            step -= steps
        return 0.0

    return lr_at


class _Trainer:
    """Trains through a plan of epochs; checkpoints (``stage/checkpoint``) at epoch boundaries."""

    def __init__(self, accelerator: Accelerator, model, pad_id: int, stage: Path,
                 preset: TargetPreset, plan: list[tuple[str, list]]):
        self.acc, self.model, self.pad_id, self.stage = accelerator, model, pad_id, stage
        self.plan = plan
        # one optimizer and one schedule for both phases: lr is set absolutely by the schedule
        optimizer = torch.optim.AdamW(model.parameters(), lr=1.0, betas=(0.9, 0.95),
                                      weight_decay=preset.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(plan, preset))
        self.optimizer, self.scheduler = accelerator.prepare(optimizer, scheduler)

    def save(self, progress: dict) -> None:
        # pickled, not safetensors: safetensors drops the tied LM-head weight with a warning
        self.acc.save_state(str(self.stage / "checkpoint"), safe_serialization=False)
        write_json(self.stage / "progress.json", progress)

    def resume(self, progress: dict) -> int:
        """The epoch to start from; loads the checkpoint when there is one."""
        if (self.stage / "checkpoint").is_dir() and progress.get("epoch"):
            self.acc.load_state(str(self.stage / "checkpoint"))
            return progress["epoch"]
        return 0

    def step(self, batch: list[list[int]], where: str) -> tuple[float, int]:
        ids, mask = pad(batch, self.pad_id)
        ids, mask = ids.to(self.acc.device), mask.to(self.acc.device)
        labels = ids.masked_fill(mask == 0, -100)
        with self.acc.autocast():
            loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{where}: loss became {loss.item()}; lower the learning rate (lr= or "
                f"pretrain_lr=) and rerun: training resumes from the last checkpoint in "
                f"{self.stage}")
        self.acc.backward(loss)
        self.acc.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), int(mask.sum())

    def run(self, progress: dict, after_epoch) -> dict:
        """Train from the checkpointed epoch on; ``after_epoch(index, phase, record)`` may
        measure, and returns True to stop (memorised)."""
        start = self.resume(progress)
        if progress.get("done"):
            return progress
        history = progress.setdefault("history", [])
        bar = tqdm(total=sum(len(b) for _, b in self.plan),
                   initial=sum(len(b) for _, b in self.plan[:start]), unit="step",
                   dynamic_ncols=True)
        last_save = time.monotonic()
        for index in range(start, len(self.plan)):
            phase, batches = self.plan[index]
            bar.set_description(phase)
            losses, tokens, t0 = [], 0, time.perf_counter()
            for batch in batches:
                loss, n = self.step(batch, f"{phase} epoch {index}")
                losses.append(loss)
                tokens += n
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}",
                                tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
            record = {"phase": phase, "epoch": index, "loss": fmean(losses) if losses else None,
                      "tokens": tokens, "seconds": time.perf_counter() - t0}
            stop = after_epoch(index, phase, record)
            history.append(record)
            progress["epoch"] = index + 1
            if stop:
                break
            if time.monotonic() - last_save > CHECKPOINT_MINUTES * 60:
                self.save(progress)
                last_save = time.monotonic()
        bar.close()
        progress["done"] = True
        return progress


def _new_model(tokenizer, preset: TargetPreset) -> OlmoForCausalLM:
    config = OlmoConfig(vocab_size=len(tokenizer), hidden_size=preset.hidden_size,
                        intermediate_size=preset.intermediate_size,
                        num_hidden_layers=preset.num_layers, num_attention_heads=preset.num_heads,
                        max_position_embeddings=max(preset.max_len, 1024),
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=None, tie_word_embeddings=True)
    return OlmoForCausalLM(config)


def _mia_means(model, tokenizer, mia) -> dict[str, float] | None:
    if mia is None:
        return None
    return {name: fmean(document_nll(model, tokenizer, [d.document for d in docs], desc=name))
            for name, docs in (("member_nll", mia.member), ("nonmember_nll", mia.nonmember))}


def build_target(data: str | Path, out: str | Path, preset: str = "small",
                 init: str | Path | None = None, pretrain="auto", mmlu="auto", mia="auto",
                 seed: int = 0, **overrides) -> dict:
    """Train a target that has memorised the LUME dataset in ``data``; write it to ``out``.

    ``pretrain``, ``mmlu`` and ``mia`` name a pretraining corpus, MMLU-format general-knowledge
    questions (learned alongside the task rows) and an MIA set (measured, never trained on);
    "auto" takes ``data/pretrain``, ``data/mmlu`` and ``data/mia`` when they exist (the layout of
    :func:`unlearn.data.synthesize`). ``overrides`` change :class:`TargetPreset` fields.
    Returns the ``target.json`` record. Rerunning after an interruption resumes.
    """
    data, out = Path(data), Path(out)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    settings = PRESETS[preset].override(**overrides)
    pretrain, mmlu, mia = (_discover(data, pretrain, "pretrain"), _discover(data, mmlu, "mmlu"),
                           _discover(data, mia, "mia"))
    lume = load_lume(data)
    corpus = load_corpus(pretrain) if pretrain else []
    questions = load_mmlu(mmlu) if mmlu else []
    mia_docs = load_mia(mia) if mia else None
    data_hash = fingerprint([(r.id, r.input, r.output, r.task, r.split) for r in lume.rows],
                            corpus, [q.text for q in questions])
    run_id = fingerprint(data_hash, asdict(settings), seed, str(init))

    set_seed(seed)
    accelerator = make_accelerator(settings.precision)
    started = time.perf_counter()
    with atomic_directory(out, resumable=True) as stage:
        progress_file = stage / "progress.json"
        progress = json.loads(progress_file.read_text()) if progress_file.exists() else {}
        if progress.get("run_id") != run_id:  # other inputs or settings: start over
            shutil.rmtree(stage)
            stage.mkdir()
            progress = {"run_id": run_id}
        pairs = [(r.input, r.output) for r in lume.rows] + [(q.prompt, q.answer) for q in questions]
        if init is not None:
            model, tokenizer = load_model(init)
        else:
            if (stage / "tokenizer.json").exists():
                tokenizer = load_tokenizer(stage)
            else:
                tokenizer = train_tokenizer(corpus + [p + " " + a for p, a in pairs],
                                            settings.vocab_size)
                tokenizer.save_pretrained(stage)
            model = _new_model(tokenizer, settings)
        model.train()
        model = accelerator.prepare(model)
        examples = _Examples(tokenizer, pairs, corpus, settings.max_len)
        plan = _plan(examples, settings, seed)
        trainer = _Trainer(accelerator, model, tokenizer.pad_token_id, stage, settings, plan)
        first_memorise = [phase for phase, _ in plan].index("memorise")

        def after_epoch(index: int, phase: str, record: dict) -> bool:
            """Measure non-members once pretraining ends; stop once every row is memorised."""
            last_pretrain = phase == "pretrain" and (index + 1 == len(plan)
                                                     or plan[index + 1][0] != "pretrain")
            model.eval()
            try:
                if last_pretrain and mia_docs is not None:
                    progress["after_pretrain"] = _mia_means(accelerator.unwrap_model(model),
                                                            tokenizer, mia_docs)
                memorise_epoch = index - first_memorise
                if phase != "memorise" or (memorise_epoch + 1) % settings.check_every:
                    return False
                losses, exact = token_stats(accelerator.unwrap_model(model), examples.seqs,
                                            examples.starts, tokenizer.pad_token_id,
                                            desc="check")
            finally:
                model.train()
            record["memorised"] = fmean(exact)
            record["answer_loss"] = fmean(losses)
            return all(exact)

        progress = trainer.run(progress, after_epoch)
        trainer.save(progress)  # the finished weights, should evaluation below be interrupted

        final = accelerator.unwrap_model(model)
        final.eval()
        final.generation_config.pad_token_id = tokenizer.pad_token_id
        final.generation_config.eos_token_id = tokenizer.eos_token_id
        summary = {split: task_means(rows, score_rows(final, tokenizer, rows))
                   for split, rows in (("forget", lume.forget), ("retain", lume.retain))}
        if questions:
            summary["mmlu_accuracy"] = mmlu_accuracy(final, tokenizer, questions)
        if mia_docs is not None:
            summary["mia"] = _mia_means(final, tokenizer, mia_docs)
        history = progress["history"]
        tokens = sum(r["tokens"] for r in history)
        seconds = sum(r["seconds"] for r in history)
        record = {
            "data": str(data), "data_hash": data_hash, "preset": preset, "seed": seed,
            "init": str(init) if init else None, "pretrain": str(pretrain) if pretrain else None,
            "mmlu": str(mmlu) if mmlu else None, "mia": str(mia) if mia else None,
            "settings": asdict(settings),
            "parameters": sum(p.numel() for p in final.parameters()),
            "epochs": dict(Counter(r["phase"] for r in history)),
            "train_seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds,
            "wall_seconds_this_run": time.perf_counter() - started,
            "after_pretrain": progress.get("after_pretrain"),
            "memorisation": summary, "history": history,
        }
        shutil.rmtree(stage / "checkpoint", ignore_errors=True)
        (stage / "progress.json").unlink()
        final.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        write_json(stage / "target.json", record)
    return record
