"""Generation speed of the evaluation: batched fast path vs the official one-row-at-a-time path.

    python bench/eval_speed.py --model runs/bench/target-memorise-small --data ../shared/lume/validation

Prints rows/s of both paths, their ratio, and whether the metrics are identical (floor: >= 4x on
the `small` target on 2 CPU cores, >= 30x on a GPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from unlearn.data import load_lume
from unlearn.evaluate.generation import generate_one_by_one, greedy_generate
from unlearn.evaluate.lume import aggregated_terms, score_generations, split_scores
from unlearn.models import load_model


def terms(rows, texts) -> list[float]:
    scored = score_generations(rows, texts, [0.0] * len(rows), [False] * len(rows))
    return aggregated_terms(split_scores([r for r in scored if r.split == "forget"]),
                            split_scores([r for r in scored if r.split == "retain"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else None
    dtype = torch.bfloat16 if device else torch.float32
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    rows = load_lume(args.data).rows[: args.limit]
    prompts = [r.input for r in rows]

    t0 = time.perf_counter()
    fast = greedy_generate(model, tokenizer, prompts, args.max_new_tokens,
                           answers=[r.output if r.kind == "qa" else None for r in rows])
    fast_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = generate_one_by_one(model, tokenizer, prompts, args.max_new_tokens)
    slow_s = time.perf_counter() - t0

    fast_terms, slow_terms = terms(rows, [g.text for g in fast]), terms(rows, slow)
    same_text = sum(g.text == s for g, s in zip(fast, slow) if not g.stopped_early)
    kept = sum(not g.stopped_early for g in fast)
    summary = {
        "model": args.model, "rows": len(rows), "device": str(model.device), "dtype": str(dtype),
        "fast_seconds": fast_s, "one_by_one_seconds": slow_s,
        "fast_rows_per_s": len(rows) / fast_s, "one_by_one_rows_per_s": len(rows) / slow_s,
        "speedup": slow_s / fast_s, "metrics_identical": fast_terms == slow_terms,
        "identical_texts": f"{same_text}/{kept} (rows not stopped early)",
        "stopped_early": len(rows) - kept,
    }
    print(json.dumps(summary, indent=2))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"eval_speed-{'gpu' if device else 'cpu'}.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
