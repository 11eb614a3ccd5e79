"""Padding token sequences into batches, shortest waste first."""

from __future__ import annotations

import torch

IGNORE = -100  # the label of a token no loss is taken on (torch's cross_entropy default)


def length_sorted_batches(lengths: list[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Indices grouped so rows of similar length share a batch of at most ``max_tokens`` padded
    tokens and ``max_rows`` rows; longest first, so an out-of-memory shows up at once."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * width > max_tokens or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad(seqs: list[list[int]], pad_id: int,
        left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` for sequences padded to the longest."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, span] = torch.tensor(s, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def from_start(starts: list[int], width: int, device, first: int = 0) -> torch.Tensor:
    """A ``(rows, width)`` mask whose column ``j`` stands for token ``first + j``: true once that
    token reaches its row's start (the output tokens, when ``starts`` are where outputs begin)."""
    positions = torch.arange(first, first + width, device=device)
    return positions[None, :] >= torch.tensor(starts, device=device)[:, None]


def context_window(model) -> int:
    """How many positions the model attends over: its config's maximum position count (a
    row longer than this is cut to fit; beyond it, models fail or run out of memory)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 20  # a config that names none: no cut below a million tokens


def training_sequence(tokenizer, prompt: str, answer: str, max_len: int,
                      eos: bool) -> tuple[list[int], int]:
    """A row as it is trained on: ``(ids, start)`` for ``prompt + " " + answer``, at most
    ``max_len`` tokens, ending in EOS when ``eos`` (kept when the text is cut: it is where an
    answer stops); ``start`` is where the answer begins, the first ``len(tokenize(prompt))``
    tokens being the prompt (at least one token is always the answer's)."""
    ids = tokenizer(prompt + " " + answer).input_ids
    end = [tokenizer.eos_token_id] if eos else []
    if end and ids[-1:] == end:  # some tokenizers append it themselves
        ids = ids[:-1]
    ids = ids[:max_len - len(end)] + end
    return ids, min(len(tokenizer(prompt).input_ids), len(ids) - 1)
