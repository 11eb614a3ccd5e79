"""Unlearning floors (issue 4): methods at their defaults on one target, scored the LUME way.

    python bench/methods.py --target runs/bench/target-lume-small \
        --data ../shared/lume/validation --mia ../shared/lume/mia_validation \
        --mmlu runs/synth/mmlu --methods sugd,gd,ga,npo

A label may name a variant, `label:method`, with its own settings: `--methods
sugd,sugd_fixed:sugd sugd_fixed.select=none` compares SUGD choosing its model by the estimated
score (the default with an MIA set) with SUGD at its fixed schedule. Every run is given the MIA
set and calibrates on a held-out 30% (`select_split`); every model's MIA score is taken on the
other 70%, so all rows compare on the same documents.

Each method runs in its own process (so its peak memory is its own) through the `unlearn run`
command, then the unlearned model is evaluated. Prints one row per model and writes
bench/results/unlearn-<name>.json. Floors: sugd has the best final score, its forget knowledge
is <= 0.05 while retain knowledge stays >= 0.9 of the target's, and it takes <= 25% of the
target's training time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import unlearn
from unlearn.data import load_lume
from unlearn.methods.base import UnlearnConfig
from unlearn.selection import scored_rest

SPLIT = UnlearnConfig.select_split  # share of the MIA set runs calibrate on


def _evaluate(model: Path, args, out: Path) -> dict:
    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    return unlearn.evaluate(model, args.data, out, mia=args.mia, mmlu=args.mmlu)


def _row(name: str, results: dict, target: dict, seconds: float | None, train: float,
         memory: float | None) -> dict:
    forget, retain = results["forget-set"], results["retain-set"]
    return {
        "model": name,
        "forget_knowledge": forget["overall-knowledge-score"],
        "forget_regurgitation": forget["overall-regurgitation-score"],
        "retain_knowledge": retain["overall-knowledge-score"],
        "retain_knowledge_vs_target": (retain["overall-knowledge-score"]
                                       / target["retain-set"]["overall-knowledge-score"]),
        "retain_regurgitation": retain["overall-regurgitation-score"],
        "task_aggregate": results["harmonic-mean-task-aggregate"],
        "mia_auc": results.get("mia_loss_acc"), "mia_score": results.get("mia_final_score"),
        "mmlu": results.get("mmlu_average"), "final_score": results["final-score"],
        "unlearn_seconds": seconds,
        "fraction_of_target_training": seconds / train if seconds else None,
        "peak_memory_mb": memory,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--mia")
    p.add_argument("--mmlu")
    p.add_argument("--methods", default="sugd,gd,ga,npo")
    p.add_argument("--out", default="runs/bench/unlearn")
    p.add_argument("--name", default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--oracle", help="the target recipe on the retain rows only "
                   "(bench/target.py --oracle): scored too, every final score set against it")
    p.add_argument("settings", nargs="*", metavar="method.key=value",
                   help="per-method overrides, e.g. sugd.lr=5e-4")
    args = p.parse_args()
    target_dir, out = Path(args.target), Path(args.out)
    variants = [v.split(":", 1) if ":" in v else (v, v) for v in args.methods.split(",")]
    given = ["--mia", args.mia or "none", "--mmlu", args.mmlu or "none"]
    if args.mia:  # every model is scored on the documents no run calibrated on
        scored = scored_rest(args.mia, SPLIT, args.seed, load_lume(args.data), target_dir)
        args.mia = str(scored.save(out / "mia-scored"))
    train_seconds = json.loads((target_dir / "target.json").read_text())["train_seconds"]
    target = _evaluate(target_dir, args, out / "target-eval")
    rows = [_row("target", target, target, None, train_seconds, None)]
    if args.oracle:
        rows.append(_row("oracle", _evaluate(Path(args.oracle), args, out / "oracle-eval"),
                         target, None, train_seconds, None))
    for label, method in variants:
        settings = [s.split(".", 1)[1] for s in args.settings if s.startswith(label + ".")]
        model_dir = out / label
        if not (model_dir / "run.json").is_file():  # a finished run is reused
            subprocess.run([sys.executable, "-m", "unlearn.cli", "run", "--method", method,
                            "--model", str(target_dir), "--data", args.data,
                            "--out", str(model_dir), "--seed", str(args.seed), *given,
                            *settings],
                           check=True)
        record = json.loads((model_dir / "run.json").read_text())
        results = _evaluate(model_dir, args, out / f"{label}-eval")
        rows.append(_row(label, results, target, record["train_seconds"], train_seconds,
                         record["peak_memory_mb"]))
    if args.oracle:
        for row in rows:
            row["vs_oracle"] = row["final_score"] / rows[1]["final_score"]
    columns = [("model", "{:10}"), ("forget_knowledge", "{:6.3f}"), ("retain_knowledge", "{:6.3f}"),
               ("retain_knowledge_vs_target", "{:6.3f}"), ("forget_regurgitation", "{:6.3f}"),
               ("retain_regurgitation", "{:6.3f}"), ("task_aggregate", "{:6.3f}"),
               ("mia_score", "{:6.3f}"), ("mmlu", "{:6.3f}"), ("final_score", "{:6.3f}"),
               ("unlearn_seconds", "{:7.1f}"), ("fraction_of_target_training", "{:6.3f}")]
    columns += [("vs_oracle", "{:6.3f}")] if args.oracle else []
    print("  ".join(name for name, _ in columns))
    for row in rows:
        print("  ".join("-" if row[name] is None else fmt.format(row[name])
                        for name, fmt in columns))
    results_dir = Path(__file__).parent / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / f"unlearn-{args.name}.json").write_text(json.dumps(
        {"target": str(target_dir), "data": args.data, "target_train_seconds": train_seconds,
         "settings": args.settings, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
