"""How well a model reproduces its training rows: the figures a target is built to maximise."""

from __future__ import annotations

from collections import defaultdict
from statistics import fmean

from ..data.lume import Row
from .generation import greedy_generate
from .metrics import row_score


def score_rows(model, tokenizer, rows: list[Row], max_new_tokens: int = 256,
               desc: str = "generate") -> list[float]:
    """Official per-row scores (ROUGE-L recall for sc rows, exact match for qa rows)."""
    generated = greedy_generate(model, tokenizer, [r.input for r in rows], max_new_tokens,
                                answers=[r.output if r.kind == "qa" else None for r in rows],
                                desc=desc)
    return [row_score(r.kind, r.output, g.text) for r, g in zip(rows, generated)]


def task_means(rows: list[Row], scores: list[float]) -> dict[str, dict[str, float]]:
    """Mean score per task and row kind: ``{"Task1": {"regurgitation": .., "knowledge": ..}}``."""
    grouped = defaultdict(list)
    for r, s in zip(rows, scores):
        grouped[(r.task, r.kind)].append(s)
    names = {"sc": "regurgitation", "qa": "knowledge"}
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for (task, kind), values in sorted(grouped.items()):
        out[task][names[kind]] = fmean(values)
    return dict(out)
