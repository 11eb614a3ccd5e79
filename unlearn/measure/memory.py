"""Memory a command will hold at its peak, planned from a model's config before any weight loads.

The model is built on the meta device (accelerate's ``init_empty_weights``; its sizes from
``compute_module_sizes``). Here: the plan's record and the device it is read against, and the
plans of the commands that only read a model (``unlearn eval``, ``unlearn locate``): weights in
the compute dtype, then the largest of their phases (generation's KV cache, scoring's logits, a
forward's transients) at the largest batch the measuring code makes of the data's token
lengths. Training plans (``unlearn run``, the audit's attack): :mod:`unlearn.plan`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from accelerate.utils import compute_module_sizes, get_max_memory
from transformers import AutoConfig, AutoModelForCausalLM

from ..accel import process_state, return_freed_memory
from ..models.layers import decoder_layers
from ..models.loading import ModelError, saved_dtype
from ..models.sequences import context_window, length_sorted_batches
from .generation import GENERATION_ROWS, GENERATION_TOKENS
from .nll import BATCH_TOKENS, SCORING_ROWS

FP32 = 4
HEADROOM = 0.9  # of a device's memory a plan may fill: allocator fragmentation, CUDA context
# of a CPU's memory past which freed blocks go back to the system (settle_allocator): there the
# heap's kept blocks are gigabytes a machine may not have (figures: docs/design.md, "Memory")
TIGHT = 0.25
CPU_RUNTIME = 600 * 2**20  # the interpreter, torch, transformers: a process's resident floor
GIB = 2**30


class MemoryPlanError(ValueError):
    """A run that cannot fit the device it would run on; the message names what would."""


@dataclass(frozen=True)
class MemoryPlan:
    parts: dict[str, int]  # bytes per device, by part
    device: str  # where this process would run, as accelerate names it
    available: int | None  # bytes that device has for this process; None: unknown
    processes: int
    sharded: bool  # ZeRO-3, FSDP: weights, gradients, optimizer states split across processes
    trainable: int  # weights that train (counted on the meta device)

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.available is None or self.peak <= HEADROOM * self.available

    @property
    def tight(self) -> bool:
        """A CPU plan filling more than ``TIGHT`` of the memory: glibc's freed-but-kept blocks,
        beyond the live tensors the plan counts, could take it past the machine."""
        return (self.device == "cpu" and self.available is not None
                and self.peak > TIGHT * self.available)

    def table(self) -> str:
        """The plan as a person reads it: one line per part, then the total against the
        device."""
        training = f"{self.trainable:,} weights train" if self.trainable else "nothing trains"
        lines = [f"memory plan per device ({self.processes} process(es)"
                 f"{', sharded' if self.sharded else ''}; {training}):"]
        lines += [f"  {name:<15} {size / GIB:8.2f} GiB" for name, size in self.parts.items()]
        room = ("" if self.available is None
                else f" of {self.available / GIB:.2f} GiB on {self.device}")
        lines.append(f"  {'peak':<15} {self.peak / GIB:8.2f} GiB{room}")
        return "\n".join(lines)

    def as_record(self) -> dict:
        """For ``run.json``: each part in MB, beside the peak the run measures."""
        return {"device": self.device, "processes": self.processes, "sharded": self.sharded,
                "peak_mb": self.peak / 2**20, "tight": self.tight,
                "parts_mb": {k: v / 2**20 for k, v in self.parts.items()},
                "available_mb": None if self.available is None else self.available / 2**20}


def meta_model(model_dir):
    """The model of ``model_dir``'s config with no memory behind its weights, in fp32 as a run
    loads it (accelerate's sizes never round a dtype up: a bf16 checkpoint planned in its own
    dtype would count half the weights a run holds)."""
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:  # as load_model says it, before any loading
        raise ModelError(f"{model_dir}: not a causal language model that transformers can load "
                         f"({e.__class__.__name__}: {str(e).splitlines()[0][:200]})") from e
    model.tie_weights()  # on the meta device tied embeddings come untied: one copy, as loaded
    return model


def weight_bytes(model, dtype: torch.dtype = torch.float32) -> int:
    return compute_module_sizes(model, dtype=dtype)[""]


def device_memory() -> tuple[str, int | None]:
    """This process's device and the bytes it has: its GPU's memory, or its share of the
    machine's available memory (processes on one machine share it)."""
    state = process_state()
    memory = get_max_memory()
    if torch.cuda.is_available():
        index = state.local_process_index % torch.cuda.device_count()
        return f"cuda:{index}", memory.get(index)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
    return "cpu", memory["cpu"] // max(1, local)


def _no_grad_width(model) -> int:
    """Values one token holds at once inside a layer of a forward without gradients (freed
    layer by layer): a few copies of the hidden state, and the MLP's intermediate three times
    (its gate, up projection and their product)."""
    config = model.config
    hidden = model.get_input_embeddings().embedding_dim
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    return 4 * hidden + 3 * intermediate


def _kv_width(model) -> int:
    """Values one token leaves in the KV cache, over every layer."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * len(decoder_layers(model)) * kv_heads * head_dim


def _padded_tokens(lengths: list[int], max_tokens: int, max_rows: int) -> int:
    """The most padded tokens one batch holds (rows × its longest) when ``lengths`` are
    batched as the measuring code batches them (``length_sorted_batches``)."""
    batches = length_sorted_batches(lengths, max_tokens, max_rows)
    return max((len(b) * max(lengths[i] for i in b) for b in batches), default=0)


def token_lengths(tokenizer, texts) -> list[int]:
    """Each text's length in tokens: what a plan reads of the data."""
    texts = list(texts)
    return [len(ids) for ids in tokenizer(texts).input_ids] if texts else []


def plan_inference(model_dir, dtype: torch.dtype, *, prompts: list[int] = (),
                   max_new_tokens: int = 0, scored: list[int] = (), forward: int = 0,
                   last_logits: int = 0, sampled: int = 0, reference=None) -> MemoryPlan:
    """Peak memory of a command that reads a model (``eval``, ``locate``, the audit's
    measurements): its weights (and a ``reference`` model's, loaded beside it) in ``dtype``,
    then the largest of its phases, each at its largest batch as the measuring code batches
    the data's token lengths: greedy generation from ``prompts`` (their KV cache with
    ``max_new_tokens`` more, and the prefill) or a sampling batch of ``sampled`` tokens (the
    leak audit's: prompts × samples rows, prompt and completion), teacher-forced scoring of the
    ``scored`` sequences (logits in ``dtype``, their fp32 copy and log-softmax), a forward of
    ``forward`` tokens of which ``last_logits`` rows keep one position's logits (MMLU, causal
    tracing), and on a CPU the loading itself (the checkpoint as saved, read beside the
    weights made of it)."""
    device, available = device_memory()
    model = meta_model(model_dir)
    window, size = context_window(model), torch.finfo(dtype).bits // 8
    vocab = model.get_input_embeddings().num_embeddings
    layer = _no_grad_width(model) * size
    budget = [min(n, max(1, window - max_new_tokens)) + max_new_tokens for n in prompts]
    generated = max(_padded_tokens(budget, GENERATION_TOKENS, GENERATION_ROWS), sampled)
    scoring = _padded_tokens([min(n, window) for n in scored], BATCH_TOKENS, SCORING_ROWS)
    phases = {"generation": generated * (_kv_width(model) * size + layer),
              "scoring": scoring * (vocab * (size + 2 * FP32) + layer),
              "forward": forward * layer + last_logits * vocab * 2 * FP32,
              # a CPU process reads the checkpoint (mapped, in its saved dtype) beside the
              # weights it converts it into; a GPU's copy is made from the CPU's
              "loading": weight_bytes(model, saved_dtype(model_dir)) if device == "cpu" else 0}
    phase = max(phases, key=phases.get)
    parts = {"weights": weight_bytes(model, dtype),
             "reference": weight_bytes(meta_model(reference), dtype) if reference else 0,
             phase: phases[phase], "runtime": CPU_RUNTIME if device == "cpu" else 0}
    return MemoryPlan(parts, device, available, 1, False, 0)


def settle_allocator(plan: MemoryPlan) -> bool:
    """Where ``plan`` is tight, have freed tensors go back to the system at once
    (:func:`unlearn.accel.return_freed_memory`): a resident set near the plan, at the price of
    slower steps, which a plan with room does not pay (figures: docs/design.md, "Memory").
    Returns whether it was set; it stays set for the process's life."""
    return plan.tight and return_freed_memory()


def require_inference_fit(plan: MemoryPlan, command: str) -> None:
    """Refuse a reading command whose plan does not fit its device, naming what would; settle
    the allocator for one that fits tightly."""
    if plan.fits:
        settle_allocator(plan)
        return
    raise MemoryPlanError(f"{command} needs about {plan.peak / GIB:.1f} GiB, more than "
                          f"{HEADROOM:.0%} of the {plan.available / GIB:.1f} GiB {plan.device} "
                          f"has; would fit: --dtype bf16 (half the weights and cache), a "
                          f"device with more memory\n{plan.table()}")
