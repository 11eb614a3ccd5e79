"""One place that decides devices and precision, through accelerate."""

from __future__ import annotations

import ctypes
import os
from copy import deepcopy
from functools import lru_cache
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, gather_object

PRECISIONS = ("auto", "bf16", "fp32")
TRACKERS = ("tensorboard", "wandb", "none")  # where training curves go (accelerate's trackers)


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), which roughly
    doubles training speed; elsewhere bf16 is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str = "auto") -> str:
    """``auto`` trains in bf16 mixed precision on a GPU or a bf16-capable CPU, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_bf16() else "fp32"
    return precision


def launched_with_deepspeed() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


_precision_in_use: list[str] = []  # the mixed precision this process's accelerate state holds


def _switch_precision(mixed: str) -> None:
    """Accelerate keeps one process-wide state and refuses a second mixed precision in the same
    process (a notebook that builds a fp32 target, then unlearns in bf16). It offers no public
    way to change it, so only on such a change is that state cleared; the distributed process
    group (``PartialState``) is kept."""
    if _precision_in_use and _precision_in_use[-1] != mixed:
        reset = getattr(AcceleratorState, "_reset_state", None)
        if reset is None:
            raise RuntimeError(f"this accelerate version cannot switch from "
                               f"{_precision_in_use[-1]} to {mixed} mixed precision within one "
                               f"process: give the same precision= to every step, or run each "
                               f"in its own process")
        reset()
    _precision_in_use[:] = [mixed]


def _devices() -> tuple[bool, dict]:
    """``(cpu, process group settings)`` for accelerate. cpu=True without a GPU: under
    ``accelerate launch``/torchrun that makes the processes one gloo group (MULTI_CPU) instead
    of independent runs. DeepSpeed runs on CPUs too (its CPU accelerator, gloo): accelerate only
    enables it with cpu=False, and then needs the backend named or it counts a single process."""
    if torch.cuda.is_available():
        return False, {}
    if launched_with_deepspeed():
        return False, {"backend": "gloo"}
    return True, {}


def process_state() -> PartialState:
    """This process's place among those ``accelerate launch`` started, on the devices
    :func:`make_accelerator` uses."""
    cpu, group = _devices()
    return PartialState(cpu=cpu, **group)


def make_accelerator(precision: str = "auto", micro_batch: int = 1,
                     max_grad_norm: float = 1.0, report_to: str = "none",
                     logging_dir: Path | None = None) -> Accelerator:
    """An Accelerator with mixed precision resolved (weights stay fp32; matmuls run in bf16).
    Under DeepSpeed, ``micro_batch`` (rows per micro-batch) and ``max_grad_norm`` fill its
    config (see :func:`_configure_deepspeed`). ``report_to`` names accelerate's tracker for
    the training curves, written under ``logging_dir`` once :func:`start_logging` is called."""
    mixed = "bf16" if resolve_precision(precision) == "bf16" else "no"
    _switch_precision(mixed)
    cpu, group = _devices()
    handlers = [InitProcessGroupKwargs(**group)] if group else []
    trackers = ({} if report_to == "none"
                else {"log_with": report_to, "project_dir": logging_dir})
    accelerator = Accelerator(mixed_precision=mixed, cpu=cpu, kwargs_handlers=handlers,
                              **trackers)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _configure_deepspeed(accelerator, micro_batch, max_grad_norm)
    use_tf32()
    if cpu:
        # a model that has memorised puts near-zero probability on most of its vocabulary, so
        # the softmax backward fills the LM-head matmuls with subnormal floats, slow on x86;
        # values below 1e-38 change nothing when flushed to zero
        torch.set_flush_denormal(True)
    return accelerator


def use_tf32() -> None:
    """fp32 matmuls in TF32 on a GPU that has it (Ampere and newer: 10-bit mantissa inputs, fp32
    accumulation), several times faster; what bf16 autocast leaves in fp32 (fp32 runs, the
    logits' loss) gains most. On a CPU nothing changes."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")


#: glibc's mallopt parameter for the size from which a block gets its own mapping
M_MMAP_THRESHOLD = -3
OWN_MAPPING_FROM = 1 << 20  # bytes


def return_freed_memory() -> bool:
    """Have glibc give every block of 1 MiB or more its own mapping, returned to the system the
    moment the tensor holding it is freed. By default the threshold rises to 32 MiB after the
    first large free, so a forward pass's freed temporaries stay in the heap and the resident
    set outgrows the live tensors the memory plan counts (figures: README, "Scale"; docs/design.md,
    "Memory"). The price is time: every large tensor's pages are faulted in afresh. Process-wide
    and kept for the process's life, so called only where a memory plan is tight
    (:func:`unlearn.measure.memory.settle_allocator`). False where the C library is not glibc
    (macOS, musl), which leaves memory as it was."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return libc.mallopt(M_MMAP_THRESHOLD, OWN_MAPPING_FROM) == 1


def start_logging(accelerator: Accelerator, name: str, settings: dict) -> None:
    """Open the trackers (when the accelerator has any), with ``settings`` as the run's
    hyperparameters (those a tracker can store: numbers, text, booleans)."""
    if accelerator.log_with:
        accelerator.init_trackers(name, config={k: v for k, v in settings.items()
                                                if isinstance(v, (int, float, str, bool))})


def across_processes(items: list, compute) -> list:
    """``compute(items)`` (one result per item), the items dealt out to the processes of an
    ``accelerate launch`` and the results gathered back, in order, on every process (the
    official scorer writes one file per rank for the same reason); ``compute(items)`` itself on
    one process."""
    state = process_state()
    if state.num_processes == 1:
        return compute(items)
    mine = list(range(state.process_index, len(items), state.num_processes))
    results = compute([items[i] for i in mine]) if mine else []
    found = dict(gather_object(list(zip(mine, results))))
    return [found[i] for i in range(len(items))]


def stop_logging(accelerator: Accelerator) -> None:
    """Close the trackers, flushing what they hold. Not ``end_training``: that also ends the
    process group, which saving a ZeRO-3 model (and whatever runs next) still needs."""
    for tracker in accelerator.trackers:
        tracker.finish()


def zero3(accelerator: Accelerator) -> bool:
    """Whether parameters are sharded across processes by DeepSpeed ZeRO stage 3."""
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin.zero_stage == 3


def numel(parameter: torch.nn.Parameter) -> int:
    """Elements of a parameter, counted whole even where ZeRO-3 left only a shard here."""
    return getattr(parameter, "ds_numel", parameter.numel())


def _configure_deepspeed(accelerator: Accelerator, micro_batch: int,
                         max_grad_norm: float) -> None:
    """Fill the DeepSpeed config from the run's settings. The training loop accumulates
    micro-batches itself (their number varies from step to step), so DeepSpeed sees one
    micro-batch per step and steps at the boundaries the loop marks; it clips gradients
    itself, so the clipping norm goes into its config."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1,
                  train_batch_size=micro_batch * accelerator.num_processes,
                  gradient_clipping=max_grad_norm)
    # the output is a whole HF model directory, so the shards are always gathered for saving
    config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


def frozen_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype a frozen model (a reference, a teacher) loads in: bf16 where the run computes
    in bf16 (autocast would cast its fp32 weights on every call; bf16 halves their memory),
    else fp32."""
    return torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32


def prepare_frozen(accelerator: Accelerator, model):
    """A frozen second model (a reference) placed like the trained one. Under ZeRO-3 it is
    sharded by a DeepSpeed engine of its own, as TRL does for its reference models: a plain
    copy of a sharded model would hold only this process's shard."""
    model.requires_grad_(False).eval()
    if not zero3(accelerator):
        return model.to(accelerator.device)
    import deepspeed

    config = deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    # what accelerate fills in from the model when it prepares one (an engine of our own here)
    hidden = model.config.hidden_size
    zero = config["zero_optimization"]
    for key, value in (("reduce_bucket_size", hidden * hidden),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                       ("stage3_param_persistence_threshold", 10 * hidden)):
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    engine = deepspeed.initialize(model=model, config=config)[0]
    engine.eval()  # DeepSpeed's eval() returns None, not the engine
    return engine


def sharded(accelerator: Accelerator) -> bool:
    """Whether each process holds only a shard of the weights: DeepSpeed ZeRO-3 or FSDP."""
    return zero3(accelerator) or accelerator.distributed_type == DistributedType.FSDP


def whole_state_dict(accelerator: Accelerator, model) -> dict | None:
    """Where the weights are sharded (ZeRO-3, FSDP) the full state dict of a prepared model,
    gathered through accelerate for ``save_pretrained(state_dict=...)``: every process must
    call this, and the main process gets it. None otherwise (``save_pretrained`` reads the
    model's own weights)."""
    if sharded(accelerator):
        return accelerator.get_state_dict(model)
    return None
