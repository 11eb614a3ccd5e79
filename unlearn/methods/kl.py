"""KL minimisation: ascend on the forget rows while keeping the output distribution on retain
rows close to the original model's, KL(original ‖ current) per output token."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, UnlearnConfig, register
from .losses import forget_term, forward, kl_to_reference, mean_over


@dataclass(frozen=True)
class KLConfig(UnlearnConfig):
    """LUME baseline settings (OLMo-7B): lr 1e-5, 5 epochs, retain weight 1."""


@register
class KLMinimisation(Method):
    name = "kl"
    Config = KLConfig
    small_target = dict(lr=1e-4)
    reference = ("logits", "teacher")

    def loss(self, model, batch, ref):
        out = forward(model, batch)
        kl = kl_to_reference(out, ref.logits(batch), batch, batch.retain)
        forget = mean_over(forget_term(out, batch, ref), batch.forget)
        return forget + self.config.retain_weight * kl
