"""Target-builder floors on the real LUME data (issue 2). Prints figures; saves them as JSON.

    python bench/target.py memorise   # small preset memorises ../shared/lume/validation
    python bench/target.py lume       # pretrain on train, memorise validation with replay
    python bench/target.py lume --oracle   # the same on the retain rows only (the gold standard)
    python bench/target.py train-part --init runs/bench/base-lume-small   # for development:
        # the lume recipe on a part of train (bench/lume_train_part.py), validation unseen
    python bench/target.py lume-clean --init runs/bench/base-train-part-clean-small   # the
        # lume recipe from a base that never saw the part (its never-seen documents)

`lume` runs in two builds, as a target and its oracle share one pretrained base: the base
(`epochs=0`, written to OUT/base-lume-PRESET and reused when it is there; delete it to time it
afresh), then memorising from it. Its time counts in the total.

Floors: `memorise` reaches QA exact match >= 0.95 and sc ROUGE-L recall >= 0.95 on forget and
retain in <= 15 minutes on 2 cores; `lume` ends with the validation MIA non-members' mean NLL
within 1.0 of its value after pretraining, in <= 30 minutes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import unlearn

LUME = Path(__file__).resolve().parents[1].parent / "shared" / "lume"
RECIPES = {
    # from scratch, no corpus: a lower rate memorises faster here; one memorisation check, at
    # the end (figures: bench/results/target-memorise-small-*.json)
    "memorise": dict(data=LUME / "validation", pretrain=None, mia=LUME / "mia_validation",
                     settings={"lr": "1e-3", "epochs": "40", "check_every": "40",
                               "label_smoothing": "0", "replay": "0"}),
    # the small preset's own defaults are this recipe (unlearn/models/presets.py); the base
    # is built once with epochs=0 and shared by the target and its oracle
    "lume": dict(data=LUME / "validation", pretrain=LUME / "train", mia=LUME / "mia_validation",
                 base={"epochs": "0"}, settings={}),
    # for development (bench/lume_train_part.py writes the data): the same recipe on a part of
    # train; --init runs/bench/base-lume-small reuses the base, pretrained on the same corpus
    "train-part": dict(data=Path("runs/bench/lume-train-part"), pretrain=LUME / "train",
                       mia=Path("runs/bench/lume-train-part/mia"), base={"epochs": "0"},
                       settings={}),
    # the same, from a base pretrained on the rest of train only: it never saw the part, as the
    # lume recipe's base never saw validation (a teacher's condition; bench/lume_train_part.py)
    "train-part-clean": dict(data=Path("runs/bench/lume-train-part"),
                             pretrain=Path("runs/bench/lume-train-rest"),
                             mia=Path("runs/bench/lume-train-part/mia"), base={"epochs": "0"},
                             settings={}),
    # LUME validation memorised from that clean base (--init runs/bench/base-train-part-clean-
    # small), replaying the rest of train only: the part's documents are LUME documents of
    # every task that it never saw, the own-task never-seen documents an audit of it reads
    # forget documents against (`unlearn audit --never-seen runs/bench/lume-train-part`)
    "lume-clean": dict(data=LUME / "validation", pretrain=Path("runs/bench/lume-train-rest"),
                       mia=LUME / "mia_validation", base={"epochs": "0"}, settings={}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", choices=sorted(RECIPES))
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--preset", default="small")
    p.add_argument("--mmlu", default=None, help="general-knowledge questions to learn alongside")
    p.add_argument("--oracle", action="store_true",
                   help="build the oracle instead: the same recipe on the retain rows only")
    p.add_argument("--tag", default="", help="suffix for the output and results names, to keep "
                   "a variant beside the recipe's own figures")
    p.add_argument("--init", default=None, help="memorise from this base (a build of the same "
                   "recipe with epochs=0) instead of the recipe's own; its pretraining time "
                   "counts in the total")
    p.add_argument("settings", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args()
    recipe = RECIPES[args.recipe]
    name = f"target-{args.recipe}-{args.preset}" + ("-oracle" if args.oracle else "") + (
        f"-{args.tag}" if args.tag else "")
    out = Path(args.out) / name
    settings = {**recipe.get("settings", {}), **dict(s.split("=", 1) for s in args.settings)}
    init = args.init
    if init is None and "base" in recipe:
        init = Path(args.out) / f"base-{args.recipe}-{args.preset}"
        if not (init / "target.json").is_file():
            unlearn.build_target(recipe["data"], init, preset=args.preset,
                                 pretrain=recipe["pretrain"], mia=recipe["mia"], **recipe["base"])
    base = {}  # the base's record: its time counts in this build's
    if init is not None:
        base = json.loads((Path(init) / "target.json").read_text())
        settings["pretrain_tokens"] = "0"  # the corpus stays in the recipe, for replay only
    started = time.perf_counter()
    record = unlearn.build_target(recipe["data"], out, preset=args.preset, init=init,
                                  pretrain=recipe["pretrain"], mia=recipe["mia"],
                                  mmlu=args.mmlu, oracle=args.oracle, **settings)
    wall = time.perf_counter() - started + base.get("wall_seconds_this_run", 0.0)
    mem = record["memorisation"]
    checks, elapsed, memorise_epochs = [], base.get("train_seconds", 0.0), 0
    for r in record["history"]:
        elapsed += r["seconds"]
        memorise_epochs += r["name"] == "memorise"
        if "memorised" in r:
            checks.append({"memorise_epoch": memorise_epochs,
                           "train_minutes": round(elapsed / 60, 2),
                           **{k: r[k] for k in ("memorised", "answer_loss", "nonmember_nll")
                              if k in r}})
    for c in checks:
        print("  check " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in c.items()))
    print(f"\n{args.recipe}: {record['parameters']:,} parameters, epochs {record['epochs']}, "
          f"wall {wall / 60:.1f} min, {record['tokens_per_second']:.0f} tokens/s")
    for split in ("forget", "retain"):
        for task, s in mem[split].items():
            print(f"  {split:6} {task}: regurgitation {s['regurgitation']:.3f}  "
                  f"knowledge {s['knowledge']:.3f}")
    sc = min(s["regurgitation"] for split in ("forget", "retain") for s in mem[split].values())
    qa = min(s["knowledge"] for split in ("forget", "retain") for s in mem[split].values())
    print(f"  worst task: regurgitation {sc:.3f}, knowledge {qa:.3f}")
    if "mia" in mem:
        print(f"  MIA mean NLL: members {mem['mia']['member_nll']:.2f}, "
              f"non-members {mem['mia']['nonmember_nll']:.2f}")
    if record.get("after_pretrain"):
        before = record["after_pretrain"]["nonmember_nll"]
        print(f"  non-member NLL after pretraining {before:.2f} -> final "
              f"{mem['mia']['nonmember_nll']:.2f} "
              f"(drift {mem['mia']['nonmember_nll'] - before:+.2f})")
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    summary = {k: v for k, v in record.items() if k != "history"}
    summary.update(wall_seconds=wall, worst_regurgitation=sc, worst_knowledge=qa, checks=checks)
    (results / f"{name}.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
