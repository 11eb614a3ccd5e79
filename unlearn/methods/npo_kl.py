"""ZJUKLAB's combined objective (SemEval-2025 Task 4): ``w1·NPO(forget) + w2·KL(retain) +
w3·CE(retain)``, trained as a LoRA adapter; the ``merge`` method trains two at different
weights and TIES-merges them."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import NON_NEGATIVE, POSITIVE
from .base import Method, UnlearnConfig, register
from .losses import forward, kl_to_reference, mean_over, npo_term


@dataclass(frozen=True)
class NPOKLConfig(UnlearnConfig):
    """ZJUKLAB's run: NPO β 0.1, weights 0.4 / 0.4 / 0.2, LoRA."""

    beta: float = 0.1
    w_npo: float = 0.4
    w_kl: float = 0.4
    w_ce: float = 0.2

    RANGES = {"beta": POSITIVE, **dict.fromkeys(("w_npo", "w_kl", "w_ce"), NON_NEGATIVE)}
    lora: bool = True
    lr: float = 1e-4


@register
class NPOKL(Method):
    name = "npo_kl"
    Config = NPOKLConfig
    small_target = dict(lr=1e-3)
    reference = ("forget_logprob", "logits")

    def loss(self, model, batch, ref):
        c = self.config
        out = forward(model, batch)
        npo = mean_over(npo_term(out, batch, ref, c.beta), batch.forget)
        kl = kl_to_reference(out, ref.logits(batch), batch, batch.retain)
        return c.w_npo * npo + c.w_kl * kl + c.w_ce * mean_over(out.nll, batch.retain)
