"""The targeted relearning attack: does forgotten knowledge come back after a few fine-tuning
steps on part of the forget set?

Unlearned knowledge often returns when a model is fine-tuned on a small part of what it was made
to forget (Hu et al. 2024, "Unlearning or Obfuscating?"; Lynch et al. 2024). The attack here:
fine-tune a copy of the model on a seeded share of the forget documents (their rows' whole text)
for a fixed budget, then score the *other* documents' questions and continuations. The same
attack on the oracle, which never saw any forget document, shows what the attacker gains from the
share alone; an unlearned model is robust when it relearns no more than the oracle does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from statistics import fmean

import torch

from ..data.lume import Row
from ..measure.memorisation import score_rows
from ..methods.base import UnlearnConfig
from ..methods.trainable import select_parameters
from ..models.forward import next_token_nll
from ..models.sequences import length_sorted_batches, pad, training_sequence


@dataclass(frozen=True)
class RelearnConfig:
    """The attacker's budget: ``steps`` AdamW steps of ``batch_size`` rows at ``lr`` (constant),
    on a seeded ``share`` of the forget documents (at least one). ``mode``: ``full`` trains
    every weight; ``lora`` rank-``lora_r`` adapters at ``lora_lr`` (ten times full
    fine-tuning's rate, as adapters are trained), the attacker a released large model most
    likely meets; ``auto`` full fine-tuning where the memory plan fits it, else LoRA."""

    share: float = 0.25
    steps: int = 30
    lr: float = 1e-4
    batch_size: int = 8
    max_len: int = 512
    margin: float = 0.05  # robust: relearned scores at most the oracle's plus this
    mode: str = "auto"  # auto | full | lora
    lora_r: int = 16
    lora_lr: float = 1e-3

    def __post_init__(self):
        if self.mode not in ATTACK_MODES:
            raise ValueError(f"relearn mode={self.mode!r}: use one of {', '.join(ATTACK_MODES)}")

    def training(self, mode: str, dtype: torch.dtype) -> UnlearnConfig:
        """The attack's training as a run's settings: what trains (as :func:`select_parameters`
        chooses for a run) and the forward's size (half a batch: :func:`fine_tune`)."""
        return UnlearnConfig(batch_size=max(1, -(-self.batch_size // 2)), max_len=self.max_len,
                             lr=self.lora_lr if mode == "lora" else self.lr,
                             lora=mode == "lora", lora_r=self.lora_r, lora_alpha=2 * self.lora_r,
                             precision="bf16" if dtype == torch.bfloat16 else "fp32",
                             select="none")


ATTACK_MODES = ("auto", "full", "lora")


def split_documents(doc_ids: list[str], share: float, seed: int) -> tuple[list[str], list[str]]:
    """``(attacked, held_out)``: a seeded ``share`` of the documents (at least one, and at least
    one left out) and the rest, each in the given order."""
    if len(doc_ids) < 2:
        raise ValueError("the relearning attack needs at least two forget documents: one to "
                         "fine-tune on, one to measure")
    k = min(len(doc_ids) - 1, max(1, round(share * len(doc_ids))))
    attacked = set(random.Random(f"{seed}/relearn").sample(sorted(doc_ids), k))
    return ([d for d in doc_ids if d in attacked], [d for d in doc_ids if d not in attacked])


def attacked_rows(forget: list[Row], share: float, seed: int) -> tuple[list[Row], list[Row]]:
    """``(attacked, held_out)`` rows of the forget set: those of :func:`split_documents`'s
    documents."""
    attacked, _ = split_documents(sorted({r.doc_id for r in forget}), share, seed)
    return ([r for r in forget if r.doc_id in attacked],
            [r for r in forget if r.doc_id not in attacked])


def _sequences(tokenizer, rows: list[Row], config: RelearnConfig) -> list[list[int]]:
    """What the attack trains on: each row's whole text and EOS, cut at ``config.max_len``."""
    return [training_sequence(tokenizer, r.input, r.output, config.max_len, eos=True)[0]
            for r in rows]


def attacked_lengths(tokenizer, forget: list[Row], config: RelearnConfig, seed: int) -> list[int]:
    """The token lengths of the sequences :func:`relearn` trains on (a memory plan's input)."""
    return [len(ids) for ids in _sequences(tokenizer, attacked_rows(forget, config.share, seed)[0],
                                           config)]


def knowledge_and_regurgitation(model, tokenizer, rows: list[Row],
                                max_new_tokens: int = 256) -> dict[str, float | None]:
    """Mean exact match of the qa rows and mean ROUGE-L recall of the sc rows (None without
    rows of that kind)."""
    scores = score_rows(model, tokenizer, rows, max_new_tokens)
    by_kind = {kind: [s for r, s in zip(rows, scores) if r.kind == kind] for kind in ("qa", "sc")}
    return {"knowledge": fmean(by_kind["qa"]) if by_kind["qa"] else None,
            "regurgitation": fmean(by_kind["sc"]) if by_kind["sc"] else None}


def fine_tune(model, tokenizer, rows: list[Row], config: RelearnConfig, seed: int,
              mode: str = "full"):
    """The attack's training: next-token loss over each row's whole text, batches drawn in a
    seeded order, cycling through the rows; every weight of ``model`` in place (``mode``
    full) or LoRA adapters on it (lora). Returns the model that was trained."""
    torch.manual_seed(seed)
    settings = config.training(mode, next(model.parameters()).dtype)
    model = select_parameters(model, settings)
    sequences = _sequences(tokenizer, rows, config)
    order = random.Random(f"{seed}/relearn-order")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=settings.lr)
    model.train()
    queue: list[int] = []
    for _ in range(config.steps):
        while len(queue) < config.batch_size:
            queue += order.sample(range(len(sequences)), len(sequences))
        batch, queue = queue[:config.batch_size], queue[config.batch_size:]
        tokens = sum(len(sequences[i]) - 1 for i in batch)
        # the batch's mean token loss, its rows in two forwards of similar lengths: the same
        # gradient as one padded forward, with a third less padding (short questions beside
        # long documents)
        halves = length_sorted_batches([len(sequences[i]) for i in batch],
                                       max_tokens=config.batch_size * config.max_len,
                                       max_rows=max(1, -(-len(batch) // 2)))
        for half in halves:
            ids, mask = pad([sequences[batch[j]] for j in half], tokenizer.pad_token_id)
            _, nll = next_token_nll(model, ids.to(model.device), mask.to(model.device))
            (nll.sum() / max(tokens, 1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def relearn(model, tokenizer, forget: list[Row], config: RelearnConfig, seed: int,
            max_new_tokens: int = 256, mode: str = "full") -> dict:
    """The attack on ``model``, a loaded copy it fine-tunes in place (its directory is never
    written) in ``mode`` (full or lora): the held-out documents' knowledge and regurgitation
    before and after fine-tuning on the attacked ones."""
    train, measured = attacked_rows(forget, config.share, seed)
    model.eval()
    before = knowledge_and_regurgitation(model, tokenizer, measured, max_new_tokens)
    model = fine_tune(model, tokenizer, train, config, seed, mode)
    after = knowledge_and_regurgitation(model, tokenizer, measured, max_new_tokens)
    return {"before": before, "after": after, "mode": mode,
            "attacked_documents": sorted({r.doc_id for r in train}),
            "held_out_documents": sorted({r.doc_id for r in measured})}
