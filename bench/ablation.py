"""The defaults against the paper, one departure at a time (issue 44, part 4).

    python bench/ablation.py --target T --oracle O --data D --name N --method sha256 \
        [--seeds 1] [--mia D] [--mmlu D] [--rows paper,default]

METHOD runs on the target at the paper's settings (``profile=paper``: the authors' code as
`unlearn` follows it; here every departure put back, the same config), at
its defaults (``profile=auto``: on a target `unlearn` built, the small-target adjustments, and
the teacher's where the target's base was kept), and at its defaults with each setting they
change put back to the paper's value, one at a time (row ``paper_NAME``): a row's loss against
the defaults is what that departure is worth on this target. ``--rows`` runs some rows only,
where a run costs many minutes (a LUME train part on 2 cores). The departures are read from
the method's own profiles (:func:`unlearn.engine.resolve_config`), so the table cannot miss
one.

Everything goes through ``unlearn.bench`` (one OUT for the study: the target and the oracle
are scored once; no receipts): each row's official share of the oracle, general-text utility
u, S, forget and retain knowledge and time as a share of the target's training. Prints the
table and writes ``bench/results/ablation-N.json`` with the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import unlearn
from unlearn.accel import resolve_precision
from unlearn.engine import resolve_config
from unlearn.methods import get_method

RESULTS = Path(__file__).parent / "results"
COLUMNS = {"share": "vs oracle", "u": "utility u", "S": "S", "MIA AUC": "MIA AUC",
           "kept step": "kept step", "fraction of target training": "fraction of target training"}


def variants(method: str, target: Path) -> dict[str, dict]:
    """Label -> settings: the paper, the defaults, and the defaults less each departure."""
    paper = get_method(method).Config()
    default, profile = resolve_config(get_method(method), target)
    departures = {f.name: getattr(paper, f.name) for f in dataclasses.fields(paper)
                  if getattr(default, f.name) != getattr(paper, f.name)}
    print(f"{method}: profile {profile}, {len(departures)} departures from the paper")
    # every departure put back is the paper profile (bench's settings are the config's own)
    return {"paper": departures, "default": {},
            **{f"paper_{name}": {name: value} for name, value in departures.items()}}


def knowledge(row: dict, split: str) -> float | None:
    """The mean knowledge over the tasks that have questions, on one split."""
    values = [v for k, v in row.items() if k.startswith(f"{split} ") and
              k.endswith(" knowledge") and v is not None]
    return sum(values) / len(values) if values else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--target", "--oracle", "--data", "--name", "--method"):
        p.add_argument(flag, required=True)
    p.add_argument("--out", help="default: runs/bench/ablation-NAME")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--mia", default="auto")
    p.add_argument("--mmlu", default="auto")
    p.add_argument("--rows", help="comma-separated row labels (default: every row)")
    args = p.parse_args()
    settings = variants(args.method, Path(args.target))
    if args.rows:
        chosen = args.rows.split(",")
        unknown = sorted(set(chosen) - set(settings))
        if unknown:
            p.error(f"--rows {', '.join(unknown)}: not a row of {args.method}'s table "
                    f"({', '.join(settings)})")
        settings = {label: settings[label] for label in chosen}
    board = unlearn.bench(args.data, args.out or f"runs/bench/ablation-{args.name}",
                          methods=[f"{label}:{args.method}" for label in settings],
                          settings=settings, target=args.target, oracle=args.oracle,
                          mia=args.mia, mmlu=args.mmlu, eval_points=0, receipts=False,
                          seeds=args.seeds)
    rows = []
    for row in board["rows"]:
        entry = {"model": row["model"], "settings": settings.get(row["model"]),
                 **{name: row.get(column) for name, column in COLUMNS.items()},
                 "forget knowledge": knowledge(row, "forget"),
                 "retain knowledge": knowledge(row, "retain")}
        entry.update({f"{k} std": v for k, v in row.items() if k.endswith(" std")
                      and k[:-4] in ("S", "vs oracle", "utility u")})
        rows.append(entry)
    print("  ".join(f"{c:>12}" for c in rows[0] if c != "settings"))
    for r in rows:
        print("  ".join(f"{v:12.3f}" if isinstance(v, float) else f"{str(v):>12}"
                        for k, v in r.items() if k != "settings"))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"ablation-{args.name}.json").write_text(json.dumps(
        {"command": " ".join(["python", *sys.argv]), "method": args.method,
         "machine": f"{resolve_precision()} training", "seeds": args.seeds,
         "target": args.target, "rows": rows},
        indent=2))


if __name__ == "__main__":
    main()
