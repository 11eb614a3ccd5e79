"""A development benchmark cut from LUME ``train``, so that settings are chosen without looking
at ``validation`` (issue 23).

    python bench/lume_train_part.py                      # writes runs/bench/lume-train-part
    python bench/target.py train-part --init runs/bench/base-lume-small
    python bench/target.py train-part --oracle --init runs/bench/base-lume-small
    python bench/target.py train-part-clean            # a base that never saw the part, then
    python bench/target.py train-part-clean --oracle   # the target and oracle memorised from it

A seeded quarter of train's documents (an sc row and its qa rows stay together), forget and
retain alike: about the size of validation. Its MIA set: members are the part's Task3 forget
documents, as in LUME; non-members are pages from ``mia/nonmember.jsonl`` (Wikipedia the target
never saw), twice as many. The base the recipe memorises from was pretrained on all of train, so
these documents were read once before memorising, as a real model may have read Wikipedia: the
oracle's forget documents sit a little below never-seen ones. The rest of train (every document
not in the part) is written beside it, ``runs/bench/lume-train-rest``: the corpus of the
``train-part-clean`` recipe, whose base never saw the part, as LUME validation's base never saw
validation (what a teacher needs, ``teacher=auto``).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from unlearn.data import load_lume
from unlearn.data.lume import Document, MiaData

LUME = Path(__file__).resolve().parents[1].parent / "shared" / "lume"


def _write_rows(lume, out: Path, keep) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in (("forget", lume.forget), ("retain", lume.retain)):
        with open(out / f"{split}.jsonl", "w") as f:
            for r in rows:
                if keep(r):
                    f.write(json.dumps({"id": r.id, "input": r.input, "output": r.output,
                                        "task": r.task, "split": split}) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench/lume-train-part")
    p.add_argument("--rest", default="runs/bench/lume-train-rest",
                   help="where the rest of train goes: a pretraining corpus without the part")
    p.add_argument("--share", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out, rng = Path(args.out), random.Random(args.seed)
    train = load_lume(LUME / "train")
    documents = sorted({r.doc_id for r in train.rows})
    kept = set(rng.sample(documents, round(args.share * len(documents))))
    _write_rows(train, out, lambda r: r.doc_id in kept)
    _write_rows(train, Path(args.rest), lambda r: r.doc_id not in kept)
    members = [Document(r.id, r.text) for r in train.forget
               if r.task == "Task3" and r.kind == "sc" and r.doc_id in kept]
    pages = [json.loads(line) for line in open(LUME / "mia" / "nonmember.jsonl")]
    nonmembers = [Document(d["id"], d["document"])
                  for d in rng.sample(pages, min(len(pages), 2 * len(members)))]
    MiaData(members, nonmembers).save(out / "mia")
    part = load_lume(out)
    print(f"{out}: {len(part.forget)} forget rows, {len(part.retain)} retain rows; "
          f"MIA {len(members)} members, {len(nonmembers)} non-members")


if __name__ == "__main__":
    main()
