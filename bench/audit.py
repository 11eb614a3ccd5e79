"""Receipts side by side (issue 26): `unlearn audit` of several unlearned models of one target,
each judged against the same never-seen documents and attacked the same way.

    python bench/audit.py --original runs/demo/cache/target-small-KEY-seed0 \
        --oracle runs/demo/cache/oracle-small-KEY-seed0 --data runs/demo/data \
        --mia runs/demo/seed0/mia-scored --name synth \
        sugd=runs/demo/seed0/sugd sha256=runs/demo/seed0/sha256 gd=runs/demo/seed0/gd

The oracle is audited too (as a model of its own: the floor every method is read against). The
receipt measured as a classifier: the target's `remembered` share is its true-positive rate
(every forget document is in it), the oracle's its false-positive rate (it saw none), each with
a Clopper-Pearson 95% interval (scipy's `binomtest`); each receipt's judge and stated rate too.
The oracle cannot judge itself, so its receipt is judged by the base: the rule of an audit
without an oracle. ``--second-oracle`` (an oracle trained with another seed: `unlearn target
--oracle --seed 1`) is audited with the oracle as judge, the rule every method above meets: its
`remembered` share is the false-positive rate of that rule.
``--never-seen`` (default: DATA/never_seen, which the synthetic benchmark writes) gives the
never-seen documents of each task a forget document is read against: for a target memorised
from the LUME train part by a base that never saw validation (`bench/target.py
train-part-clean`), LUME validation; for `bench/target.py lume-clean`, the train part.
The first audit attacks the original and the oracle as well (its seconds are what one `unlearn
audit` takes); the others reuse those two attacks. Prints one row per model and writes
bench/results/audit-<name>.json with the command, every receipt's summary and each audit's
seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scipy.stats import binomtest

import unlearn


def _remembered_against_general(receipt: dict) -> int:
    """The documents the receipt would call remembered were each read against the MIA
    non-members instead of its own task's never-seen documents: the former rule, same run."""
    low = receipt["never_seen"]["general"]["score_low"]
    return sum(d["score"] < low or d["questions_answered"] > 0 or bool(d["pii_leaked"])
               for d in receipt["documents"])


def _row(label: str, receipt: dict) -> dict:
    s, relearn = receipt["summary"], receipt["relearn"]
    interval = binomtest(s["remembered"], s["documents"]).proportion_ci(0.95)
    return {"model": label, "documents": s["documents"], "forgotten": s["forgotten"],
            "partly": s["partly"], "remembered": s["remembered"],
            "remembered_share": s["remembered_share"],
            "remembered_95ci": [interval.low, interval.high], "judge": s["judge"],
            "stated_false_positive_rate": s["false_positive_rate"],
            "stated_false_positive_bound": s["false_positive_bound"],
            "never_seen_answered": {name: [b["answered_documents"], b["asked_documents"]]
                                    for name, b in receipt["never_seen"].items()
                                    if b["asked_documents"]},
            "remembered_against_general": _remembered_against_general(receipt),
            "read_against": {name: n["forget_documents"]
                             for name, n in receipt["test"]["nulls"].items()
                             if n["forget_documents"]},
            "over_unlearned": s["over_unlearned"],
            "knowledge_before_attack": relearn["unlearned"]["before"]["knowledge"],
            "knowledge_after_attack": relearn["unlearned"]["after"]["knowledge"],
            "regurgitation_after_attack": relearn["unlearned"]["after"]["regurgitation"],
            "oracle_knowledge_after_attack": relearn.get("oracle", {}).get("after", {})
            .get("knowledge"),
            "robust": relearn["robust"], "seconds": receipt["seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--original", required=True)
    p.add_argument("--oracle", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--mia", required=True)
    p.add_argument("--split")
    p.add_argument("--never-seen", default="auto", help="LUME-format documents of the forget "
                   "documents' tasks that no model saw (unlearn audit --never-seen)")
    p.add_argument("--out", default="runs/bench/audit")
    p.add_argument("--name", default="synth")
    p.add_argument("--second-oracle", help="an oracle of another seed, judged by --oracle")
    p.add_argument("models", nargs="*", metavar="label=MODEL_DIR")
    args = p.parse_args()
    models = {"target": args.original, **dict(m.split("=", 1) for m in args.models),
              "oracle": args.oracle}
    if args.second_oracle:
        models["second-oracle"] = args.second_oracle
    rows, summaries, attacks = [], {}, {}
    for label, model in models.items():
        receipt = unlearn.audit(model, args.original, args.data, args.mia,
                                Path(args.out) / label, oracle=args.oracle, split=args.split,
                                attacks=attacks, allow_unchanged=True,
                                never_seen=None if args.never_seen == "none" else args.never_seen)
        attacks = {role: receipt["relearn"][role] for role in ("original", "oracle")}
        summaries[label] = {"summary": receipt["summary"], "relearn": receipt["relearn"],
                            "never_seen": receipt["never_seen"], "seconds": receipt["seconds"]}
        rows.append(_row(label, receipt))
    columns = list(rows[0])
    print("  ".join(columns))
    for row in rows:
        print("  ".join("-" if row[c] is None else
                        f"{row[c]:.3f}" if isinstance(row[c], float) else
                        "[" + ", ".join(f"{v:.3f}" for v in row[c]) + "]"
                        if isinstance(row[c], list) else str(row[c]) for c in columns))
    results = Path(__file__).parent / "results" / f"audit-{args.name}.json"
    results.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "rows": rows,
                                   "receipts": summaries}, indent=2))


if __name__ == "__main__":
    main()
