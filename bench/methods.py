"""Methods at their defaults on one given target, scored the LUME way: `unlearn bench` with
`--target`/`--oracle`, its leaderboard kept in bench/results/ with the command that made it.

    python bench/methods.py --target runs/bench/target-lume-small \
        --oracle runs/bench/target-lume-small-oracle --data ../shared/lume/validation \
        --mia ../shared/lume/mia_validation --mmlu runs/synth/mmlu --methods sugd,gd,npo

A label may name a variant, `label:method`, with its own settings: `--methods
sugd,sugd_fixed:sugd sugd_fixed.select=none` compares SUGD choosing its model by the estimated
score (the default with an MIA set) with SUGD at its fixed schedule. Runs calibrate on a held-out
share of the MIA set (`select_split`); every model is scored on the rest. Prints the leaderboard
and writes bench/results/unlearn-<name>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import unlearn
from unlearn.leaderboard import settings_by_label


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--oracle", help="the target recipe on the retain rows only "
                   "(bench/target.py --oracle): every final score is set against it")
    p.add_argument("--data", required=True)
    p.add_argument("--mia")
    p.add_argument("--mmlu")
    p.add_argument("--methods", default="sugd,gd,npo")
    p.add_argument("--out", default="runs/bench/unlearn")
    p.add_argument("--name", default="small")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("settings", nargs="*", metavar="label.key=value",
                   help="per-method overrides, e.g. sugd.lr=5e-4")
    args = p.parse_args()
    settings = settings_by_label(args.settings)
    board = unlearn.bench(args.data, args.out, methods=args.methods.split(","), mia=args.mia,
                          mmlu=args.mmlu, pretrain=None, seeds=args.seeds, settings=settings,
                          target=args.target, oracle=args.oracle)
    print((Path(args.out) / "leaderboard.md").read_text())
    results = Path(__file__).parent / "results" / f"unlearn-{args.name}.json"
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), **board},
                                  indent=2))


if __name__ == "__main__":
    main()
