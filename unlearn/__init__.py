"""unlearn: remove chosen documents from a trained causal LM, keep the rest, and prove it.

The pipeline, one way: data → target → unlearn → evaluate → report.
"""

from .data import DataError, load_lume, load_mia, load_mmlu, synthesize
from .demo import demo
from .engine import run

# `unlearn.evaluate` is the scoring function; its modules stay importable as unlearn.evaluate.*
from .evaluate.lume import evaluate
from .models import ModelError, load_model
from .target import build_target

__all__ = ["DataError", "ModelError", "build_target", "demo", "evaluate", "load_lume", "load_mia",
           "load_mmlu", "load_model", "run", "synthesize"]
