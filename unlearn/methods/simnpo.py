"""SimNPO (Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization
for LLM Unlearning"): NPO without a reference model, the log-probability length-normalised,
``-(2/β) · log σ(-(β/|y|) · log π_θ(y|x) - γ)``, plus cross-entropy on retain rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ..settings import NON_NEGATIVE, POSITIVE
from .base import Method, UnlearnConfig, register
from .losses import forward, mean_over


@dataclass(frozen=True)
class SimNPOConfig(UnlearnConfig):
    """Paper defaults (TOFU): β = 2.5, γ = 0, retain weight 1; lr 1e-5, 5 epochs."""

    beta: float = 2.5
    gamma: float = 0.0

    RANGES = {"beta": POSITIVE, "gamma": NON_NEGATIVE}


@register
class SimNPO(Method):
    name = "simnpo"
    Config = SimNPOConfig
    small_target = dict(lr=1e-4)

    def loss(self, model, batch, ref):
        out = forward(model, batch)
        c = self.config
        # -(β/|y|)·log π_θ(y|x) is β times the mean output-token NLL
        forget = -(2 / c.beta) * F.logsigmoid(c.beta * out.nll - c.gamma)
        return mean_over(forget, batch.forget) + c.retain_weight * mean_over(out.nll, batch.retain)
