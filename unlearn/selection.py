"""Which model a run keeps, and when it stops: rules checked every ``select_every`` steps.

``score`` (the default whenever an MIA set is given) estimates the LUME final score from what a
user holds: the task aggregate on a sample of the forget and retain rows themselves (the official
score is taken on exactly these rows), the loss-MIA score on a held-out calibration split of the
MIA set, and MMLU when general-knowledge questions are given, else the general-text utility u
of the never-seen calibration documents against the model before unlearning
(:mod:`unlearn.measure.utility`). Models rank by the estimate times u, as the project's S
discounts the final score for damage to general text; a model whose u is flagged ranks below
every unflagged one, whatever its estimate: a user would not keep it. The best-ranked model is
kept; the run stops once ``select_patience`` checks in a row brought no better
one. ``mia`` keeps the model whose calibration AUC is closest to 0.5; ``knowledge`` stops once
the forget questions are no longer answered. Every rule leaves a trail for ``run.json``.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from .data import load_mia, load_mmlu
from .data.lume import LumeData, MiaData, Row
from .io import write_json, writing
from .measure.generation import greedy_generate
from .measure.memorisation import score_rows
from .measure.mmlu import mmlu_accuracy
from .measure.nll import document_nll
from .measure.official import (
    aggregated_terms,
    mia_auc,
    mia_score,
    score_generations,
    score_model,
    split_scores,
    task_aggregate,
)
from .measure.utility import DAMAGED_BELOW, utility
from .models.loading import load_model

SELECT_CHECKS = 12  # checks spread over a run when select_every is 0
MMLU_SAMPLE = 128  # general-knowledge questions an estimate asks


@contextmanager
def evaluating(model):
    """The model in eval mode without gradients for a measurement, back to training after."""
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train()


class Calibration:
    """The held-out split of the MIA set a rule calibrates on, and its loss-MIA AUC."""

    def __init__(self, split: MiaData, tokenizer):
        self.tokenizer = tokenizer
        self.members = [d.document for d in split.member]
        self.nonmembers = [d.document for d in split.nonmember]
        self.ids = [d.id for d in split.member + split.nonmember]

    def auc(self, model) -> tuple[float, list[float]]:
        """The AUC, and the non-members' NLLs (never-seen text, for the utility proxy)."""
        member = document_nll(model, self.tokenizer, self.members, desc="select mia")
        nonmember = self.nonmember_nll(model)
        return mia_auc(member, nonmember), nonmember

    def nonmember_nll(self, model) -> list[float]:
        return document_nll(model, self.tokenizer, self.nonmembers, desc="select mia")


def _save_whole(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``torch.save`` whole or not at all: written beside ``path``, then renamed over it (a
    full disk leaves the kept weights as they were, not a truncated file)."""
    new = path.with_name(path.name + ".new")
    try:
        with writing(new):
            torch.save(tensors, new)
    except BaseException:
        new.unlink(missing_ok=True)
        raise
    new.replace(path)


class Keeper:
    """Keeps, in the staging directory, the trainable weights at which ``measure(model)`` was
    lowest; checkpoints of a resumed run find it there."""

    def __init__(self, staging: Path, name: str, measure, writes: bool = True):
        self.path, self.record = staging / f"best-{name}.pt", staging / f"best-{name}.json"
        self.measure, self.writes = measure, writes

    def check(self, model, where: dict, eligible: bool = True) -> float:
        """Measure the model; keep it when it is ``eligible`` and the best so far."""
        with evaluating(model):
            value = self.measure(model)
        best = self.best()
        # a tie goes to the later model: as good by the measure, and further along (a rule
        # whose measure never moves keeps the fixed schedule's result, not its first step)
        if self.writes and eligible and (best is None or value <= best["value"]):
            _save_whole({k: v.detach().cpu().clone() for k, v in model.named_parameters()
                        if v.requires_grad}, self.path)
            write_json(self.record, {**where, "value": value})
        return value

    def best(self) -> dict | None:
        return json.loads(self.record.read_text()) if self.record.exists() else None

    def restore(self, model) -> dict | None:
        """Load the kept weights into ``model`` and return where they were measured."""
        best = self.best()
        if self.writes and self.path.exists():
            model.load_state_dict(torch.load(self.path, weights_only=True), strict=False)
            self.path.unlink()
            self.record.unlink(missing_ok=True)
        return best


def calibration_split(mia: MiaData, share: float, seed: int, lume: LumeData, model,
                      tokenizer) -> tuple[MiaData, MiaData]:
    """The seeded share of the MIA set a rule calibrates on, and the rest, which scoring keeps
    (``unlearn bench`` scores every model on the rest). The share is stratified: members evenly
    over the forget tasks their documents belong to, non-members evenly along their loss under
    ``model`` (the source model, before any step). A handful of documents drawn at random can
    miss a whole kind of text, and membership judged on it is then judged on other text than
    the rest holds."""
    task = {r.text: r.task for r in lume.forget if r.kind == "sc"}
    with evaluating(model):
        nll = document_nll(model, tokenizer, [d.document for d in mia.nonmember],
                           desc="mia strata")
    return mia.split(share, seed, ([task.get(d.document, "") for d in mia.member], nll))


def scored_rest(mia: str | Path, share: float, seed: int, lume: LumeData,
                model_dir: str | Path) -> MiaData:
    """The MIA documents that a run from ``model_dir`` with ``seed`` leaves out of its
    calibration split: those every model of a comparison is scored on."""
    model, tokenizer = load_model(model_dir, dtype=torch.float32)
    return calibration_split(load_mia(mia), share, seed, lume, model, tokenizer)[1]


def never_seen_level(model, tokenizer, calibration: MiaData) -> float:
    """Median NLL of the calibration split's non-members (text the model never saw): the loss
    bounded ascent aims each forget row at (``forget_target=auto``). The median, not the mean:
    documents gathered at the median of never-seen losses give the loss attack an AUC of 0.5
    whatever the spread of those losses; at the mean of a skewed spread they do not."""
    with evaluating(model):
        return statistics.median(Calibration(calibration, tokenizer).nonmember_nll(model))


def sample_rows(lume: LumeData, per_cell: int, seed: int) -> list[Row]:
    """Up to ``per_cell`` rows of each split, task and kind (all with 0), seeded: every check of
    a run scores the same rows, so two checks differ by the model alone."""
    rng = random.Random(f"{seed}/select-rows")
    cells: dict[tuple[str, str, str], list[Row]] = {}
    for r in lume.rows:
        cells.setdefault((r.split, r.task, r.kind), []).append(r)
    picked = []
    for _, rows in sorted(cells.items()):
        picked += rows if not per_cell or len(rows) <= per_cell else rng.sample(rows, per_cell)
    return picked


def truncated_reference(tokenizer: PreTrainedTokenizerBase, row: Row, tokens: int) -> Row:
    """An sc row whose expected continuation is cut to its first ``tokens`` tokens: a
    generation of that many tokens is then scored against what it could have reproduced."""
    ids = tokenizer(row.output, add_special_tokens=False).input_ids
    if len(ids) <= tokens:
        return row
    return replace(row, output=tokenizer.decode(ids[:tokens]))


def _rank_value(entry: dict) -> float:
    """How a check ranks: its estimate times the general-text utility u (the S a model is judged
    by: a step that forgets a little more for a little damage is not the better one), less 2
    when general text is flagged as damaged (estimates and u lie in 0..1, so every unflagged
    model ranks above every flagged one). A trail recorded before u was has u = 1."""
    u = entry.get("general_utility", 1.0)
    return entry["estimate"] * u - (2.0 if entry.get("damaged") else 0.0)


class ScoreRule:
    """Keep the model with the best estimated final score (see the module docstring)."""

    name = "score"

    def __init__(self, settings, tokenizer, lume: LumeData, calibration: MiaData,
                 mmlu: str | Path | None, staging: Path, seed: int, writes: bool,
                 audit_mia: MiaData | None = None):
        self.tokenizer, self.patience = tokenizer, settings.select_patience
        self.lume, self.audit_mia = lume, audit_mia
        self.sc_tokens = settings.select_sc_tokens
        self.rows = [truncated_reference(tokenizer, r, self.sc_tokens) if r.kind == "sc" else r
                     for r in sample_rows(lume, settings.select_rows, seed)]
        # one generation length for both kinds: QA rows stop early, right or wrong
        self.new_tokens = max([self.sc_tokens] + [len(tokenizer(r.output).input_ids) + 1
                                                  for r in self.rows if r.kind == "qa"])
        self.calibration = Calibration(calibration, tokenizer)
        questions = self.all_questions = load_mmlu(mmlu) if mmlu else []
        self.questions = random.Random(f"{seed}/select-mmlu").sample(
            questions, min(MMLU_SAMPLE, len(questions)))
        self.keeper = Keeper(staging, "score", lambda model: -_rank_value(self._estimate(model)),
                             writes)
        self.trail: list[dict] = []

    def describe(self) -> dict:
        return {"rows": len(self.rows), "sc_tokens": self.sc_tokens,
                "calibration_ids": self.calibration.ids,
                "utility": "mmlu" if self.questions else "never-seen-nll"}

    def _task_aggregate(self, model) -> float:
        """The official task aggregate of the sampled rows (sc rows cut to ``sc_tokens``)."""
        generated = greedy_generate(model, self.tokenizer, [r.input for r in self.rows],
                                    self.new_tokens, desc="select rows",
                                    answers=[r.output if r.kind == "qa" else None
                                             for r in self.rows])
        scored = score_generations(self.rows, [g.text for g in generated],
                                   [float("nan")] * len(self.rows),
                                   [g.stopped_early for g in generated])
        blocks = [split_scores([r for r in scored if r.split == s]) for s in ("forget", "retain")]
        return task_aggregate(aggregated_terms(*blocks)[1])

    def _estimate(self, model) -> dict:
        auc, nonmember = self.calibration.auc(model)
        terms = {"task_aggregate": self._task_aggregate(model), "mia_auc": auc}
        terms["mia_score"] = mia_score(terms["mia_auc"])
        terms["nonmember_nll"] = statistics.median(nonmember)  # the level bounded ascent follows
        # general text against the model the run started from (its first check)
        terms["never_seen_nll"] = statistics.fmean(nonmember)
        before = (self.trail[0].get("never_seen_nll", terms["never_seen_nll"]) if self.trail
                  else terms["never_seen_nll"])  # a trail resumed from before it was recorded
        terms["general_utility"] = utility(terms["never_seen_nll"], before)
        terms["damaged"] = terms["general_utility"] < DAMAGED_BELOW
        terms["utility"] = (mmlu_accuracy(model, self.tokenizer, self.questions)
                            if self.questions else terms["general_utility"])
        estimate = (terms["task_aggregate"] + terms["mia_score"] + terms["utility"]) / 3
        self.last = {"estimate": estimate, **terms}
        return self.last

    def _audit(self, model) -> dict:
        """The full official evaluation of the model (every row, whole generations, the MIA on
        the documents calibration leaves out, every MMLU question), to measure the estimate by;
        ``select_audit=true`` records it beside each check, at its own cost."""
        started = time.perf_counter()
        with evaluating(model):
            results = score_model(model, self.tokenizer, self.lume, self.audit_mia,
                                  self.all_questions or None).results
        return {"final_score": results["final-score"],
                "task_aggregate": results["harmonic-mean-task-aggregate"],
                "mia_auc": results.get("mia_loss_acc"), "mmlu": results.get("mmlu_average"),
                "seconds": time.perf_counter() - started}

    def check(self, model, step: int) -> bool:
        """Estimate, keep the model if it is the best so far; True when it is time to stop.
        The model the run started from (step 0) is measured, as the reference its successors
        are judged against, but never kept: a deletion request is not answered by the
        original model, however the estimate ranks it."""
        self.keeper.check(model, {"step": step}, eligible=step > 0)
        self.trail.append({"step": step, **self.last})
        if self.audit_mia is not None:
            self.trail[-1]["audit"] = self._audit(model)
        candidates = [i for i, t in enumerate(self.trail) if t["step"] > 0]
        if not candidates:
            return False
        best = max(candidates, key=lambda i: (_rank_value(self.trail[i]), i))
        # patience starts once a model's estimate beats the one the run started from: ascent
        # often costs utility before the forget side moves, and a run stopped then has not
        # begun its work; from then on it counts checks since the best-ranked model
        start = self.trail[0]["estimate"] if self.trail[0]["step"] == 0 else -math.inf
        begun = any(self.trail[i]["estimate"] > start for i in candidates)
        return bool(self.patience) and begun and len(self.trail) - 1 - best >= self.patience


class MiaRule:
    """Keep the model whose calibration loss-MIA AUC is closest to 0.5 (the model the run
    started from excepted); stop at 0.5 exactly, or once the AUC has passed below 0.5 and kept
    moving away for ``select_patience`` checks."""

    name = "mia"

    def __init__(self, settings, tokenizer, calibration: MiaData, staging: Path, writes: bool):
        self.patience = max(1, settings.select_patience)
        self.calibration = Calibration(calibration, tokenizer)
        self.keeper = Keeper(staging, "mia", self._distance, writes)
        self.trail: list[dict] = []

    def describe(self) -> dict:
        return {"calibration_ids": self.calibration.ids}

    def _distance(self, model) -> float:
        self.last_auc = self.calibration.auc(model)[0]
        return abs(self.last_auc - 0.5)

    def check(self, model, step: int) -> bool:
        distance = self.keeper.check(model, {"step": step}, eligible=step > 0)
        self.trail.append({"step": step, "mia_auc": self.last_auc})
        recent = [t["mia_auc"] for t in self.trail[-(self.patience + 1):]]
        moving_away = (len(recent) > self.patience and all(a < 0.5 for a in recent)
                       and all(b < a for a, b in zip(recent, recent[1:])))
        return step > 0 and (distance == 0.0 or moving_away)


class KnowledgeRule:
    """Stop as soon as no more than ``select_knowledge`` of the forget questions are answered
    exactly (greedy); the model at that moment is the one kept."""

    name = "knowledge"
    keeper = None

    def __init__(self, settings, tokenizer, lume: LumeData):
        self.tokenizer, self.threshold = tokenizer, settings.select_knowledge
        self.questions = [r for r in lume.forget if r.kind == "qa"]
        self.trail: list[dict] = []

    def describe(self) -> dict:
        return {"questions": len(self.questions), "threshold": self.threshold}

    def check(self, model, step: int) -> bool:
        with evaluating(model):
            scores = score_rows(model, self.tokenizer, self.questions, 64)
        known = sum(scores) / len(scores) if scores else 0.0
        self.trail.append({"step": step, "forget_knowledge": known})
        return known <= self.threshold


def resolve_rule(settings, mia, sharded: bool = False) -> str:
    """The rule a run applies: ``auto`` is ``score`` when an MIA set is given and each process
    holds whole weights to keep (not under ZeRO-3), else none."""
    rule = settings.select
    if rule == "auto":
        return "score" if mia and not sharded else "none"
    if rule in ("score", "mia") and not mia:
        raise ValueError(f"select={rule} calibrates on an MIA set (member.jsonl, nonmember.jsonl)"
                         f": pass mia=DIR (unlearn run --mia DIR), or select=none")
    return rule


def make_rule(rule: str, settings, tokenizer, lume: LumeData,
              split: tuple[MiaData, MiaData] | None, mmlu, staging: Path, seed: int, writes: bool):
    """The rule object for ``rule`` (None for ``none``); ``split`` is the MIA set's calibration
    share and the rest (:func:`calibration_split`), for the rules that calibrate."""
    if rule == "none":
        return None
    if rule == "knowledge":
        return KnowledgeRule(settings, tokenizer, lume)
    calibration, rest = split
    if rule == "mia":
        return MiaRule(settings, tokenizer, calibration, staging, writes)
    return ScoreRule(settings, tokenizer, lume, calibration, mmlu, staging, seed, writes,
                     audit_mia=rest if settings.select_audit else None)


def check_every(settings, window: int) -> int:
    """Steps between checks: ``select_every``, or about ``SELECT_CHECKS`` over the ``window``
    of steps that is checked (the whole run, or a staged method's last stage)."""
    return settings.select_every or max(1, round(window / SELECT_CHECKS))
