"""Greedy generation from raw prompts (no chat template), as the official scorer does it, faster.

The official scorer calls ``model.generate`` one row at a time. Here rows of similar length share
a left-padded batch with one KV cache; a row that emits EOS leaves the batch (its cache rows are
dropped, so it stops costing compute), and a question row leaves as soon as its text can no
longer equal the expected answer — its exact-match score is 0 whatever follows. Decoding is the
official one: special tokens skipped, tokenization spaces cleaned up.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from functools import lru_cache

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import Cache, DynamicLayer

from ..models.sequences import context_window, length_sorted_batches, pad

_SPACE = re.compile(r"\s+")
# a generation batch: at most this many prompt and new tokens (its KV cache) and rows
GENERATION_TOKENS, GENERATION_ROWS = 24576, 48


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    stopped_early: bool  # a question row cut short: it could no longer match its answer


def decode(tokenizer, ids: list[int]) -> str:
    """The official decoding of generated ids: special tokens skipped and tokenization spaces
    cleaned up (" ." becomes "."). The scorer ran on transformers 4, which applied that clean-up
    to BPE tokenizers such as OLMo's; transformers 5 skips it for BPE, so it is applied here."""
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return tokenizer.clean_up_tokenization(text)


def can_still_match(text_so_far: str, answer: str) -> bool:
    """Whether greedy text that starts with ``text_so_far`` may still pass the exact-match test
    ``gen.strip().lower() == answer.strip().lower()``.

    Conservative: whitespace is ignored on both sides (the clean-up of tokenization spaces may
    delete a space once the next token arrives), and a trailing partial UTF-8 character is
    not judged.
    """
    text = text_so_far.rstrip("\ufffd")
    return _SPACE.sub("", answer.lower()).startswith(_SPACE.sub("", text.lower()))


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


class _PreallocatedLayer(DynamicLayer):
    """A KV-cache layer written into buffers sized for prompt + every new token up front.

    HF's dynamic layer concatenates at every step, copying the whole cache each time: on a CPU
    that was a fifth of evaluation time. Here a step writes one column; keys and values are views.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            shape = (*key_states.shape[:2], self.capacity, key_states.shape[-1])
            self._key_buffer = key_states.new_empty(shape)
            self._value_buffer = value_states.new_empty(shape)
            self.length = 0
        end = self.length + key_states.shape[-2]
        self._key_buffer[:, :, self.length:end] = key_states
        self._value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._key_buffer = self._select(self._key_buffer, indices)
        self._value_buffer = self._select(self._value_buffer, indices)
        self.keys = self._key_buffer[:, :, :self.length]
        self.values = self._value_buffer[:, :, :self.length]

    def _select(self, buffer: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        kept = buffer.new_empty((len(indices), *buffer.shape[1:]))
        kept[:, :, :self.length] = buffer[indices, :, :self.length]  # only the filled columns
        return kept


# Finished rows leave the batch once this share of it has finished: compacting the cache copies
# it, so doing it for every finished row cost more than carrying a few dead rows along.
_COMPACT_SHARE = 0.25


@torch.no_grad()
def _generate_batch(model, seqs: list[list[int]], pad_id: int, eos: set[int],
                    max_new_tokens: int, keep_going) -> list[tuple[list[int], bool]]:
    """Greedy continuations of one left-padded batch; ``keep_going(row, ids)`` may retire a row."""
    ids, mask = pad(seqs, pad_id, left=True)
    ids, mask = ids.to(model.device), mask.to(model.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    capacity = ids.shape[1] + max_new_tokens
    cache = Cache(layers=[_PreallocatedLayer(capacity)
                          for _ in range(model.config.num_hidden_layers)])
    # the cache's argument: `cache` in recent transformers (which warns on the old name)
    cache_arg = ("cache" if "cache" in inspect.signature(model.forward).parameters
                 else "past_key_values")
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                   use_cache=True, logits_to_keep=1, **{cache_arg: cache}).logits[:, -1]
    next_position = positions[:, -1] + 1
    alive = list(range(len(seqs)))  # batch slot -> row
    running = [True] * len(seqs)  # per row
    out: list[list[int]] = [[] for _ in seqs]
    cut = [False] * len(seqs)
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1)
        for row, token in zip(alive, tokens.tolist()):
            if not running[row]:
                continue
            if token in eos:
                running[row] = False
                continue
            out[row].append(token)
            if not keep_going(row, out[row]):
                running[row], cut[row] = False, True
        keep = [j for j, row in enumerate(alive) if running[row]]
        if not keep or step + 1 == max_new_tokens:
            break
        if len(alive) - len(keep) >= _COMPACT_SHARE * len(alive):
            index = torch.tensor(keep, device=tokens.device)
            cache.batch_select_indices(index)
            tokens, mask, next_position = tokens[index], mask[index], next_position[index]
            alive = [alive[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask,
                       position_ids=next_position[:, None], use_cache=True,
                       **{cache_arg: cache}).logits[:, -1]
        next_position = next_position + 1
    return list(zip(out, cut))


class _CannotMatch(StoppingCriteria):
    """Per row: stop once its text can no longer equal its expected answer (``keep_going``)."""

    def __init__(self, keep_going, prompt_width: int):
        self.keep_going, self.prompt_width = keep_going, prompt_width
        self.cut: set[int] = set()

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        stop = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        for row, ids in enumerate(input_ids[:, self.prompt_width:].tolist()):
            if row not in self.cut and not self.keep_going(row, ids):
                self.cut.add(row)
            stop[row] = row in self.cut
        return stop


@torch.no_grad()
def _generate_batch_with_generate(model, seqs: list[list[int]], pad_id: int, eos: set[int],
                                  max_new_tokens: int, keep_going) -> list[tuple[list[int], bool]]:
    """What :func:`_generate_batch` does, through ``model.generate``: for models and versions
    the preallocated cache does not know. Rows that finished are padded by ``generate``;
    their tokens stop at the first EOS or padding."""
    ids, mask = pad(seqs, pad_id, left=True)
    ids, mask = ids.to(model.device), mask.to(model.device)
    criteria = _CannotMatch(lambda row, new: keep_going(row, _until_end(new, eos, pad_id)),
                            ids.shape[1])
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                         eos_token_id=sorted(eos),
                         stopping_criteria=StoppingCriteriaList([criteria]))
    new = out[:, ids.shape[1]:].tolist()
    return [(_until_end(row, eos, pad_id), i in criteria.cut) for i, row in enumerate(new)]


def _until_end(ids: list[int], eos: set[int], pad_id: int) -> list[int]:
    """Generated ids up to the first EOS or padding (what ``generate`` adds to finished rows)."""
    for i, token in enumerate(ids):
        if token in eos or token == pad_id:
            return ids[:i]
    return ids


def preallocated_cache_fits(model) -> bool:
    """Whether the preallocated KV cache serves ``model``: every layer full attention (no
    sliding-window or hybrid layers, ``config.layer_types``) and a transformers whose cache
    layers it was written against (``DynamicLayer.lazy_initialization``, ``Cache(layers=)``)."""
    types = getattr(model.config, "layer_types", None) or []
    return (all(t == "full_attention" for t in types)
            and not getattr(model.config, "is_encoder_decoder", False)
            and _cache_layers_known())


@lru_cache(maxsize=1)
def _cache_layers_known() -> bool:
    """Whether this transformers' cache layers have what the preallocated layer relies on."""
    try:
        layer = DynamicLayer()
    except TypeError:  # a constructor of another shape
        return False
    return (hasattr(layer, "is_initialized") and hasattr(layer, "lazy_initialization")
            and "layers" in inspect.signature(Cache.__init__).parameters)


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 256,
                    answers: list[str | None] | None = None,
                    max_tokens: int = GENERATION_TOKENS, max_rows: int = GENERATION_ROWS,
                    desc: str = "generate",
                    fast: bool | None = None) -> list[Generation]:
    """Greedy continuations of ``prompts``, batched by length.

    ``answers[i]``, when given, lets row ``i`` stop once it can no longer equal that answer.
    A prompt too long for the model's window with the new tokens keeps its last tokens.
    ``fast`` (default: wherever it fits) decodes with the preallocated KV cache; otherwise
    through batched ``model.generate``, with the same results.
    """
    fast = preallocated_cache_fits(model) if fast is None else fast
    generate_batch = _generate_batch if fast else _generate_batch_with_generate
    room = max(1, context_window(model) - max_new_tokens)
    seqs = [tokenizer(p).input_ids[-room:] for p in prompts]
    answers = answers or [None] * len(prompts)
    eos = _eos_ids(model, tokenizer)
    results: list[Generation | None] = [None] * len(prompts)
    budget = [len(s) + max_new_tokens for s in seqs]
    for batch in tqdm(length_sorted_batches(budget, max_tokens, max_rows), desc=desc,
                      leave=False):
        def keep_going(row: int, ids: list[int], batch=batch) -> bool:
            answer = answers[batch[row]]
            return answer is None or can_still_match(decode(tokenizer, ids), answer)

        done = generate_batch(model, [seqs[i] for i in batch], tokenizer.pad_token_id, eos,
                              max_new_tokens, keep_going)
        for i, (ids, cut) in zip(batch, done):
            results[i] = Generation(decode(tokenizer, ids), len(ids), cut)
    return results


@torch.no_grad()
def generate_one_by_one(model, tokenizer, prompts: list[str], max_new_tokens: int = 256,
                        desc: str = "generate (one by one)") -> list[str]:
    """The official scorer's path: ``model.generate`` on each prompt alone. The reference that
    :func:`greedy_generate` must equal, and the baseline of ``bench/eval_speed.py``."""
    texts = []
    for prompt in tqdm(prompts, desc=desc, leave=False):
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             use_cache=True, pad_token_id=tokenizer.pad_token_id)
        texts.append(decode(tokenizer, out[0, ids.shape[1]:].tolist()))
    return texts
