"""Planned memory per GPU of every method on real model shapes (issue 43), no weights needed.

    python bench/plan.py                  # OLMo-1B, OLMo-7B, Llama-3-8B on one 80 GB GPU
    python bench/plan.py --gpu-gib 141    # an H200

Each shape's config is written here (no download) and built on the meta device; every method is
planned at its paper settings (`profile=paper`) in bf16 autocast, then with `lora=true`, then
with LoRA and gradient checkpointing. Prints peak GiB per device and whether it fits 90% of the
GPU; writes bench/results/plan-shapes.json. These are plans, not measurements: the plan's
formulas are in `unlearn/plan.py`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from transformers import LlamaConfig, OlmoConfig

from unlearn.engine import resolve_config
from unlearn.methods import METHODS
from unlearn.plan import GIB, plan_run

SHAPES = {
    "OLMo-1B": OlmoConfig(vocab_size=50304, hidden_size=2048, num_hidden_layers=16,
                          num_attention_heads=16, intermediate_size=8192,
                          max_position_embeddings=4096),
    "OLMo-7B": OlmoConfig(vocab_size=50304, hidden_size=4096, num_hidden_layers=32,
                          num_attention_heads=32, intermediate_size=11008,
                          max_position_embeddings=4096),
    "Llama-3-8B": LlamaConfig(vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8,
                              intermediate_size=14336, max_position_embeddings=8192),
}
VARIANTS = {"paper": {}, "lora": {"lora": True},
            "lora+checkpointing": {"lora": True, "gradient_checkpointing": True}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu-gib", type=float, default=80.0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "plan-shapes.json"))
    args = p.parse_args()
    available = int(args.gpu_gib * GIB)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape, config in SHAPES.items():
            model_dir = Path(tmp) / shape
            config.save_pretrained(model_dir)
            for name in sorted(m for m in METHODS if m != "merge"):
                method = METHODS[name]
                for variant, change in VARIANTS.items():
                    settings, _ = resolve_config(method, model_dir, "paper", precision="bf16",
                                                 **change)
                    plan = plan_run(method, settings, model_dir, processes=1, sharded=False,
                                    device="cuda:0", available=available)
                    rows.append({"shape": shape, "method": name, "variant": variant,
                                 "peak_gib": round(plan.peak / GIB, 1), "fits": plan.fits,
                                 "parts_gib": {k: round(v / GIB, 2)
                                               for k, v in plan.parts.items()}})
                    print(f"{shape:11} {name:7} {variant:19} {plan.peak / GIB:7.1f} GiB "
                          f"{'fits' if plan.fits else 'does not fit'}")
    Path(args.out).write_text(json.dumps({"command": "python bench/plan.py", "gpu_gib":
                                          args.gpu_gib, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
