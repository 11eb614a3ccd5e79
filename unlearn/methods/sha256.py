"""SHA256 (2nd on SemEval-2025 Task 4's 1B track; Agrawal & Huang, "SHA256 at SemEval-2025
Task 4: Selective Amnesia -- Constrained Unlearning for Large Language Models via Knowledge
Isolation", arXiv 2504.12996; code: github.com/LAB-FLAIR/Constrained-Unlearning-for-LLM).

Causal tracing (``unlearn locate``) finds the layers whose MLPs carry the facts; only those
weights train, on ``−CE_forget + m·CE_retain`` over forget and retain rows mixed in shuffled
batches. The retain weight ``m`` adapts: during the first epoch it is 1.2 and the mean per-batch
retain loss is recorded as a reference; afterwards a batch whose retain loss exceeds it by ΔL gets
``m = clip(round(0.3·6^ΔL + 0.8, 1), 1.2, 2.3)``, otherwise 1.2. (Their code divided the summed
reference by the number of examples rather than batches; here it is the per-batch mean.)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .base import Method, UnlearnConfig, register
from .losses import forget_term, forward, mean_over

BASE_WEIGHT, MAX_WEIGHT = 1.2, 2.3


def retain_weight(delta: float) -> float:
    """The adaptive retain weight for a batch whose retain loss is ``delta`` above reference."""
    if delta <= 0:
        return BASE_WEIGHT
    return min(MAX_WEIGHT, max(BASE_WEIGHT, round(0.3 * 6 ** delta + 0.8, 1)))


@dataclass(frozen=True)
class SHA256Config(UnlearnConfig):
    """The paper's OLMo-1B settings: MLPs of layers 0-5 (``layers=auto`` takes the layers a
    ``trace.json`` chose: set ``trace=``), lr 1.5e-5, 8 epochs, effective batch 120."""

    layers: str = "0-5"
    modules: str = "mlp"
    lr: float = 1.5e-5
    epochs: int = 8
    batch_size: int = 8
    grad_accum: int = 15


@register
class SHA256(Method):
    name = "sha256"
    Config = SHA256Config
    reference = ("teacher",)  # forget rows drawn to it when the run has one
    # OLMo-1B's layers 0-5 are its first 6 of 16: the small target's first 3 of 8; smaller
    # batches and a higher rate give a from-scratch target enough steps (figures: README)
    small_target = dict(layers="0-2", lr=1e-3, grad_accum=2, epochs=12)

    def __init__(self, config):
        super().__init__(config)
        self.epoch = 0
        self.reference_losses: list[float] = []

    def stages(self, forget, retain, rng: random.Random):
        per_step = self.config.batch_size * self.config.grad_accum
        epochs = []
        for _ in range(self.config.epochs):
            rows = rng.sample(forget + retain, len(forget) + len(retain))
            epochs.append([rows[i:i + per_step] for i in range(0, len(rows), per_step)])
        return [epochs]

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def baseline_retain_loss(self) -> float | None:
        losses = self.reference_losses
        return sum(losses) / len(losses) if losses else None

    def loss(self, model, batch, ref):
        out = forward(model, batch)
        retain = mean_over(out.nll, batch.retain)
        m = BASE_WEIGHT
        if batch.retain.any():
            if self.epoch == 0:
                self.reference_losses.append(retain.item())
            elif self.baseline_retain_loss is not None:
                m = retain_weight(retain.item() - self.baseline_retain_loss)
        return mean_over(forget_term(out, batch, ref), batch.forget) + m * retain

    def state(self) -> dict:
        return {"reference_losses": self.reference_losses}

    def load_state(self, state: dict) -> None:
        self.reference_losses = list(state.get("reference_losses", []))
