"""RMU, representation misdirection for unlearning (Li et al. 2024, "The WMDP Benchmark").

On forget rows the hidden state after layer ``layer`` is pushed toward ``c·u`` (``u`` a fixed
random unit vector, ``c`` the steering coefficient), which scrambles what later layers read; on
retain rows it is held to the frozen model's. Only the MLP down-projections of a few layers up
to ``layer`` train. Both terms are mean squared errors over the output tokens of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..settings import NON_NEGATIVE, POSITIVE
from .base import Method, UnlearnConfig, register
from .losses import IGNORE


@dataclass(frozen=True)
class RMUConfig(UnlearnConfig):
    """open-unlearning's defaults for 32-layer 7B models: layer 7, down-projections of layers
    5-7, steering coefficient 20, retain weight 1; lr 5e-5."""

    layer: int = 7
    steering_coeff: float = 20.0

    RANGES = {"layer": NON_NEGATIVE, "steering_coeff": POSITIVE}
    layers: str = "5-7"
    modules: str = "down_proj"
    lr: float = 5e-5


@register
class RMU(Method):
    name = "rmu"
    Config = RMUConfig
    # the same relative depth: layer 7 of 32 is about a quarter up, layer 2 of the small 8
    small_target = dict(layer=2, layers="0-2", lr=1e-3)
    reference = ("hidden",)

    def __init__(self, config):
        super().__init__(config)
        self._control: torch.Tensor | None = None

    def control(self, hidden_size: int, device) -> torch.Tensor:
        """``c·u``: fixed for the run (drawn from its own seeded generator)."""
        if self._control is None:
            u = torch.rand(hidden_size, generator=torch.Generator().manual_seed(0))
            self._control = self.config.steering_coeff * u / u.norm()
        return self._control.to(device)

    def loss(self, model, batch, ref):
        c = self.config
        hidden = model(input_ids=batch.ids, attention_mask=batch.mask,
                       output_hidden_states=True).hidden_states[c.layer + 1].float()
        scored = (batch.labels != IGNORE)  # output tokens
        forget_tokens = scored & batch.forget[:, None]
        retain_tokens = scored & batch.retain[:, None]
        loss = hidden.sum() * 0.0
        if forget_tokens.any():
            target = self.control(hidden.shape[-1], hidden.device)
            loss = loss + (hidden[forget_tokens] - target).square().mean()
        if retain_tokens.any():
            frozen = ref.hidden(batch, c.layer + 1).float()
            loss = loss + c.retain_weight * (hidden[retain_tokens]
                                             - frozen[retain_tokens]).square().mean()
        return loss
