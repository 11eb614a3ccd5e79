"""Which weights a run trains: chosen layers and modules of the decoder, or LoRA adapters on
them (the settings every method shares: ``layers``, ``modules``, ``lora``)."""

from __future__ import annotations

from peft import LoraConfig, get_peft_model

from ..models.layers import (
    decoder_layers,
    is_attention,
    is_mlp,
    layer_indices,
    resolve_projections,
)
from ..tracing.command import read_layers


def select_parameters(model, config):
    """Freeze everything but the chosen layers (and modules), or wrap them in LoRA adapters.
    Returns the model to train (a PEFT model with LoRA)."""
    stack = decoder_layers(model)
    spec = config.layers
    if spec == "auto":
        if not config.trace:
            raise ValueError("layers=auto reads the layers `unlearn locate` chose: set "
                             "trace=OUT/trace.json")
        spec = ",".join(map(str, read_layers(config.trace)))
    chosen = layer_indices(spec, len(stack))
    keep = {"all": lambda name: True, "mlp": is_mlp, "attn": is_attention}.get(config.modules)
    if keep is None:  # a comma list of module names, e.g. down_proj
        names = [m.strip() for m in config.modules.split(",") if m.strip()]
        keep = lambda name: any(f".{m}." in name + "." for m in names)  # noqa: E731
        if not any(keep("." + n) for n, _ in stack.named_parameters()):
            raise ValueError(f"modules={config.modules}: no such module in the decoder layers; "
                             f"use all, mlp, attn or module names like down_proj")
    if config.lora:
        targets = resolve_projections(stack, [t.strip() for t in config.lora_targets.split(",")
                                              if t.strip()])
        targets = [t for t in targets if keep("." + t + ".")]
        if config.modules not in ("all", "mlp", "attn"):
            targets = [m.strip() for m in config.modules.split(",") if m.strip()]
        if not targets:
            raise ValueError(f"modules={config.modules} with LoRA: lora_targets names no such "
                             f"projection")
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout, target_modules=targets,
                          layers_to_transform=None if spec == "all" else chosen)
        return get_peft_model(model, lora)
    everything = spec == "all" and config.modules == "all"
    inside = {id(p) for p in stack.parameters()}
    for p in model.parameters():
        p.requires_grad_(everything or (config.train_outside and id(p) not in inside))
    if not everything:
        for i in chosen:
            for name, p in stack[i].named_parameters():
                if keep("." + name):
                    p.requires_grad_(True)
    return model

