"""MMLU-style accuracy: the option letter the model gives the highest probability."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..data.mmlu import LETTERS, Question
from ..models.sequences import context_window, length_sorted_batches, pad

MAX_PROMPT_TOKENS = 2048  # the harness drops shots until a prompt fits this

MMLU_TOKENS, MMLU_ROWS = 16384, 32  # a batch: at most this many prompt tokens and rows


def letter_token_ids(tokenizer) -> list[int]:
    """Token of each answer letter as it follows ``Answer:``: the last token of the letter
    with its leading space (a tokenizer may give the space a token of its own)."""
    return [tokenizer(" " + letter, add_special_tokens=False).input_ids[-1] for letter in LETTERS]


def prompt_ids(tokenizer, question: Question, limit: int) -> list[int]:
    """The question's prompt as the harness tokenizes it (no special tokens), with as many of
    its shots as fit ``limit`` tokens; a prompt too long even without shots keeps its end."""
    for shots in range(len(question.shots), -1, -1):
        ids = tokenizer(question.prompt_with(shots), add_special_tokens=False).input_ids
        if len(ids) <= limit:
            return ids
    return ids[-limit:]


def mmlu_accuracy(model, tokenizer, questions: list[Question], **kw) -> float:
    """The share of ``questions`` answered right (the letter with the highest logit)."""
    return sum(mmlu_correct(model, tokenizer, questions, **kw)) / len(questions)


@torch.no_grad()  # where it is called directly too: a recorded graph keeps every layer's input
def mmlu_correct(model, tokenizer, questions: list[Question], max_tokens: int = MMLU_TOKENS,
                 max_rows: int = MMLU_ROWS) -> list[bool]:
    """Per question, whether the letter with the highest logit is its answer."""
    letters = torch.tensor(letter_token_ids(tokenizer))
    limit = min(MAX_PROMPT_TOKENS, context_window(model))
    seqs = [prompt_ids(tokenizer, q, limit) for q in questions]
    correct = [False] * len(questions)
    for batch in tqdm(length_sorted_batches([len(s) for s in seqs], max_tokens, max_rows),
                      desc="mmlu", leave=False):
        ids, mask = pad([seqs[i] for i in batch], tokenizer.pad_token_id, left=True)
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                       logits_to_keep=1, use_cache=False).logits[:, -1]
        picked = logits[:, letters.to(logits.device)].argmax(-1).tolist()
        for i, p in zip(batch, picked):
            correct[i] = LETTERS[p] == questions[i].answer
    return correct
