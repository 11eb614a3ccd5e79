"""Finding a causal LM's decoder layers and choosing which of them train."""

from __future__ import annotations

import torch.nn as nn

MLP_NAMES = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "dense_h_to_4h",
             "dense_4h_to_h")


def decoder_layers(model) -> nn.ModuleList:
    """The stack of transformer blocks (``model.model.layers`` for OLMo/Llama-style models): the
    longest ModuleList whose length is ``config.num_hidden_layers``."""
    n = model.config.num_hidden_layers
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not stacks:
        raise ValueError(f"{type(model).__name__}: no stack of {n} decoder layers found")
    return stacks[0]


def check_layer_spec(spec: str) -> None:
    """Raise a ValueError naming ``layers=`` when ``spec`` is not ``all``, ``auto``,
    ``last:K``, a slice ``A:B`` or a comma list of indices and ranges (the model's size is
    checked later)."""
    _parse(spec)


def _parse(spec: str) -> str | int | slice | list[int]:
    """``"all"``, ``"auto"``, K of ``last:K``, a slice, or the indices listed."""
    spec = spec.strip()
    if spec in ("all", "auto"):
        return spec
    usage = (f"layers={spec}: use all, last:K, auto, a slice like 0:-2 (every layer but the "
             f"last two) or indices and ranges like 0-5 or 0,3,5")
    try:
        if spec.startswith("last:"):
            return int(spec[5:])
        if ":" in spec:  # Python's slice over the layers: a share of any depth
            start, stop = (int(x) if x.strip() else None for x in spec.split(":"))
            return slice(start, stop)
        chosen = set()
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            low, _, high = part.partition("-")
            chosen.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise ValueError(usage) from None
    if not chosen:
        raise ValueError(usage)
    return sorted(chosen)


def layer_indices(spec: str, n: int) -> list[int]:
    """``all``, ``last:K``, a slice (``0:-2``: every layer but the last two) or a comma list of
    indices and ranges (``0,3,5``, ``0-5``) as sorted layer indices in ``range(n)``."""
    parsed = _parse(spec)
    if parsed == "all":
        return list(range(n))
    if parsed == "auto":
        raise ValueError("layers=auto: read the layers from the trace first")
    if isinstance(parsed, slice):
        chosen = list(range(n)[parsed])
        if not chosen:
            raise ValueError(f"layers={spec}: no layer of the model's {n} in that slice")
        return chosen
    if isinstance(parsed, int):
        if not 1 <= parsed <= n:
            raise ValueError(f"layers={spec}: the model has {n} layers; use last:1..last:{n}")
        return list(range(n - parsed, n))
    if not all(0 <= i < n for i in parsed):
        raise ValueError(f"layers={spec}: indices must lie in 0..{n - 1}")
    return parsed


# a decoder layer's two blocks under each architecture's name for them (OLMo/Llama self_attn,
# Falcon self_attention, GPT-NeoX attention, GPT-2 attn)
BLOCK_NAMES = {"attn": ("self_attn", "self_attention", "attention", "attn"),
               "mlp": ("mlp", "feed_forward", "ffn")}


def block(layer: nn.Module, kind: str) -> nn.Module:
    """The attention (``kind="attn"``) or MLP (``"mlp"``) block of one decoder layer."""
    for name in BLOCK_NAMES[kind]:
        child = getattr(layer, name, None)
        if isinstance(child, nn.Module):
            return child
    raise ValueError(f"{type(layer).__name__}: no {kind} block (looked for "
                     f"{', '.join(BLOCK_NAMES[kind])})")


def is_mlp(name: str) -> bool:
    return ".mlp." in name or any(f".{m}" in name for m in MLP_NAMES)


ATTENTION_NAMES = ("self_attn", "attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj",
                   "query_key_value", "c_attn")


def is_attention(name: str) -> bool:
    return any(f".{a}." in name for a in ATTENTION_NAMES)


# The same projection under other architectures' names (GPT-NeoX fuses q, k and v; GPT-2 style
# models name the MLP c_fc/c_proj), so LoRA targets written for Llama/OLMo carry over.
PROJECTION_ALIASES = {
    "q_proj": ("query_key_value", "c_attn", "query"),
    "k_proj": ("query_key_value", "c_attn", "key"),
    "v_proj": ("query_key_value", "c_attn", "value"),
    "o_proj": ("dense", "c_proj", "out_proj"),
    "up_proj": ("dense_h_to_4h", "c_fc", "fc1"),
    "gate_proj": (),
    "down_proj": ("dense_4h_to_h", "c_proj", "fc2"),
}


def resolve_projections(layers: nn.ModuleList, names: list[str]) -> list[str]:
    """``names`` as the module names this model uses: each kept when a decoder layer has a
    module of that name, else replaced by its first alias present; unknown ones dropped."""
    present = {name.rsplit(".", 1)[-1] for name, _ in layers[0].named_modules()}
    resolved = []
    for name in names:
        match = name if name in present else next(
            (a for a in PROJECTION_ALIASES.get(name, ()) if a in present), None)
        if match and match not in resolved:
            resolved.append(match)
    return resolved
