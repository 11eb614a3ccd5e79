"""Mean token losses: of a row's output given its input, and of a whole document (MIA)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..models.forward import next_token_nll
from ..models.sequences import context_window, from_start, length_sorted_batches, pad

BATCH_TOKENS = 8192  # tokens per scoring batch: its logits are the measurement's peak memory
SCORING_ROWS = 64  # rows per scoring batch


@torch.no_grad()
def token_stats(model, seqs: list[list[int]], first_scored: list[int], pad_id: int,
                max_tokens: int = BATCH_TOKENS, max_rows: int = SCORING_ROWS,
                desc: str = "nll") -> tuple[list[float], list[bool]]:
    """Teacher-forced statistics of tokens ``seq[first_scored:]`` of each sequence: their mean
    cross-entropy, and whether greedy decoding would reproduce every one of them.

    Token 0 is never scored (nothing predicts it), as with HF's ``labels=input_ids``.
    """
    losses, greedy = [float("nan")] * len(seqs), [False] * len(seqs)
    batches = length_sorted_batches([len(s) for s in seqs], max_tokens, max_rows)
    for batch in tqdm(batches, desc=desc, leave=False):
        ids, mask = pad([seqs[i] for i in batch], pad_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits, token_loss = next_token_nll(model, ids, mask)
        logits, token_loss = logits[:, :-1], token_loss[:, :-1]
        starts = [max(first_scored[i], 1) for i in batch]
        scored = from_start(starts, ids.shape[1] - 1, ids.device, first=1) & mask[:, 1:].bool()
        means = (token_loss * scored).sum(1) / scored.sum(1).clamp(min=1)
        wrong = ((logits.argmax(-1) != ids[:, 1:]) & scored).any(1)
        for i, value, miss in zip(batch, means.tolist(), wrong.tolist()):
            losses[i], greedy[i] = value, not miss
    return losses, greedy


def mean_token_losses(model, seqs: list[list[int]], first_scored: list[int], pad_id: int,
                      **kw) -> list[float]:
    return token_stats(model, seqs, first_scored, pad_id, **kw)[0]


def output_nll(model, tokenizer, inputs: list[str], outputs: list[str], **kw) -> list[float]:
    """The official per-row NLL: ``input + output`` tokenized as one sequence (plain
    concatenation), the first ``len(tokenize(input))`` labels masked, mean over the rest. A
    row longer than the model's window keeps its last tokens (the output's, first of all)."""
    window = context_window(model)
    seqs, starts = [], []
    for i, o in zip(inputs, outputs):
        ids = tokenizer(i + o).input_ids
        cut = max(0, len(ids) - window)
        seqs.append(ids[cut:])
        starts.append(max(1, len(tokenizer(i).input_ids) - cut))
    return mean_token_losses(model, seqs, starts, tokenizer.pad_token_id, **kw)


def document_nll(model, tokenizer, documents: list[str], **kw) -> list[float]:
    """Mean token loss of whole documents (labels = input ids), the loss-MIA statistic; a
    document longer than the model's window is scored on its first window of tokens."""
    window = context_window(model)
    seqs = [tokenizer(d).input_ids[:window] for d in documents]
    return mean_token_losses(model, seqs, [0] * len(seqs), tokenizer.pad_token_id, **kw)
