"""Models: the target builder and loading of local HF causal LMs."""

from .loading import ModelError, load_model, load_tokenizer
from .presets import PRESETS, TargetPreset
from .target import build_target

__all__ = ["PRESETS", "ModelError", "TargetPreset", "build_target", "load_model", "load_tokenizer"]
