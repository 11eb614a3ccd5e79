"""Gradient ascent (GA): raise the loss of the forget rows; nothing holds the rest in place."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, UnlearnConfig, register
from .losses import forget_term, forward, mean_over


@dataclass(frozen=True)
class GAConfig(UnlearnConfig):
    """LUME baseline settings (OLMo-7B): lr 1e-5, 5 epochs, full fine-tuning."""


@register
class GradientAscent(Method):
    name = "ga"
    Config = GAConfig
    reference = ("teacher",)  # forget rows drawn to it when the run has one
    small_target = dict(lr=1e-4)

    rows_per_batch_row = 1  # a step's rows are batch_size rows in all

    def stages(self, forget, retain, rng):
        return super().stages(forget, [], rng)  # no retain rows: they would only cost compute

    def loss(self, model, batch, ref):
        return mean_over(forget_term(forward(model, batch), batch, ref), batch.forget)
