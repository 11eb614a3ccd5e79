"""The forward pass every loss and measurement shares: logits, and the loss of each next token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sequences import IGNORE


def next_token_nll(model, ids: torch.Tensor, mask: torch.Tensor,
                   smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, nll)`` of a right-padded batch. ``nll[:, i]`` is the cross-entropy (float32,
    with ``smoothing``) of token ``i + 1`` given tokens ``0..i``; it is 0 on padding and in the
    last column, which predicts nothing. The labels move one place left, not the logits: no copy
    of the largest tensor. No KV cache: nothing is generated after, and without grad it would
    be held beside the logits (2 GB for a batch of 8192 tokens on OLMo-1B)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    labels = F.pad(ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE), (0, 1), value=IGNORE)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none",
                          label_smoothing=smoothing).view_as(labels)
    return logits, nll
