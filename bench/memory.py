"""Peak memory of LoRA against full fine-tuning of the same layers (issue 4).

    unlearn data synth --out runs/bench/memory-data --docs-per-task 4
    python bench/memory.py --tokenizer runs/bench/target-lume-small --data runs/bench/memory-data

Builds a randomly initialised OLMo of ~110M parameters (the `base` preset's shape, where weights
rather than activations dominate memory, as in a real 1B/7B model), then runs one epoch of
`sugd` on it with full fine-tuning and with LoRA, each in its own process, for each layer
choice, at the SUGD authors' batch of one row (`--batch-size`; `--checkpointing` recomputes
activations, which otherwise dominate a LoRA run's memory at larger batches). A few rows are
enough: memory peaks at the first optimizer step (on the full synthetic set each 110M run
takes minutes per epoch on 2 cores). Prints peak memory (GPU: torch's peak
allocation; CPU: the process's peak resident set) and the training overhead above the memory in
use once the model was loaded. Floor: LoRA <= 50% of full fine-tuning's peak.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from transformers import OlmoConfig, OlmoForCausalLM

from unlearn.models.loading import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="a model directory whose tokenizer to use")
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="runs/bench/memory")
    p.add_argument("--layers", default="all,last:4")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    args = p.parse_args()
    out = Path(args.out)
    model_dir = out / "model"
    if not (model_dir / "config.json").is_file():
        tokenizer = load_tokenizer(args.tokenizer)
        config = OlmoConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                            num_hidden_layers=12, num_attention_heads=12,
                            pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
        OlmoForCausalLM(config).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    rows = []
    for layers in args.layers.split(","):
        for lora in ("false", "true"):
            run_dir = out / f"sugd-{layers.replace(':', '')}-lora{lora}"
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: its own peak is measured
            subprocess.run([sys.executable, "-m", "unlearn.cli", "run", "--method", "sugd",
                            "--model", str(model_dir), "--data", args.data, "--out", str(run_dir),
                            "--profile", "paper", "epochs=1", "chunk_size=8", "positive_ratio=1",
                            f"batch_size={args.batch_size}", f"layers={layers}", f"lora={lora}",
                            f"gradient_checkpointing={args.checkpointing}", "precision=fp32"],
                           check=True)
            record = json.loads((run_dir / "run.json").read_text())
            rows.append({"layers": layers, "lora": lora == "true", "batch_size": args.batch_size,
                         "checkpointing": args.checkpointing,
                         "trainable": record["trainable_parameters"],
                         "peak_mb": record["peak_memory_mb"],
                         "loaded_mb": record["peak_memory_before_training_mb"]})
    print(f"{'layers':8} {'lora':5} {'trainable':>12} {'peak MB':>9} {'overhead MB':>12}")
    for r in rows:
        print(f"{r['layers']:8} {str(r['lora']):5} {r['trainable']:12,} {r['peak_mb']:9.0f} "
              f"{r['peak_mb'] - r['loaded_mb']:12.0f}")
    for layers in args.layers.split(","):
        full, lora = [r for r in rows if r["layers"] == layers]
        overhead = ((lora["peak_mb"] - lora["loaded_mb"])
                    / (full["peak_mb"] - full["loaded_mb"]))
        print(f"layers={layers}: LoRA peak = {lora['peak_mb'] / full['peak_mb']:.0%} of full "
              f"fine-tuning's; overhead {overhead:.0%}")
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    name = f"memory-batch{args.batch_size}" + ("-checkpointing" if args.checkpointing else "")
    (results / f"{name}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
