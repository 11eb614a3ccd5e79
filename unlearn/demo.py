"""The main job on the embedded default: synthesise the benchmark, build a target, show what it
memorised. Later stages (unlearning, evaluation, report) plug in here as they land."""

from __future__ import annotations

import json
from pathlib import Path

from .data import synthesize
from .models import build_target


def _table(memorisation: dict) -> str:
    lines = [f"{'split':8} {'task':6} {'regurgitation':>14} {'knowledge':>10}"]
    for split in ("forget", "retain"):
        for task, scores in memorisation[split].items():
            lines.append(f"{split:8} {task:6} {scores['regurgitation']:14.3f} "
                         f"{scores['knowledge']:10.3f}")
    return "\n".join(lines)


def demo(out: str | Path = "runs/demo", preset: str = "tiny", seed: int = 0) -> dict:
    """Synthesise data into ``out/data`` and build a target in ``out/target``; reuses both when
    they exist. Returns the target's record."""
    out = Path(out)
    data = out / "data"
    if not (data / "synth.json").exists():
        synthesize(data, seed=seed)
    target = out / f"target-{preset}"
    if (target / "target.json").exists():
        record = json.loads((target / "target.json").read_text())
    else:
        record = build_target(data, target, preset=preset, seed=seed)
    mem = record["memorisation"]
    print(_table(mem))
    if "mmlu_accuracy" in mem:
        print(f"general knowledge (MMLU format): {mem['mmlu_accuracy']:.3f}")
    if "mia" in mem:
        print(f"MIA mean NLL: members {mem['mia']['member_nll']:.2f}, "
              f"non-members {mem['mia']['nonmember_nll']:.2f}")
    print(f"target: {target}")
    return record
