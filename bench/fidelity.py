"""The seed systems' authors' code and this project's ``profile=paper`` side by side (issue 44).

    python bench/fidelity.py sugd --authors /work/.mirror/iraklis07+llm-unlearning/repo \
        --python /tmp/fidelity-venv/bin/python

Both train the same tiny target (the ``tiny`` preset on a small synthetic benchmark), on the
same rows in the same order, in fp32 on the CPU, with the same settings: the authors' training
code from their repository at a pinned commit (``--authors``: a git directory; it is archived
into ``--work``, run by ``bench/fidelity_authors.py`` under ``--python``, a virtual environment
outside this repository with their pinned versions, see bench/README.md), and ``unlearn.run``.
Prints the loss of each of the first ``--steps`` optimizer steps from both, their largest
relative difference (floor: 1e-4), and how far the final weights of each trained tensor lie
apart against how far training moved them; writes ``bench/results/fidelity-<system>.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pandas as pd
from safetensors.torch import load_file

import unlearn
from unlearn.data import load_lume, synthesize
from unlearn.target import build_target

HERE = Path(__file__).parent

# Each system: its authors' repository and commit, and the settings both sides run with,
# their paper values scaled to a 4-layer target and 12 forget rows so that a chunked run has
# well over 50 steps and the weights move in them.
SUGD_SETTINGS = {"chunk_size": 4, "positive_ratio": 2, "positive_factor": 0.5, "epochs": 2,
                 "lr": 2e-4}
SYSTEMS = {
    "sugd": {
        "repository": "iraklis07/llm-unlearning",
        "commit": "34b9a67574d9b0b2e86639df222cd35608972fd1",
        # their notebook names the trained layers by a count k, the project by last:k
        "theirs": {**SUGD_SETTINGS, "k": 2, "seed": 0},
        "ours": {**SUGD_SETTINGS, "layers": "last:2"},
    },
}


def shared_target(work: Path, seed: int) -> tuple[Path, Path]:
    """The tiny benchmark and target both sides unlearn (built once, then reused)."""
    data, target = work / "data", work / "target"
    if not (data / "synth.json").exists():
        synthesize(data, seed=seed + 1, docs_per_task=8, pretrain_factor=2, facts=8)
    if not (target / "target.json").exists():
        build_target(data, target, preset="tiny", seed=seed)
    return data, target


def authors_checkout(git_dir: Path, commit: str, work: Path) -> Path:
    """Their repository's files at ``commit``, from ``git archive`` (no work tree needed)."""
    dest = work / f"authors-{commit[:7]}"
    if not dest.exists():
        archive = subprocess.run(["git", "--git-dir", str(git_dir), "archive", commit],
                                 check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as t:
            t.extractall(dest, filter="data")
    return dest


def their_layout(data: Path, work: Path) -> Path:
    """The forget and retain rows in the parquet files their loaders read, in file order."""
    lume = load_lume(data)
    dest = work / "their-data"
    dest.mkdir(exist_ok=True)
    for split, rows in (("forget", lume.forget), ("retain", lume.retain)):
        frame = pd.DataFrame([{"id": r.id, "input": r.input, "output": r.output,
                               "task": r.task, "split": r.split} for r in rows])
        frame.to_parquet(dest / f"{split}_train-00000-of-00001.parquet", index=False)
    return dest


def run_theirs(system: str, python: str, code: Path, target: Path, data: Path,
               work: Path) -> tuple[list[float], Path]:
    """Their code's per-step losses and final model (a finished run in ``work`` is reused)."""
    out = work / f"theirs-{system}"
    if not (out / "losses.json").exists():
        subprocess.run([python, str(HERE / "fidelity_authors.py"), system, "--code", str(code),
                        "--model", str(target), "--data", str(data), "--out", str(out),
                        "--settings", json.dumps(SYSTEMS[system]["theirs"])], check=True)
    return json.loads((out / "losses.json").read_text()), out / "model"


def run_ours(system: str, target: Path, data: Path, work: Path) -> tuple[list[float], Path]:
    """``unlearn.run`` at ``profile=paper``: per-step losses from ``run.json``, the model."""
    out = work / f"ours-{system}"
    if (out / "run.json").exists():  # a finished run: read, not redone
        record = json.loads((out / "run.json").read_text())
    else:
        record = unlearn.run(system, target, data, out, profile="paper", mia=None, mmlu=None,
                             seed=0, precision="fp32", **SYSTEMS[system]["ours"])
    losses = [loss for epoch in record["history"] for loss in epoch["step_losses"]]
    return losses, out


def weight_gaps(source: Path, theirs: Path, ours: Path) -> dict[str, dict[str, float]]:
    """Per tensor that either side changed: the largest difference between the two results
    and the largest change training made (theirs), so a gap reads against the step it is in."""
    start = load_file(source / "model.safetensors")
    a, b = load_file(theirs / "model.safetensors"), load_file(ours / "model.safetensors")
    gaps = {}
    for name, w in start.items():
        moved = max((a[name] - w).abs().max().item(), (b[name] - w).abs().max().item())
        if moved > 0:
            gaps[name] = {"gap": (a[name] - b[name]).abs().max().item(), "moved": moved}
    return gaps


def compare(theirs: list[float], ours: list[float], steps: int) -> dict:
    """The relative loss difference at every step both ran; the floor reads the first
    ``steps`` of them."""
    relative = [abs(t - o) / max(abs(t), 1e-12) for t, o in zip(theirs, ours)]
    n = min(steps, len(relative))
    return {"steps_compared": n, "steps_theirs": len(theirs), "steps_ours": len(ours),
            "max_relative_difference": max(relative[:n]) if n else None,
            "max_relative_difference_all_steps": max(relative) if relative else None,
            "first_step_over_1e-4": next((i for i, r in enumerate(relative) if r > 1e-4), None),
            "losses": [{"step": i, "theirs": t, "ours": o, "relative": r}
                       for i, (t, o, r) in enumerate(zip(theirs, ours, relative))]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("system", choices=sorted(SYSTEMS))
    p.add_argument("--authors", type=Path, required=True,
                   help="a git directory of the authors' repository holding the pinned commit")
    p.add_argument("--python", required=True,
                   help="the interpreter of a virtual environment with the authors' versions")
    p.add_argument("--work", type=Path, default=Path("runs/bench/fidelity"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    spec = SYSTEMS[args.system]
    args.work.mkdir(parents=True, exist_ok=True)
    data, target = shared_target(args.work, args.seed)
    code = authors_checkout(args.authors, spec["commit"], args.work)
    theirs, their_model = run_theirs(args.system, args.python, code, target,
                                     their_layout(data, args.work), args.work)
    ours, our_model = run_ours(args.system, target, data, args.work)
    result = compare(theirs, ours, args.steps)
    for row in result["losses"][:args.steps]:
        print(f"step {row['step']:3d}  theirs {row['theirs']:+.6f}  ours {row['ours']:+.6f}  "
              f"rel {row['relative']:.1e}")
    gaps = weight_gaps(target, their_model, our_model)
    worst = max(gaps.items(), key=lambda kv: kv[1]["gap"] / kv[1]["moved"])
    print(f"{result['steps_compared']} steps: largest relative loss difference "
          f"{result['max_relative_difference']:.2e} (floor 1e-4), over all "
          f"{result['max_relative_difference_all_steps']:.2e}; steps {len(theirs)} theirs, "
          f"{len(ours)} ours; {len(gaps)} tensors trained, worst final gap "
          f"{worst[1]['gap']:.2e} against a change of {worst[1]['moved']:.2e} ({worst[0]})")
    record = {"system": args.system, "repository": spec["repository"], "commit": spec["commit"],
              "settings": {"theirs": spec["theirs"], "ours": spec["ours"]}, **result,
              "weights": gaps}
    (HERE / "results" / f"fidelity-{args.system}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
