"""Negative preference optimisation (Zhang et al. 2024, "Negative Preference Optimization:
From Catastrophic Collapse to Effective Unlearning").

Forget rows are treated as dispreferred answers with no preferred one:
``-(2/β) · E log σ(-β · log(π_θ(y|x) / π_ref(y|x)))``, log-probabilities summed over the output
tokens. The gradient is GA's, weighted down for rows already pushed below the reference, which
keeps it from running away. NPO+RT adds cross-entropy on retain rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import POSITIVE
from .base import Method, UnlearnConfig, register
from .losses import forward, mean_over, npo_term


@dataclass(frozen=True)
class NPOConfig(UnlearnConfig):
    """Paper defaults: β = 0.1, retain term weight 1 (NPO+RT); lr 1e-5, 5 epochs."""

    beta: float = 0.1

    RANGES = {"beta": POSITIVE}


@register
class NPO(Method):
    name = "npo"
    Config = NPOConfig
    small_target = dict(lr=1e-4)
    reference = ("forget_logprob",)

    def loss(self, model, batch, ref):
        out = forward(model, batch)
        forget = npo_term(out, batch, ref, self.config.beta)
        return (mean_over(forget, batch.forget)
                + self.config.retain_weight * mean_over(out.nll, batch.retain))
