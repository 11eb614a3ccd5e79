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
from dataclasses import asdict
from pathlib import Path
from statistics import fmean

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import OlmoConfig, OlmoForCausalLM, get_cosine_schedule_with_warmup

from ..data import load_corpus, load_lume, load_mia, load_mmlu
from ..evaluate.batching import length_sorted_batches, pad
from ..evaluate.memorisation import score_rows, task_means
from ..evaluate.mmlu import mmlu_accuracy
from ..evaluate.nll import document_nll, token_stats
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
    """Tokenized training material: memorisation examples (prompt, answer) and corpus pieces."""

    def __init__(self, tokenizer, pairs: list[tuple[str, str]], corpus: list[str], max_len: int):
        eos = tokenizer.eos_token_id
        self.seqs = [tokenizer(p + " " + a).input_ids[: max_len - 1] + [eos] for p, a in pairs]
        self.starts = [min(len(tokenizer(p).input_ids), len(s) - 1)
                       for (p, _), s in zip(pairs, self.seqs)]
        self.corpus = []
        for doc in corpus:
            ids = tokenizer(doc).input_ids + [eos]
            self.corpus += [ids[i:i + max_len] for i in range(0, len(ids), max_len)]


def _plan_epoch(seqs: list[list[int]], preset: TargetPreset, rng: random.Random) -> list[list[list[int]]]:
    """Batches for one epoch: similar lengths together (jittered so batches change between
    epochs), batch order shuffled."""
    jittered = [len(s) + rng.randrange(32) for s in seqs]
    batches = length_sorted_batches(jittered, preset.batch_tokens, preset.max_rows)
    rng.shuffle(batches)
    return [[seqs[i] for i in b] for b in batches]


def _plan(examples: _Examples, preset: TargetPreset, seed: int, phase: str) -> list[list]:
    """Every epoch's batches of a phase, fixed up front by the seed: the LR schedule knows its
    length and a resumed run sees exactly the batches an uninterrupted one would."""
    plan = []
    if phase == "pretrain":
        corpus_tokens = sum(len(s) for s in examples.corpus)
        epochs = math.ceil(preset.pretrain_tokens / max(corpus_tokens, 1))
        budget = preset.pretrain_tokens
        for epoch in range(epochs):
            rng = random.Random(f"{seed}/pretrain/{epoch}")
            batches = []
            for batch in _plan_epoch(examples.corpus, preset, rng):
                if budget <= 0:
                    break
                batches.append(batch)
                budget -= sum(len(s) for s in batch)
            plan.append(batches)
        return plan
    replayed = round(preset.replay * len(examples.seqs)) if examples.corpus else 0
    for epoch in range(preset.epochs):
        rng = random.Random(f"{seed}/memorise/{epoch}")
        replay = [examples.corpus[i % len(examples.corpus)]
                  for i in rng.sample(range(max(replayed, len(examples.corpus))), replayed)]
        plan.append(_plan_epoch(examples.seqs + replay, preset, rng))
    return plan


class _Trainer:
    """One phase of training over a fixed plan, with checkpoints in ``stage/checkpoint``."""

    def __init__(self, accelerator: Accelerator, model, pad_id: int, stage: Path):
        self.acc, self.model, self.pad_id, self.stage = accelerator, model, pad_id, stage
        self.progress_file = stage / "progress.json"

    def progress(self) -> dict:
        return json.loads(self.progress_file.read_text()) if self.progress_file.exists() else {}

    def save(self, progress: dict) -> None:
        self.acc.save_state(str(self.stage / "checkpoint"))
        write_json(self.progress_file, progress)

    def run(self, phase: str, plan: list, lr: float, preset: TargetPreset, progress: dict,
            done_after=None) -> dict:
        """Train through ``plan``; ``done_after(epoch)`` may end the phase early (memorised)."""
        finished = phase in progress.get("finished", [])
        latest = progress.get("phase") == phase
        if finished and not latest:  # a later phase's checkpoint holds the weights
            return progress
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.95),
                                      weight_decay=preset.weight_decay)
        total = sum(len(b) for b in plan)
        scheduler = get_cosine_schedule_with_warmup(optimizer, min(preset.warmup_steps, total // 10),
                                                    total)
        optimizer, scheduler = self.acc.prepare(optimizer, scheduler)
        start = 0
        if latest:
            self.acc.load_state(str(self.stage / "checkpoint"))
            start = progress["epoch"]
        if finished:
            return progress
        progress.update(phase=phase, epoch=start)
        history = progress.setdefault("history", {}).setdefault(phase, [])
        bar = tqdm(total=total, initial=sum(len(b) for b in plan[:start]), desc=phase,
                   unit="step", dynamic_ncols=True)
        last_save = time.monotonic()
        for epoch in range(start, len(plan)):
            losses, tokens, t0 = [], 0, time.perf_counter()
            for batch in plan[epoch]:
                ids, mask = pad(batch, self.pad_id)
                ids, mask = ids.to(self.acc.device), mask.to(self.acc.device)
                labels = ids.masked_fill(mask == 0, -100)
                loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"{phase} epoch {epoch}: loss became {loss.item()}; lower the learning "
                        f"rate (lr=/pretrain_lr=) and rerun: training resumes from the last "
                        f"checkpoint in {self.stage}")
                self.acc.backward(loss)
                self.acc.clip_grad_norm_(self.model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                tokens += int(mask.sum())
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}",
                                tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
            record = {"epoch": epoch, "loss": fmean(losses) if losses else None, "tokens": tokens,
                      "seconds": time.perf_counter() - t0}
            stop = done_after(epoch, record) if done_after else False
            history.append(record)
            progress["epoch"] = epoch + 1
            if stop or epoch + 1 == len(plan):
                break
            if time.monotonic() - last_save > CHECKPOINT_MINUTES * 60:
                self.save(progress)
                last_save = time.monotonic()
        bar.close()
        progress.setdefault("finished", []).append(phase)
        self.save(progress)
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
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    started = time.perf_counter()
    with atomic_directory(out, resumable=True) as stage:
        previous = json.loads((stage / "progress.json").read_text()) \
            if (stage / "progress.json").exists() else {}
        if previous.get("run_id") != run_id:  # different inputs: start over
            shutil.rmtree(stage)
            stage.mkdir()
            previous = {"run_id": run_id}
        pairs = [(r.input, r.output) for r in lume.rows] + [(q.prompt, q.answer) for q in questions]
        if init is not None:
            model, tokenizer = load_model(init)
        elif (stage / "tokenizer.json").exists():
            tokenizer = load_tokenizer(stage)
            model = _new_model(tokenizer, settings)
        else:
            texts = corpus + [p + " " + a for p, a in pairs]
            tokenizer = train_tokenizer(texts, settings.vocab_size)
            tokenizer.save_pretrained(stage)
            model = _new_model(tokenizer, settings)
        model.train()
        model = accelerator.prepare(model)
        examples = _Examples(tokenizer, pairs, corpus, settings.max_len)
        trainer = _Trainer(accelerator, model, tokenizer.pad_token_id, stage)
        progress = previous
        figures = progress.setdefault("figures", {})

        if corpus:
            progress = trainer.run("pretrain", _plan(examples, settings, seed, "pretrain"),
                                   settings.pretrain_lr, settings, progress)
            if "after_pretrain" not in figures and mia_docs is not None:
                model.eval()
                figures["after_pretrain"] = _mia_means(accelerator.unwrap_model(model), tokenizer,
                                                       mia_docs)
                model.train()

        def memorised(epoch: int, record: dict) -> bool:
            if (epoch + 1) % settings.check_every:
                return False
            model.eval()
            losses, exact = token_stats(accelerator.unwrap_model(model), examples.seqs,
                                        examples.starts, tokenizer.pad_token_id, desc="check")
            model.train()
            record["memorised"] = fmean(exact)
            record["answer_loss"] = fmean(losses)
            return all(exact)

        progress = trainer.run("memorise", _plan(examples, settings, seed, "memorise"),
                               settings.lr, settings, progress, done_after=memorised)

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
        tokens = sum(r["tokens"] for phase in history.values() for r in phase)
        seconds = sum(r["seconds"] for phase in history.values() for r in phase)
        record = {
            "data": str(data), "data_hash": data_hash, "preset": preset, "seed": seed,
            "init": str(init) if init else None, "pretrain": str(pretrain) if pretrain else None,
            "mmlu": str(mmlu) if mmlu else None, "mia": str(mia) if mia else None,
            "settings": asdict(settings),
            "parameters": sum(p.numel() for p in final.parameters()),
            "epochs": {phase: len(r) for phase, r in history.items()},
            "train_seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds,
            "wall_seconds_this_run": time.perf_counter() - started,
            "after_pretrain": figures.get("after_pretrain"),
            "memorisation": summary, "history": history,
        }
        shutil.rmtree(stage / "checkpoint", ignore_errors=True)
        (stage / "progress.json").unlink()
        final.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        write_json(stage / "target.json", record)
    return record
