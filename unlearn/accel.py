"""One place that decides devices and precision, through accelerate."""

from __future__ import annotations

from functools import lru_cache

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

PRECISIONS = ("auto", "bf16", "fp32")


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


def make_accelerator(precision: str = "auto") -> Accelerator:
    """An Accelerator with mixed precision resolved (weights stay fp32; matmuls run in bf16)."""
    mode = resolve_precision(precision)
    # Accelerate keeps one process-wide state and refuses a second precision in the same process
    # (a notebook that builds a target, then unlearns). Reset that part only; the distributed
    # process group (PartialState) is kept.
    AcceleratorState._reset_state()
    # cpu=True without a GPU: under `accelerate launch`/torchrun that makes the processes one
    # gloo group (MULTI_CPU) instead of independent runs
    return Accelerator(mixed_precision="bf16" if mode == "bf16" else "no",
                       cpu=not torch.cuda.is_available())
