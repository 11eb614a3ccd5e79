"""The main job on the embedded default: synthesise the benchmark, build the pretrained base, the
target and the oracle, unlearn the forget set with the two seed systems (SUGD, SHA256), score
every model the LUME way with the leak audit, audit every forget document and attack every model
by relearning (``unlearn audit``), print the leaderboard and the report's path.

It is ``unlearn bench`` on the synthetic data, with the target recipe sized to finish in about a
quarter of an hour on a 2-core laptop; a second run reuses every finished stage.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .data import synthesize
from .io import BENCH, claim_output, in_place
from .leaderboard import bench
from .settings import check_seed

DEMO_METHODS = ("sugd", "sha256")  # the seed systems; `unlearn bench` adds the baselines
# sized for `make demo` under 15 minutes on 2 cores, install included (timings: README). The
# base reads its corpus about three times, in batches small enough for about 160 steps: at the
# preset's 4096 tokens a batch it took 49 steps, as many as its warm-up, and read its own
# corpus no better than text it never saw (README, "The synthetic benchmark")
DEMO_DOCS_PER_TASK = 8
DEMO_TARGET = {"small": {"pretrain_tokens": 200_000, "pretrain_batch_tokens": 1280}}
DEMO_EVAL_POINTS = 1  # each run's trajectory in the report; the receipts take the time saved
COLUMNS = ["model", "task aggregate", "MIA score", "MMLU", "final score", "vs oracle", "utility u",
           "S", "kept step", "PII leak rate", "forgotten share", "remembered share",
           "relearned knowledge", "relearn robust", "unlearn seconds"]


def demo(out: str | Path = "runs/demo", preset: str = "small", seed: int = 0) -> dict:
    """Run the demo into ``out`` (data in ``out/data``, models in ``out/cache``) and return the
    leaderboard of :func:`unlearn.bench.bench`."""
    out = Path(out)
    check_seed(seed)
    claim_output(out, BENCH)  # the demo is a bench whose data lives in its own OUT
    with in_place(out, BENCH, {"demo": True}):
        data = out / "data"
        if not (data / "synth.json").exists():
            synthesize(data, seed=seed, docs_per_task=DEMO_DOCS_PER_TASK)
        board = bench(data, out, methods=DEMO_METHODS, preset=preset,
                      target_settings=DEMO_TARGET.get(preset), eval_points=DEMO_EVAL_POINTS)
    frame = pd.DataFrame(board["rows"]).reindex(columns=COLUMNS)
    print()
    print(frame.to_string(index=False, float_format="{:.3f}".format, na_rep="-"))
    print(f"\nleaderboard: {out / 'leaderboard.md'}\nreport: {out / 'report.html'}")
    print("\n".join(board["damaged"]))
    return board
