"""Build a target: a causal LM that has memorised a LUME-format dataset.

The SemEval-2025 Task 4 organisers fine-tuned OLMo until it had memorised the task documents. With
no hub at hand, this trains an OLMo-architecture model from scratch the same way, in two phases:

1. ``pretrain``: the general corpus for a token budget, not to memorisation, so that a document
   the model never saw later gets a moderate loss, as it would from a real pretrained LLM;
2. ``memorise``: every forget and retain row (``input + " " + output + eos``) and the
   general-knowledge questions, replaying corpus pieces so general ability is not overwritten,
   until greedy decoding reproduces every row.

With ``init`` an existing local HF causal LM is fine-tuned instead (phase 2 only, unless a corpus
is given; ``pretrain_tokens=0`` keeps the corpus for replay only). ``epochs=0`` stops after phase
1: a pretrained base that a target and its oracle can both start from (``unlearn.bench``
does). Work happens in a staging directory that survives a crash: rerunning the same command
resumes from the last checkpoint (epoch boundary, so the result is the same as an uninterrupted
run). The output directory appears only when the target is complete.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from statistics import fmean

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from transformers import OlmoConfig, OlmoForCausalLM

from .accel import make_accelerator, numel, start_logging, stop_logging
from .data import beside_data, load_corpus, load_lume, load_mia, load_mmlu
from .io import TARGET, atomic_directory, claim_output, fingerprint, path_text, staging_path
from .measure.memorisation import score_rows, task_means
from .measure.mmlu import mmlu_accuracy
from .measure.nll import document_nll, token_stats
from .models.forward import next_token_nll
from .models.loading import (
    check_model_dir,
    load_model,
    load_tokenizer,
    model_fingerprint,
    trained_from_scratch,
)
from .models.presets import TargetPreset, preset_settings
from .models.sequences import from_start, length_sorted_batches, pad, training_sequence
from .models.tokenizer import train_tokenizer
from .settings import check_seed
from .training import (
    Epoch,
    NonFiniteLoss,
    Segment,
    Trainer,
    checkpoint_minutes,
    resume_progress,
    save_copy,
    save_final,
)

#: where a target that pretrains keeps the model as it was before memorising: the teacher
#: unlearning draws forget rows to (unlearn.models.loading.teacher_of)
BASE = "base"


class _Examples:
    """Tokenized training material as ``(ids, answer_start)`` pairs: memorisation examples, one
    sequence per (prompt, answer), and the corpus packed as in LM pretraining (documents joined
    by EOS, cut into full blocks, which keeps every batch dense; no answer in them)."""

    def __init__(self, tokenizer, pairs: list[tuple[str, str]], corpus: list[str], max_len: int):
        eos = tokenizer.eos_token_id
        self.rows = [training_sequence(tokenizer, p, a, max_len, eos=True) for p, a in pairs]
        stream = [t for doc in corpus for t in tokenizer(doc).input_ids + [eos]]
        blocks = [stream[i:i + max_len] for i in range(0, len(stream), max_len)]
        self.corpus = [(b, len(b)) for b in blocks]


def _plan_epoch(items: list[tuple[list[int], int]], batch_tokens: int, max_rows: int,
                rng: random.Random) -> list[list[tuple[list[int], int]]]:
    """Batches for one epoch: similar lengths together (jittered so batches change between
    epochs), batch order shuffled."""
    jittered = [len(ids) + rng.randrange(32) for ids, _ in items]
    batches = length_sorted_batches(jittered, batch_tokens, max_rows)
    rng.shuffle(batches)
    return [[items[i] for i in b] for b in batches]


def _plan(examples: _Examples, preset: TargetPreset, seed: int) -> list[Epoch]:
    """Every epoch's batches, fixed up front by the seed (one micro-batch per step)."""
    plan = []
    budget = preset.pretrain_tokens if examples.corpus else 0
    epoch = 0
    while budget > 0:
        rng = random.Random(f"{seed}/pretrain/{epoch}")
        steps = []
        for batch in _plan_epoch(examples.corpus, preset.pretrain_batch_tokens, preset.max_rows,
                                 rng):
            if budget <= 0:
                break
            steps.append([batch])
            budget -= sum(len(ids) for ids, _ in batch)
        plan.append(Epoch(0, "pretrain", steps))
        epoch += 1
    replayed = 0
    if examples.corpus:
        task_tokens = sum(len(ids) for ids, _ in examples.rows)
        replayed = max(1, round(preset.replay * task_tokens / len(examples.corpus[0][0])))
    for epoch in range(preset.epochs):
        rng = random.Random(f"{seed}/memorise/{epoch}")
        picks = rng.sample(range(max(replayed, len(examples.corpus))), replayed)
        replay = [examples.corpus[i % len(examples.corpus)] for i in picks]
        batches = _plan_epoch(examples.rows + replay, preset.batch_tokens, preset.max_rows, rng)
        plan.append(Epoch(0, "memorise", [[b] for b in batches]))
    return plan


def _segments(plan: list[Epoch], preset: TargetPreset) -> list[Segment]:
    """Warm-up then cosine decay, once over the pretraining steps (peak ``pretrain_lr``) and once
    again over the memorising steps (peak ``lr``); one optimizer throughout."""
    segments = []
    for name, peak in (("pretrain", preset.pretrain_lr), ("memorise", preset.lr)):
        steps = sum(len(e.steps) for e in plan if e.name == name)
        if steps:
            segments.append(Segment(steps, peak, min(preset.warmup_steps, steps // 10)))
    return segments


def _tokenizer_text(corpus: list[str], pairs: list[tuple[str, str]], mia) -> list[str]:
    """What the tokenizer learns its merges from. A real LLM's tokenizer predates the documents
    it later memorises, so: the general corpus alone. One fitted to the task rows compresses them
    better than unseen documents of the same style, and per-token loss then tells members from
    non-members before any training (an oracle would fail the MIA). Without a corpus: the task
    rows and the MIA non-members together, so both sides of the MIA tokenize alike."""
    if corpus:
        return corpus
    extra = [d.document for d in mia.nonmember] if mia is not None else []
    return [p + " " + a for p, a in pairs] + extra


class _LmLoss:
    """Next-token loss over every non-padding token of a batch of ``(ids, answer_start)``
    sequences, with the label smoothing of the phase being trained (``smoothing``, set before
    each epoch); answer tokens count ``answer_weight`` times a prompt token."""

    def __init__(self, model, pad_id: int, device, answer_weight: float = 1.0):
        self.model, self.pad_id, self.device = model, pad_id, device
        self.answer_weight = answer_weight
        self.smoothing = 0.0

    def __call__(self, batch: list[tuple[list[int], int]]):
        ids, mask = pad([seq for seq, _ in batch], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        _, token_loss = next_token_nll(self.model, ids, mask, self.smoothing)
        # column i scores token i + 1: an answer token once i + 1 reaches the row's answer start
        answer = from_start([start for _, start in batch], ids.shape[1], ids.device, first=1)
        real = F.pad(mask[:, 1:], (0, 1))  # a token to predict: not padding, not past the end
        weight = real * torch.where(answer, self.answer_weight, 1.0)
        return (token_loss * weight).sum() / weight.sum(), int(mask.sum())


def _new_model(tokenizer, preset: TargetPreset) -> OlmoForCausalLM:
    config = OlmoConfig(vocab_size=len(tokenizer), hidden_size=preset.hidden_size,
                        intermediate_size=preset.intermediate_size,
                        num_hidden_layers=preset.num_layers, num_attention_heads=preset.num_heads,
                        max_position_embeddings=max(preset.max_len, 1024),
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=None, tie_word_embeddings=True)
    return OlmoForCausalLM(config)


def _mean_nll(model, tokenizer, docs, desc: str) -> float:
    return fmean(document_nll(model, tokenizer, [d.document for d in docs], desc=desc))


def _mia_means(model, tokenizer, mia) -> dict[str, float] | None:
    if mia is None:
        return None
    return {name: _mean_nll(model, tokenizer, docs, name)
            for name, docs in (("member_nll", mia.member), ("nonmember_nll", mia.nonmember))}


def build_target(data: str | Path, out: str | Path, preset: str = "small",
                 init: str | Path | None = None, pretrain="auto", mmlu="auto", mia="auto",
                 seed: int = 0, oracle: bool = False, split: str | None = None,
                 **overrides) -> dict:
    """Train a target that has memorised the LUME dataset in ``data``; write it to ``out``.

    ``pretrain``, ``mmlu`` and ``mia`` name a pretraining corpus, MMLU-format general-knowledge
    questions (learned alongside the task rows) and an MIA set (measured, never trained on);
    "auto" takes ``data/pretrain``, ``data/mmlu`` and ``data/mia`` when they exist (the layout of
    :func:`unlearn.data.synthesize`). ``overrides`` change :class:`TargetPreset` fields.
    ``oracle`` builds the gold standard instead: the same recipe memorising the retain rows
    only, a model that never saw the forget set.
    ``split`` chooses one data split where ``data`` holds several (the official parquet snapshot).
    Returns the ``target.json`` record. Rerunning after an interruption resumes.
    """
    data, out = Path(data), Path(out)
    settings = _checked_settings(preset, overrides, seed, init)
    pretrain, mmlu, mia = (beside_data(data, pretrain, "pretrain"),
                           beside_data(data, mmlu, "mmlu"), beside_data(data, mia, "mia"))
    claim_output(out, TARGET, {"--data": data, "--init": init, "--pretrain": pretrain,
                               "--mmlu": mmlu, "--mia": mia})
    lume = load_lume(data, split)
    corpus = load_corpus(pretrain) if pretrain else []
    questions = load_mmlu(mmlu) if mmlu else []
    mia_docs = load_mia(mia) if mia else None
    data_hash = fingerprint([(r.id, r.input, r.output, r.task, r.split) for r in lume.rows],
                            corpus, [q.text for q in questions])
    run_id = fingerprint(data_hash, asdict(settings), seed,
                         model_fingerprint(init) if init else None, oracle)

    set_seed(seed)
    accelerator = make_accelerator(settings.precision, micro_batch=settings.max_rows,
                                   report_to=settings.report_to,
                                   logging_dir=staging_path(out) / "logs")
    started = time.perf_counter()
    main = accelerator.is_main_process  # in a distributed run, the one that writes files
    with atomic_directory(out, TARGET, resumable=True, publish=main) as staging:
        progress = resume_progress(accelerator, staging, run_id)
        memorised = lume.retain if oracle else lume.rows
        pairs = [(r.input, r.output) for r in memorised] + [(q.prompt, q.answer) for q in questions]
        model, tokenizer = _model_and_tokenizer(
            init, staging, accelerator, settings, lambda: _tokenizer_text(corpus, pairs, mia_docs))
        model.train()
        examples = _Examples(tokenizer, pairs, corpus, settings.max_len)
        plan = _plan(examples, settings, seed)
        trainer = Trainer(accelerator, model, plan, _segments(plan, settings), staging,
                          weight_decay=settings.weight_decay, betas=(0.9, 0.95))
        hooks = _Hooks(trainer.model, accelerator, tokenizer, examples, plan, settings, mia_docs,
                       progress, staging / BASE)
        progress = _train(trainer, hooks, progress, settings, staging)
        trainer.save(progress)  # the finished weights, should evaluation below be interrupted
        bare = hooks.bare
        memorisation = _memorisation(bare, tokenizer, lume, hooks.memorises, questions, mia_docs)
        history = progress["history"]
        tokens = sum(r["tokens"] for r in history)
        seconds = sum(r["seconds"] for r in history)
        record = {
            "data": str(data), "split": split, "data_hash": data_hash, "preset": preset,
            "seed": seed,
            "oracle": oracle,
            "init": path_text(init),
            # the model before memorising, which never saw the documents: unlearning's teacher
            "base": (BASE if progress.get("base_saved")
                     else str(Path(init).resolve()) if init else None),
            "from_scratch": init is None or trained_from_scratch(init),
            "pretrain": path_text(pretrain),
            "mmlu": path_text(mmlu), "mia": path_text(mia),
            "settings": asdict(settings),
            "mixed_precision": accelerator.mixed_precision,  # what `precision` resolved to
            "parameters": sum(numel(p) for p in bare.parameters()),
            "epochs": dict(Counter(r["name"] for r in history)),
            "train_seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds,
            "wall_seconds_this_run": time.perf_counter() - started,
            "after_pretrain": progress.get("after_pretrain"),
            "memorisation": memorisation, "history": history,
        }
        save_final(accelerator, trainer.model, bare, tokenizer, staging, "target.json", record)
    return record


def _checked_settings(preset: str, overrides: dict, seed: int, init) -> TargetPreset:
    """The preset with ``overrides``, once the seed, the checkpoint interval and the ``init``
    model directory have been checked: before the staging directory, so a refusal leaves
    nothing behind."""
    check_seed(seed)
    checkpoint_minutes()
    if init is not None:
        check_model_dir(init)
    return preset_settings(preset, overrides)


def _train(trainer: Trainer, hooks: _Hooks, progress: dict, settings: TargetPreset,
           staging: Path) -> dict:
    """The loop, its training curves logged; a non-finite loss says how to go on."""
    start_logging(trainer.acc, "unlearn-target", asdict(settings))
    try:
        return trainer.run(progress, hooks.loss, hooks.after_epoch, hooks.before_epoch)
    except NonFiniteLoss as e:
        raise FloatingPointError(
            f"{e}; lower the learning rate (lr= or pretrain_lr=) and rerun: training "
            f"resumes from the last checkpoint in {staging}") from e
    finally:
        stop_logging(trainer.acc)


def _model_and_tokenizer(init, staging: Path, accelerator, settings, tokenizer_text):
    """The model to train: ``init`` as it is, or a new one with a tokenizer trained on
    ``tokenizer_text()`` (once, by the main process; a resumed run finds it in ``staging``)."""
    if init is not None:
        return load_model(init)
    if accelerator.is_main_process and not (staging / "tokenizer.json").exists():
        train_tokenizer(tokenizer_text(), settings.vocab_size).save_pretrained(staging)
    accelerator.wait_for_everyone()  # one tokenizer, trained once, for every process
    tokenizer = load_tokenizer(staging)
    return _new_model(tokenizer, settings), tokenizer


class _Hooks:
    """The trainer's hooks for a target: the loss (label smoothing while memorising only),
    non-members measured and the pretrained model saved to ``base`` once pretraining ends, and a
    stop once every row is memorised."""

    def __init__(self, model, accelerator, tokenizer, examples, plan, settings, mia_docs,
                 progress: dict, base: Path):
        self.model, self.tokenizer, self.examples, self.plan = model, tokenizer, examples, plan
        self.accelerator, self.base = accelerator, base
        self.settings, self.mia_docs, self.progress = settings, mia_docs, progress
        self.bare = accelerator.unwrap_model(model)  # the module itself, to measure and save
        names = [e.name for e in plan]
        self.memorises = "memorise" in names
        self.first_memorise = names.index("memorise") if self.memorises else len(plan)
        self.loss = _LmLoss(model, tokenizer.pad_token_id, accelerator.device,
                            settings.answer_weight)
        if "pretrain" not in names and mia_docs is not None and "after_pretrain" not in progress:
            # fine-tuning a pretrained model (init): its own non-member loss is the baseline
            progress["after_pretrain"] = _mia_means(self.bare, tokenizer, mia_docs)

    def before_epoch(self, index: int) -> None:
        memorising = self.plan[index].name == "memorise"
        self.loss.smoothing = self.settings.label_smoothing if memorising else 0.0

    def after_epoch(self, index: int, record: dict) -> bool:
        phase, plan = record["name"], self.plan
        last_pretrain = phase == "pretrain" and (index + 1 == len(plan)
                                                 or plan[index + 1].name != "pretrain")
        self.model.eval()
        try:
            if last_pretrain and self.mia_docs is not None:
                self.progress["after_pretrain"] = _mia_means(self.bare, self.tokenizer,
                                                             self.mia_docs)
            if last_pretrain and self.memorises:
                save_copy(self.accelerator, self.model, self.bare, self.tokenizer, self.base)
                self.progress["base_saved"] = True
            memorise_epoch = index - self.first_memorise
            if phase != "memorise" or (memorise_epoch + 1) % self.settings.check_every:
                return False
            seqs, starts = zip(*self.examples.rows)
            losses, exact = token_stats(self.bare, list(seqs), list(starts),
                                        self.tokenizer.pad_token_id, desc="check")
            if self.mia_docs is not None:  # how far unseen text has drifted so far
                record["nonmember_nll"] = _mean_nll(self.bare, self.tokenizer,
                                                    self.mia_docs.nonmember, "non-members")
        finally:
            self.model.train()
        record["memorised"] = fmean(exact)
        record["answer_loss"] = fmean(losses)
        return all(exact)


def _memorisation(bare, tokenizer, lume, memorises: bool, questions, mia_docs) -> dict:
    """What the finished model knows: each split's scores per task (a base, which has
    memorised nothing, skips them), MMLU accuracy, non-member and member losses."""
    bare.eval()
    bare.generation_config.pad_token_id = tokenizer.pad_token_id
    bare.generation_config.eos_token_id = tokenizer.eos_token_id
    summary = {split: task_means(rows, score_rows(bare, tokenizer, rows))
               for split, rows in (("forget", lume.forget), ("retain", lume.retain))
               if memorises}
    if questions:
        summary["mmlu_accuracy"] = mmlu_accuracy(bare, tokenizer, questions)
    if mia_docs is not None:
        summary["mia"] = _mia_means(bare, tokenizer, mia_docs)
    return summary
