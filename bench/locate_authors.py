"""SHA256's own causal tracing (``causal_trace.py``, ROME's code as its authors adapted it), run
on a model and facts for ``bench/locate_fidelity.py``. Runs in the virtual environment of the
authors' versions (bench/README.md), with their repository checked out at a pinned commit:
nothing of theirs is imported by the project or copied into it; this file only calls it.

    python locate_authors.py --code CHECKOUT --model DIR --facts FACTS.json --out OUT.json \
        --window 10 --samples 10

``FACTS.json`` is their ``known_QA_T2.json`` format (known_id, subject, attribute, prompt).
Writes, per fact, what their ``calculate_hidden_flow`` returns for each kind (the whole layer,
``mlp``, ``self_attn``) at their noise rule ``s3`` (3 x the standard deviation of the subjects'
embeddings, ``collect_embedding_std``), and that noise level.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

KINDS = {"residual": None, "mlp": "mlp", "attn": "self_attn"}  # ours: theirs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--code", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--facts", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--samples", type=int, default=10)
    args = p.parse_args()
    sys.path.insert(0, str(args.code))
    import causal_trace as ct  # their module, from their checkout

    # their make_inputs puts every batch on "cuda"; the comparison runs on the CPU
    ct.make_inputs.__defaults__ = ("cpu",)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    ct.nethook.set_requires_grad(False, model)  # as their ModelAndTokenizer does
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.model)
    mt = ct.ModelAndTokenizer(model=model, tokenizer=tokenizer)
    knowns = json.loads(args.facts.read_text())
    # their __main__: parse_noise_rule("s3") -> 3 x collect_embedding_std over every subject
    noise = 3.0 * ct.collect_embedding_std(mt, [k["subject"] for k in knowns])
    results = []
    for k in knowns:
        row = {"known_id": k["known_id"]}
        for ours, kind in KINDS.items():
            r = ct.calculate_hidden_flow(mt, k["prompt"], k["subject"], samples=args.samples,
                                         noise=noise, window=args.window, kind=kind,
                                         expect=k["attribute"])
            if not r["correct_prediction"]:
                row["skipped"] = True
                break
            row.update({ours: r["scores"].tolist(), "low_score": r["low_score"],
                        "high_score": float(r["high_score"]), "answer": r["answer"],
                        "subject_range": list(r["subject_range"]),
                        "tokens": len(r["input_ids"])})
        results.append(row)
    args.out.write_text(json.dumps({"noise": noise, "layers": mt.num_layers,
                                    "facts": results}, indent=1))


if __name__ == "__main__":
    main()
