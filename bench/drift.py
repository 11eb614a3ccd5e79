"""Where a forget run leaves the MIA documents, and never-seen text with them (issue 23).

    python bench/drift.py --target T --oracle O --data D --mia D --name N LABEL METHOD [k=v ...]

Runs METHOD with the settings given on the target (a finished run in OUT/LABEL made with these
very settings on this target is reused), scores the kept model the LUME way on the MIA documents
its calibration left out, and sets the final score against the oracle's. Beside the score it
prints what the loss-MIA reads: the median NLL of the member documents and of the never-seen
non-members, for the source model, the oracle and the run, and so how far never-seen text
drifted while the members were pushed up. A run can lift its members to the loss never-seen text
had before unlearning and still lose the MIA: the non-members moved further. Appends one row per
call to bench/results/drift-<name>.json (the source's and the oracle's figures are measured by
the first call and kept there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import unlearn
from unlearn.data import load_lume
from unlearn.io import write_json
from unlearn.leaderboard import finished_run
from unlearn.measure.official import score_model
from unlearn.methods.base import UnlearnConfig
from unlearn.models.loading import load_model
from unlearn.selection import evaluating, scored_rest
from unlearn.settings import key_values


def measure(model_dir: Path, lume, rest) -> dict:
    """The final score and its terms on the scored MIA documents, and both NLL medians."""
    model, tokenizer = load_model(model_dir, dtype=torch.float32)
    with evaluating(model):
        scores = score_model(model, tokenizer, lume, rest)
    results, nll = scores.results, scores.mia_nll  # the NLLs the loss-MIA read
    return {"final_score": results["final-score"],
            "task_aggregate": results["harmonic-mean-task-aggregate"],
            "mia_auc": results["mia_loss_acc"],
            "member_nll": statistics.median(nll["member"]),
            "nonmember_nll": statistics.median(nll["nonmember"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--target", "--oracle", "--data", "--mia", "--name"):
        p.add_argument(flag, required=True)
    p.add_argument("--out", default="runs/bench/drift")
    p.add_argument("label")
    p.add_argument("method")
    p.add_argument("settings", nargs="*", metavar="key=value")
    args = p.parse_args()
    settings = key_values(args.settings)
    lume = load_lume(args.data)
    share = float(settings.get("select_split", UnlearnConfig.select_split))
    rest = scored_rest(args.mia, share, 0, lume, args.target)
    run_dir = Path(args.out) / args.label
    if not finished_run(run_dir, args.method, Path(args.target), 0, 0, {"mia": args.mia},
                        settings):
        unlearn.run(args.method, args.target, args.data, run_dir, mia=args.mia, **settings)
    record = json.loads((run_dir / "run.json").read_text())
    results = Path(__file__).parent / "results" / f"drift-{args.name}.json"
    board = json.loads(results.read_text()) if results.is_file() else {
        "target": args.target, "oracle": args.oracle, "data": args.data, "mia": args.mia,
        "source": measure(Path(args.target), lume, rest),
        "oracle_scores": measure(Path(args.oracle), lume, rest), "runs": []}
    rows = {"source": board["source"], "oracle": board["oracle_scores"],
            "run": measure(run_dir, lume, rest)}
    for name, row in rows.items():
        print(f"{name:7} final {row['final_score']:.3f}  task {row['task_aggregate']:.3f}  "
              f"AUC {row['mia_auc']:.3f}  NLL members {row['member_nll']:.2f}  "
              f"non-members {row['nonmember_nll']:.2f}")
    run = rows["run"]
    summary = {"label": args.label, "method": args.method, "settings": settings, **run,
               "vs_oracle": run["final_score"] / rows["oracle"]["final_score"],
               "nonmember_drift": run["nonmember_nll"] - rows["source"]["nonmember_nll"],
               "member_rise": run["member_nll"] - rows["source"]["member_nll"],
               "train_seconds": record["train_seconds"],
               "kept_step": (record["selection"] or {}).get("kept_step"),
               "steps": record["steps"]}
    print(f"{args.label}: {summary['vs_oracle']:.3f} of the oracle; members rose "
          f"{summary['member_rise']:+.2f}, never-seen text drifted "
          f"{summary['nonmember_drift']:+.2f}, {record['train_seconds']:.0f} s")
    board["runs"].append({"command": " ".join(["python", *sys.argv]), **summary})
    write_json(results, board)


if __name__ == "__main__":
    main()
