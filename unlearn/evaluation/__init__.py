"""Scoring a model the LUME way (``unlearn eval``): generations, per-row scores, the task
aggregate, the loss-MIA, MMLU, the leak audit and the report."""

from .scoring import evaluate

__all__ = ["evaluate"]
