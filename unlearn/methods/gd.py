"""Gradient difference (GD): ascend on the forget rows, descend on as many retain rows."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, UnlearnConfig, register
from .losses import forget_term, forward, mean_over


@dataclass(frozen=True)
class GDConfig(UnlearnConfig):
    """LUME baseline settings (OLMo-7B): lr 1e-5, 5 epochs, retain weight 1."""


@register
class GradientDifference(Method):
    name = "gd"
    Config = GDConfig
    reference = ("teacher",)  # forget rows drawn to it when the run has one
    small_target = dict(lr=1e-4)

    def loss(self, model, batch, ref):
        out = forward(model, batch)
        return (mean_over(forget_term(out, batch, ref), batch.forget)
                + self.config.retain_weight * mean_over(out.nll, batch.retain))
