"""An anchor on general text: what the model said on its own before unlearning, it still says.

Ascent on the forget rows (bounded or not) is cheapest for the network when it makes every
text less likely, not only the forgotten documents. The retain term holds up the retain rows,
which the target memorised, but nothing holds up text the model never saw: its loss climbs, the
model loses what it knew, and the level bounded ascent aims at (never-seen text) climbs with it.

The anchor needs no corpus from the user. Before the first step the source model writes
``anchor_samples`` passages of its own (sampled from the end-of-text token, as a new document
starts); every training micro-batch then adds ``anchor_weight`` times the mean rise of the
model's loss on a few of them above their loss under the source model (a hinge: the anchor
pulls back damage and leaves the rest of the objective alone).
"""

from __future__ import annotations

import torch

from .methods.base import Example
from .methods.losses import Batch, forward

ANCHOR_TOKENS = 128  # tokens per sampled passage
ANCHOR_BATCH = 4  # passages per training micro-batch


@torch.no_grad()
def sample_passages(model, tokenizer, count: int, seed: int, synced: bool = False
                    ) -> list[list[int]]:
    """``count`` passages sampled (temperature 1) from ``model`` after an end-of-text token,
    each cut at its first end-of-text; seeded, so a resumed run and every process agree."""
    start = torch.full((count, 1), tokenizer.eos_token_id, device=model.device)
    gpus = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):  # training's own randomness is untouched
        torch.manual_seed(seed)
        out = model.generate(input_ids=start, attention_mask=torch.ones_like(start),
                             do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                             max_new_tokens=ANCHOR_TOKENS, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, synced_gpus=synced)
    passages = []
    for row in out[:, 1:].tolist():
        ids = row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
        if len(ids) >= 8:  # a passage that ends at once says nothing about general text
            passages.append([tokenizer.eos_token_id] + ids)
    return passages


class Anchor:
    """The sampled passages, their loss under the source model, and the hinge term."""

    def __init__(self, passages: list[list[int]], start_nll: list[float], pad_id: int,
                 next: int = 0):
        self.examples = [Example(tuple(p), 1, False, i) for i, p in enumerate(passages)]
        self.start_nll = torch.tensor(start_nll)
        self.pad_id, self.next = pad_id, next  # next: the passage the next term starts at

    @classmethod
    @torch.no_grad()
    def measure(cls, model, passages: list[list[int]], pad_id: int) -> Anchor:
        """The anchor with each passage's loss under ``model`` (the source, before any step)."""
        anchor = cls(passages, [0.0] * len(passages), pad_id)
        nll = [forward(model, anchor._batch(i, min(ANCHOR_BATCH, len(passages) - i),
                                            model.device)).nll
               for i in range(0, len(passages), ANCHOR_BATCH)]
        anchor.start_nll = torch.cat(nll).cpu() if nll else anchor.start_nll
        return anchor

    def state(self) -> dict:
        return {"passages": [list(e.ids) for e in self.examples],
                "start_nll": self.start_nll.tolist(), "next": self.next}

    def _batch(self, first: int, size: int, device) -> Batch:
        picked = [self.examples[(first + k) % len(self.examples)] for k in range(size)]
        return Batch.of(picked, self.pad_id, device)

    def term(self, model, device) -> torch.Tensor:
        """Mean rise of the loss of the next few passages (cycling) above where it started."""
        size = min(ANCHOR_BATCH, len(self.examples))
        batch = self._batch(self.next, size, device)
        self.next = (self.next + size) % len(self.examples)
        rise = forward(model, batch).nll - self.start_nll[batch.rows].to(batch.ids.device)
        return rise.clamp(min=0).mean()
