"""Generation speed of the evaluation, three paths on the same rows: the official one row at a
time, batched `model.generate` (a stopping criterion for the question rows' early exit), and the
fast path (batched, preallocated KV cache).

    python bench/eval_speed.py --model runs/bench/target-memorise-small \
        --data ../shared/lume/validation

Prints rows/s of each path, the ratios, and whether the metrics are identical (floors: the fast
path >= 4x the official one on the `small` target on 2 CPU cores, >= 30x on a GPU; it is kept
only while >= 1.5x batched `generate`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from unlearn.data import load_lume
from unlearn.measure.generation import generate_one_by_one, greedy_generate
from unlearn.measure.official import aggregated_terms, score_generations, split_scores
from unlearn.models import load_model
from unlearn.models.loading import best_device


def terms(rows, texts) -> list[float]:
    scored = score_generations(rows, texts, [0.0] * len(rows), [False] * len(rows))
    return aggregated_terms(split_scores([r for r in scored if r.split == "forget"]),
                            split_scores([r for r in scored if r.split == "retain"]))[1]


def best_of(repeat: int, generate):
    """The fastest of ``repeat`` timed runs (the first pays for allocator and kernel warm-up)."""
    timings = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        texts = generate()
        timings.append(time.perf_counter() - t0)
    return min(timings), texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    p.add_argument("--repeat", type=int, default=2, help="time each path N times, keep the best")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="both paths' precision (default: bfloat16 on a GPU, float32 on a CPU)")
    args = p.parse_args()
    device = best_device()
    dtype = getattr(torch, args.dtype or ("bfloat16" if device else "float32"))
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    rows = load_lume(args.data).rows[: args.limit]
    prompts = [r.input for r in rows]

    answers = [r.output if r.kind == "qa" else None for r in rows]
    fast_s, fast = best_of(args.repeat, lambda: greedy_generate(
        model, tokenizer, prompts, args.max_new_tokens, answers=answers, fast=True))
    batched_s, batched = best_of(args.repeat, lambda: greedy_generate(
        model, tokenizer, prompts, args.max_new_tokens, answers=answers, fast=False))
    slow_s, slow = best_of(args.repeat, lambda: generate_one_by_one(
        model, tokenizer, prompts, args.max_new_tokens))

    slow_terms = terms(rows, slow)
    same_text = sum(g.text == s for g, s in zip(fast, slow) if not g.stopped_early)
    kept = sum(not g.stopped_early for g in fast)
    summary = {
        "model": args.model, "rows": len(rows), "device": str(model.device), "dtype": str(dtype),
        "repeat": args.repeat, "one_by_one_seconds": slow_s, "generate_batched_seconds": batched_s,
        "fast_seconds": fast_s,
        "one_by_one_rows_per_s": len(rows) / slow_s,
        "generate_batched_rows_per_s": len(rows) / batched_s,
        "fast_rows_per_s": len(rows) / fast_s,
        "speedup": slow_s / fast_s, "fast_vs_generate_batched": batched_s / fast_s,
        "metrics_identical": terms(rows, [g.text for g in fast]) == slow_terms
        == terms(rows, [g.text for g in batched]),
        "identical_texts": f"{same_text}/{kept} (rows not stopped early)",
        "stopped_early": len(rows) - kept,
    }
    print(json.dumps(summary, indent=2))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    name = f"eval_speed-{'gpu' if device else 'cpu'}-{str(dtype).removeprefix('torch.')}.json"
    (out / name).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
