"""unlearn: remove chosen documents from a trained causal LM, keep the rest, and prove it.

The pipeline, one way: data → target → unlearn → evaluate → report. Each command of the CLI is
one of these functions; the subpackages (``data``, ``models``, ``methods``, ``tracing``,
``evaluation``) hold the parts they are built from.
"""

from importlib.metadata import PackageNotFoundError, version

from .data import DataError, import_documents, load_lume, load_mia, load_mmlu, synthesize
from .demo import demo
from .engine import memory_plan, run
from .evaluation import evaluate
from .evaluation.receipt import audit
from .leaderboard import bench
from .models import ModelError, load_model
from .plan import MemoryPlanError
from .target import build_target
from .tracing import locate

try:
    __version__ = version("unlearn-lume")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["DataError", "MemoryPlanError", "ModelError", "audit", "bench", "build_target", "demo",
           "evaluate", "import_documents", "load_lume", "load_mia", "load_mmlu", "load_model",
           "locate", "memory_plan", "run", "synthesize"]
