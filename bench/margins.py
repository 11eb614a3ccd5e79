"""The outcome tests' margins, measured rather than guessed.

Every test that checks a training outcome against a bound does it through the ``margin`` fixture
(``tests/conftest.py``), which marks it ``outcome``. This runs those tests on several seeds of the
shared synthetic data and tiny target and in both precisions ``auto`` can resolve to (fp32, and
bf16 autocast as on a CPU with AVX512-BF16), records every value, and writes its spread beside the
bound: ``tests/MARGINS.md`` and ``bench/results/margins.json``.

    python bench/margins.py [--seeds 3] [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "margins.json"
TABLE = ROOT / "tests" / "MARGINS.md"


def run_outcome_tests(seed: int, precision: str, log: Path) -> dict:
    """``pytest -m outcome`` with the suite's seed and precision set; values go to ``log``."""
    env = {**os.environ, "UNLEARN_TEST_SEED": str(seed), "UNLEARN_TEST_PRECISION": precision,
           "UNLEARN_MARGINS_LOG": str(log)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "outcome", "-p",
                           "no:cacheprovider", "--timeout=3600", "-rf"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    failed = [line.split()[1] for line in done.stdout.splitlines()
              if line.startswith("FAILED ")]
    return {"seed": seed, "precision": precision, "exit": done.returncode, "failed": failed,
            "seconds": round(time.perf_counter() - started, 1)}


def spread(values: list[dict]) -> list[dict]:
    """Per test and quantity: its bound and, per precision, the lowest and highest value; the
    margin is the smallest distance from a value to the bound (negative: it failed)."""
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for v in values:
        grouped[(v["test"].split("::", 1)[-1], v["name"], v["side"], v["bound"])].append(v)
    rows = []
    for (test, name, side, bound), found in sorted(grouped.items()):
        distance = [(v["value"] - bound) if side == ">" else (bound - v["value"]) for v in found]
        per_precision = {p: [min(x), max(x)] for p in sorted({v["precision"] for v in found})
                         if (x := [v["value"] for v in found if v["precision"] == p])}
        rows.append({"test": test, "quantity": name, "bound": f"{side} {bound:g}",
                     "range": per_precision, "margin": min(distance), "runs": len(found)})
    return rows


def markdown(rows: list[dict], runs: list[dict], commit: str) -> str:
    precisions = sorted({p for r in rows for p in r["range"]})
    lines = ["# Measured margins of the outcome tests", "",
             f"Written by `python bench/margins.py` at {commit}: every test marked `outcome` "
             f"(it checks a training result through the `margin` fixture), run with the shared "
             f"data and tiny target of seeds {sorted({r['seed'] for r in runs})} in "
             f"{', '.join(precisions)} (bf16: autocast, as `precision=auto` gives on a CPU with "
             f"AVX512-BF16). Margin: the smallest distance from a measured value to its bound; "
             f"a bound is set outside the spread, never inside it.", "",
             "| test | quantity | bound | " + " | ".join(precisions) + " | margin |",
             "|---|---|---|" + "---|" * len(precisions) + "---|"]
    for r in rows:
        cells = [f"{r['range'][p][0]:.3g} – {r['range'][p][1]:.3g}" if p in r["range"] else "-"
                 for p in precisions]
        lines.append(f"| `{r['test']}` | {r['quantity']} | {r['bound']} | "
                     + " | ".join(cells) + f" | {r['margin']:.3g} |")
    lines += ["", "| seed | precision | seconds | failed |", "|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['precision']} | {r['seconds']:.0f} | "
              f"{', '.join(f'`{t}`' for t in r['failed']) or 'none'} |" for r in runs]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    runs, values = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            for seed in range(args.seeds):
                log = Path(tmp) / f"{precision}-{seed}.jsonl"
                runs.append(run_outcome_tests(seed, precision, log))
                print(json.dumps(runs[-1]), flush=True)
                if log.exists():
                    values += [json.loads(line) for line in log.read_text().splitlines()]
    rows = spread(values)
    RESULTS.write_text(json.dumps({"commit": commit, "runs": runs, "margins": rows,
                                   "values": values}, indent=1) + "\n")
    TABLE.write_text(markdown(rows, runs, commit))
    print(TABLE.read_text())


if __name__ == "__main__":
    main()
