"""Greedy generation from raw prompts, batched with left padding."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .batching import length_sorted_batches, pad


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 256,
                    max_tokens: int = 16384, max_rows: int = 32, desc: str = "generate") -> list[str]:
    """Greedy continuations of ``prompts`` (no chat template), decoded with special tokens
    skipped, as the official scorer does. Rows of similar length are batched together."""
    seqs = [tokenizer(p).input_ids for p in prompts]
    outputs = [""] * len(prompts)
    budget = [len(s) + max_new_tokens for s in seqs]
    for batch in tqdm(length_sorted_batches(budget, max_tokens, max_rows), desc=desc, leave=False):
        ids, mask = pad([seqs[i] for i in batch], tokenizer.pad_token_id, left=True)
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        for i, text in zip(batch, texts):
            outputs[i] = text
    return outputs
