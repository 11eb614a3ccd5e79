"""Peak memory per device of an ``unlearn run``, planned before any weight is loaded.

The model is built on the meta device from its config (accelerate's ``init_empty_weights``; its
sizes from ``compute_module_sizes``), the method's settings choose what trains exactly as the run
will (:func:`~unlearn.methods.trainable.select_parameters`), and the memory is added up by part:

- weights: the model as the run loads it, fp32 (autocast computes in bf16; weights stay fp32);
- gradients and AdamW's two moments: 4 + 8 bytes per trainable weight;
- the rollback copy: 4 bytes per trainable weight (the last finite weights), kept where the
  weights are whole and the plan has room for it (run.json's ``rollback``);
- references: a frozen copy of the source where the method reads its logits or hidden states
  without LoRA (with LoRA the adapters are switched off instead), and the teacher, both in the
  run's precision (bf16 under bf16 autocast);
- activations: what backward needs from the lowest layer that trains upward, at the configured
  batch and length: each 2-D weight keeps its input and output per token (bf16 under autocast);
  with gradient checkpointing only each layer's input, plus one layer recomputed;
- logits: fp32 logits, their log-softmax and its gradient, and the references' logits;
- checks: the selection's scoring between steps, a batch of ``BATCH_TOKENS`` tokens' logits,
  where it needs more than training's activations and logits (freed by then);
- runtime: the interpreter and libraries on a CPU (GPU figures are torch's allocations, the
  CUDA context outside them is what the headroom leaves).

Under ZeRO-3 weights, gradients and optimizer states are split across the processes and the
largest layer is gathered whole. A plan that does not fit ``HEADROOM`` of the device's memory is
refused, naming the settings that would fit.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from .accel import launched_with_deepspeed, process_state, resolve_precision
from .measure.memory import (
    CPU_RUNTIME,
    FP32,
    GIB,
    HEADROOM,
    MemoryPlan,
    MemoryPlanError,
    device_memory,
    meta_model,
    settle_allocator,
    weight_bytes,
)
from .measure.nll import BATCH_TOKENS
from .methods.base import Method, UnlearnConfig
from .methods.trainable import select_parameters
from .models.layers import decoder_layers

GRADIENT, ADAM_MOMENTS, ROLLBACK = 4, 8, 4  # bytes per trainable weight


def _launch() -> tuple[int, bool]:
    """``(processes, sharded)`` as ``accelerate launch`` set them for this process."""
    zero3 = (launched_with_deepspeed()
             and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")
    # accelerate runs FSDP on GPUs only; on CPUs it falls back to data parallel
    fsdp = (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and torch.cuda.is_available())
    return process_state().num_processes, zero3 or fsdp


def _layer_widths(model) -> list[int]:
    """Per decoder layer, the values one token keeps for backward: every 2-D weight's input and
    output, and the two norms' inputs (LoRA's own small matrices left out)."""
    hidden = model.get_input_embeddings().embedding_dim
    return [sum(sum(p.shape) for name, p in layer.named_parameters()
                if p.dim() == 2 and "lora_" not in name) + 2 * hidden
            for layer in decoder_layers(model)]


def _activations(model, config: UnlearnConfig, references_logits: int,
                 rows_per_batch_row: int = 1) -> dict[str, int]:
    """Bytes of one micro-batch's forward kept for backward, and of its logits; a micro-batch
    holds ``rows_per_batch_row × batch_size`` rows (:attr:`Method.rows_per_batch_row`)."""
    layers, widths = decoder_layers(model), _layer_widths(model)
    training = [i for i, layer in enumerate(layers)
                if any(p.requires_grad for p in layer.parameters())]
    lowest = (0 if model.get_input_embeddings().weight.requires_grad
              else training[0] if training else len(layers))
    tokens = rows_per_batch_row * config.batch_size * config.max_len
    width = 2 if resolve_precision(config.precision) == "bf16" else FP32
    hidden = model.get_input_embeddings().embedding_dim
    if config.gradient_checkpointing:  # each layer's input, and one layer recomputed at a time
        kept = (len(layers) - lowest) * hidden + max(widths[lowest:], default=0)
    else:
        kept = sum(widths[lowest:])
    vocab = model.get_input_embeddings().num_embeddings
    # logits, their log-softmax and its gradient in fp32; the references' logits beside them
    logits = tokens * vocab * FP32 * (3 + 2 * references_logits)
    return {"activations": tokens * kept * width, "logits": logits}


def _checks(model, config: UnlearnConfig, training: int) -> int:
    """What the selection's (or validation's) scoring between steps needs beyond training's own
    activations and logits, which are freed by then: a scoring batch's logits, their fp32 copy
    and log-softmax. Planned whenever the run may check (``select`` other than none)."""
    if config.select == "none" and not config.validation:
        return 0
    vocab = model.get_input_embeddings().num_embeddings
    return max(0, BATCH_TOKENS * vocab * FP32 * 3 - training)


def plan_run(method: type[Method], config: UnlearnConfig, model_dir, teacher=None, *,
             processes: int | None = None, sharded: bool | None = None,
             device: str | None = None, available: int | None = None) -> MemoryPlan:
    """The memory plan of ``method`` at ``config`` on the model in ``model_dir`` (read: its
    config only), ``teacher`` (a model directory) beside it. ``processes``/``sharded`` default
    to how ``accelerate launch`` started this process; ``device``/``available`` to its device."""
    launched = _launch()
    processes = launched[0] if processes is None else processes
    sharded = launched[1] if sharded is None else sharded
    if device is None:
        device, available = device_memory()
    model = meta_model(model_dir)
    largest = max(weight_bytes(layer) for layer in decoder_layers(model))
    trained = select_parameters(model, config)
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    share = processes if sharded else 1
    frozen_copy = bool(set(method.reference) & {"logits", "hidden"}) and not config.lora
    # frozen models load in the run's precision (accel.frozen_dtype)
    frozen = torch.bfloat16 if resolve_precision(config.precision) == "bf16" else torch.float32
    transient = _activations(model, config, ("logits" in method.reference) + (teacher is not None),
                             method.rows_per_batch_row)
    parts = {
        "weights": weight_bytes(trained) // share + (largest if sharded else 0),
        "gradients": trainable * GRADIENT // share,
        "optimizer": trainable * ADAM_MOMENTS // share,
        "rollback": 0 if sharded else trainable * ROLLBACK,
        "references": (weight_bytes(model, frozen) if frozen_copy else 0) // share,
        "teacher": weight_bytes(meta_model(teacher), frozen) // share if teacher else 0,
        **transient,
        "checks": _checks(model, config, sum(transient.values())),
        "runtime": CPU_RUNTIME if device == "cpu" else 0,
    }
    plan = MemoryPlan(parts, device, available, processes, sharded, trainable)
    if not plan.fits and parts["rollback"]:  # the NaN rollback is the first thing to give up
        without = replace(plan, parts={**parts, "rollback": 0})
        return without if without.fits else plan
    return plan


def plan_attack(model_dir, training: UnlearnConfig, dtype: torch.dtype,
                reading: MemoryPlan | None = None) -> MemoryPlan:
    """Peak memory of ``unlearn audit`` on the model in ``model_dir`` (read: its config only):
    the relearning attack, loaded in ``dtype`` and trained at ``training`` (the attack's
    settings, :meth:`~unlearn.evaluation.relearn.RelearnConfig.training`, its ``max_len`` no
    longer than the longest row it trains on): every weight, its gradient and AdamW's moments in
    ``dtype``, or LoRA adapters in fp32. ``reading``: the plan of the audit's measurements of
    the same model (:func:`~unlearn.measure.memory.plan_inference`), whose largest phase holds
    memory only beyond the attack's own, freed by then. One model is held at a time."""
    device, available = device_memory()
    model = select_parameters(meta_model(model_dir), training)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = FP32 if training.lora else torch.finfo(dtype).bits // 8
    attack = {"gradients": trainable * state, "optimizer": trainable * 2 * state,
              **_activations(model, training, 0)}
    parts = {"weights": weight_bytes(model, dtype), **attack}
    if reading is not None:
        phase, size = max(((k, v) for k, v in reading.parts.items()
                           if k not in ("weights", "reference", "runtime")),
                          key=lambda kv: kv[1], default=("reading", 0))
        parts[f"{phase} (more)"] = max(0, size - sum(attack.values()))
    parts["runtime"] = CPU_RUNTIME if device == "cpu" else 0
    return MemoryPlan(parts, device, available, 1, False, trainable)


# what a run that does not fit may change, tried in this order; each keeps the effective batch
def _alternatives(config: UnlearnConfig) -> list[tuple[str, dict]]:
    options = [("lora=true", {"lora": True}),
               ("gradient_checkpointing=true", {"gradient_checkpointing": True}),
               ("lora=true gradient_checkpointing=true",
                {"lora": True, "gradient_checkpointing": True})]
    if config.batch_size > 1:
        half = config.batch_size // 2
        options.append((f"batch_size={half} grad_accum={config.grad_accum * 2}",
                        {"batch_size": half, "grad_accum": config.grad_accum * 2}))
    return [(text, change) for text, change in options
            if any(getattr(config, k) != v for k, v in change.items())]


def require_fit(plan: MemoryPlan, method: type[Method], config: UnlearnConfig, model_dir,
                teacher=None) -> None:
    """Refuse a run whose plan does not fit its device, naming the settings that would; settle
    the allocator for one that fits tightly (:func:`settle_allocator`)."""
    if plan.fits:
        settle_allocator(plan)
        return
    fitting = []
    for text, change in _alternatives(config):
        other = plan_run(method, replace(config, **change), model_dir, teacher,
                         processes=plan.processes, sharded=plan.sharded, device=plan.device,
                         available=plan.available)
        if other.fits:
            fitting.append(f"{text} ({other.peak / GIB:.1f} GiB)")
    shard = ("" if plan.sharded else "; or split the weights across GPUs: accelerate launch "
             "--config_file configs/accelerate/zero3-offload.yaml unlearn run ...")
    would = ("would fit: " + ", ".join(fitting)) if fitting else "no single setting fits"
    raise MemoryPlanError(f"{method.name} needs about {plan.peak / GIB:.1f} GiB per device, "
                          f"more than {HEADROOM:.0%} of the {plan.available / GIB:.1f} GiB "
                          f"{plan.device} has; {would}{shard}\n{plan.table()}")
