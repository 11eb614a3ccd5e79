"""How well the selection estimate ranks models, and what it costs (issue 23).

    python bench/selection.py --target M --data D --mia D [--mmlu D] --method sugd \
        --variants 8:32,16:64,0:256

Runs the method once with ``select_audit=true`` and no early stop: every check records the
estimate (at the default ``select_rows``/``select_sc_tokens``) and the full official evaluation
of the same model (every row, whole generations, the MIA on the documents calibration leaves
out, every MMLU question). Each further variant ``ROWS:TOKENS`` reruns the same (deterministic)
trajectory estimating with those settings. Prints, per variant, the Spearman correlation of
estimate and full final score along the trail (floor 0.9), the seconds per check and the share
of the run spent choosing (floor 20%); writes bench/results/selection-<name>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

import unlearn
from unlearn.methods.base import UnlearnConfig

DEFAULT = f"{UnlearnConfig.select_rows}:{UnlearnConfig.select_sc_tokens}"


def _run(args, out: Path, rows: int, tokens: int, audit: bool) -> dict:
    if (out / "run.json").is_file():  # a finished run is reused
        return json.loads((out / "run.json").read_text())
    return unlearn.run(args.method, args.target, args.data, out, seed=args.seed, mia=args.mia,
                       mmlu=args.mmlu, select_patience=0, select_audit=audit, select_rows=rows,
                       select_sc_tokens=tokens, **dict(s.split("=", 1) for s in args.settings))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--mia", required=True)
    p.add_argument("--mmlu")
    p.add_argument("--method", default="sugd")
    p.add_argument("--variants", default="", help="further ROWS:TOKENS estimates to compare")
    p.add_argument("--out", default="runs/bench/selection")
    p.add_argument("--name", default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("settings", nargs="*", metavar="key=value", help="method settings")
    args = p.parse_args()
    out = Path(args.out)
    audited = _run(args, out / f"{args.method}-audit", *map(int, DEFAULT.split(":")), True)
    trail = audited["selection"]["trail"]
    frame = pd.DataFrame({"step": [t["step"] for t in trail],
                          "full": [t["audit"]["final_score"] for t in trail],
                          DEFAULT: [t["estimate"] for t in trail]})
    seconds = {DEFAULT: audited["selection"]["seconds"]}
    train = audited["train_seconds"] - seconds[DEFAULT]  # without the audits or the estimates
    for variant in [v for v in args.variants.split(",") if v and v != DEFAULT]:
        rows, tokens = map(int, variant.split(":"))
        record = _run(args, out / f"{args.method}-{rows}-{tokens}", rows, tokens, False)
        frame[variant] = [t["estimate"] for t in record["selection"]["trail"]]
        seconds[variant] = record["selection"]["seconds"]
    summary = {"method": args.method, "target": args.target, "data": args.data,
               "settings": args.settings, "checks": len(frame), "train_seconds": train,
               "full_evaluation_seconds": sum(t["audit"]["seconds"] for t in trail),
               "best_full": {"step": int(frame.loc[frame["full"].idxmax(), "step"]),
                             "final_score": float(frame["full"].max())},
               "variants": {}}
    print(f"{args.method}: {len(frame)} checks, training {train:.0f} s; best full final score "
          f"{frame['full'].max():.3f} at step {summary['best_full']['step']}")
    for variant in seconds:
        picked = frame.loc[frame[variant].idxmax()]
        summary["variants"][variant] = {
            "spearman": float(frame[variant].corr(frame["full"], method="spearman")),
            "seconds_per_check": seconds[variant] / len(frame),
            "share_of_run": seconds[variant] / (train + seconds[variant]),
            "picked_step": int(picked["step"]), "picked_full_final_score": float(picked["full"])}
        v = summary["variants"][variant]
        print(f"  rows:tokens {variant:>7}  spearman {v['spearman']:.3f}  "
              f"{v['seconds_per_check']:.1f} s/check  {v['share_of_run']:.1%} of the run  "
              f"picks step {v['picked_step']} "
              f"(full final score {v['picked_full_final_score']:.3f})")
    print(frame.to_string(index=False, float_format="{:.3f}".format))
    summary["trail"] = frame.to_dict(orient="records")
    results = Path(__file__).parent / "results"
    (results / f"selection-{args.name}.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
