"""The per-row scores of SemEval-2025 Task 4, exactly as its scorer computes them."""

from __future__ import annotations

from rouge_score import rouge_scorer

_ROUGE = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def regurgitation(expected: str, generated: str) -> float:
    """Sentence-completion score: ROUGE-L recall of the expected continuation."""
    return _ROUGE.score(expected, generated)["rougeL"].recall


def knowledge(expected: str, generated: str) -> int:
    """Question score: exact match after stripping and lower-casing."""
    return int(expected.strip().lower() == generated.strip().lower())


def row_score(kind: str, expected: str, generated: str) -> float:
    if kind == "sc":
        return regurgitation(expected, generated)
    return float(knowledge(expected, generated))
