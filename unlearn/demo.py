"""The main job on the embedded default: synthesise the benchmark, build a target, unlearn its
forget set with SUGD and a baseline, and score everything the LUME way with the leak audit."""

from __future__ import annotations

import json
from pathlib import Path

from .data import synthesize
from .engine import run
from .evaluate.lume import evaluate
from .models import build_target

DEMO_METHODS = ("sugd", "gd")


def _cached(path: Path, name: str) -> dict | None:
    file = path / name
    return json.loads(file.read_text()) if file.exists() else None


def _row(name: str, r: dict) -> str:
    f, k = r["forget-set"], r["retain-set"]
    pii = r.get("audit", {}).get("pii", {})
    return (f"{name:8} {f['overall-regurgitation-score']:8.3f} {f['overall-knowledge-score']:8.3f}"
            f" {k['overall-regurgitation-score']:8.3f} {k['overall-knowledge-score']:8.3f}"
            f" {r['harmonic-mean-task-aggregate']:9.3f} {r.get('mia_final_score', float('nan')):7.3f}"
            f" {r.get('mmlu_average', float('nan')):6.3f} {r['final-score']:7.3f}"
            f" {pii.get('leak_rate', float('nan')):7.1%}")


def demo(out: str | Path = "runs/demo", preset: str = "tiny", seed: int = 0) -> dict:
    """Synthesise data into ``out/data``, build a target, unlearn with each demo method,
    evaluate all of them; finished stages are reused on a second run. Returns the results of
    every model by name."""
    out = Path(out)
    data = out / "data"
    if not (data / "synth.json").exists():
        synthesize(data, seed=seed)
    target = out / f"target-{preset}"
    if not (target / "target.json").exists():
        build_target(data, target, preset=preset, seed=seed)
    kw = dict(mia=data / "mia", mmlu=data / "mmlu", audit=True, seed=seed)
    results = {"target": _cached(out / "eval-target", "results.json")
               or evaluate(target, data, out / "eval-target", **kw)}
    for method in DEMO_METHODS:
        model = out / method
        if not (model / "run.json").exists():
            run(method, target, data, model, seed=seed)
        results[method] = _cached(out / f"eval-{method}", "results.json") or evaluate(
            model, data, out / f"eval-{method}", before=out / "eval-target", **kw)
    print(f"\n{'model':8} {'forget':>8} {'forget':>8} {'retain':>8} {'retain':>8} "
          f"{'task agg':>9} {'MIA':>7} {'MMLU':>6} {'final':>7} {'PII':>7}")
    print(f"{'':8} {'regurg':>8} {'know':>8} {'regurg':>8} {'know':>8}")
    for name, r in results.items():
        print(_row(name, r))
    for method in DEMO_METHODS:
        print(f"report: {out / f'eval-{method}' / 'report.html'}")
    return results
