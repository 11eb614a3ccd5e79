"""Models: loading local HF causal LMs, the target presets and the tokenizer trainer (the
target builder itself is :mod:`unlearn.target`)."""

from .loading import ModelError, load_model, load_tokenizer, trained_from_scratch
from .presets import PRESETS, TargetPreset

__all__ = ["PRESETS", "ModelError", "TargetPreset", "load_model", "load_tokenizer",
           "trained_from_scratch"]
