"""The seed systems' authors' code and this project's ``profile=paper`` side by side (issue 44).

    python bench/fidelity.py sugd --authors /work/.mirror/iraklis07+llm-unlearning/repo \
        --python /tmp/fidelity-venv/bin/python
    python bench/fidelity.py sha256 --python /tmp/fidelity-venv/bin/python \
        --authors /work/.mirror/LAB-FLAIR+Constrained-Unlearning-for-LLM/repo

Both train the same tiny target (the ``tiny`` preset on a small synthetic benchmark), on the
same rows in the same order, in fp32 on the CPU, with the same settings: the authors' training
code from their repository at a pinned commit (``--authors``: a git directory; it is archived
into ``--work``, run by ``bench/fidelity_authors.py`` under ``--python``, a virtual environment
outside this repository with their pinned versions, see bench/README.md), and ``unlearn.run``.
SHA256's randomness (its sampler's order) and its chat-template tokenization are handed from
their run to ours. Prints the loss of each of the first ``--steps`` optimizer steps (SHA256:
micro-batches) from both, their largest
relative difference (floor: 1e-4), and how far the final weights of each trained tensor lie
apart against how far training moved them; writes ``bench/results/fidelity-<system>.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import tarfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

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
# their 12 × 10 batches and 8 epochs; the MLPs of the first 2 of 4 layers (their 0-5 of 16), at
# a rate that moves a tiny fp32 target within the ~16 steps
SHA256_SETTINGS = {"epochs": 8, "lr": 1e-4}
SYSTEMS = {
    "sugd": {
        "repository": "iraklis07/llm-unlearning",
        "commit": "34b9a67574d9b0b2e86639df222cd35608972fd1",
        # their notebook names the trained layers by a count k, the project by last:k
        "theirs": {**SUGD_SETTINGS, "k": 2, "seed": 0},
        "ours": {**SUGD_SETTINGS, "layers": "last:2"},
        "unit": "step",  # a loss per optimizer step (one row each)
    },
    "sha256": {
        "repository": "LAB-FLAIR/Constrained-Unlearning-for-LLM",
        "commit": "61e0ab0b9989b6678fc46e2fa1847372d3f1f036",
        "theirs": {**SHA256_SETTINGS, "trainable_layers": [0, 1], "seed": 0},
        "ours": {**SHA256_SETTINGS, "layers": "0-1"},
        "unit": "micro-batch",  # a loss per micro-batch (their compute_loss's)
    },
}


def shared_target(work: Path, seed: int) -> tuple[Path, Path]:
    """The tiny benchmark and target both sides unlearn (built once, then reused)."""
    data, target = work / "data", work / "target"
    if not (data / "synth.json").exists():
        synthesize(data, seed=seed + 1, docs_per_task=8, corpus_per_task=16, facts=8)
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


def run_ours(system: str, target: Path, data: Path, work: Path,
             theirs: Path) -> tuple[list[float], Path]:
    """``unlearn.run`` at ``profile=paper``: per-step losses from ``run.json`` (SHA256: the
    loss of every micro-batch, on their rows in their order, :func:`as_their_run`), the
    model."""
    out = work / f"ours-{system}"
    if (out / "losses.json").exists():  # a finished run: read, not redone
        return json.loads((out / "losses.json").read_text()), out
    recorded: list[float] = []
    with as_their_run(system, data, theirs, recorded):
        record = unlearn.run(system, target, data, out, profile="paper", mia=None, mmlu=None,
                             seed=0, precision="fp32", **SYSTEMS[system]["ours"])
    losses = recorded or [loss for epoch in record["history"] for loss in epoch["step_losses"]]
    (out / "losses.json").write_text(json.dumps(losses))
    return losses, out


@contextmanager
def as_their_run(system: str, data: Path, theirs: Path, recorded: list[float]):
    """SHA256's run handed what their code chose at random or tokenized its own way, so that
    only the training differs: each row's token ids as their ``DataGenerator`` makes them (the
    chat template, the output tokenized alone) and the rows of every micro-batch in the
    order their sampler drew them (``order.json``); each micro-batch's loss is recorded. SUGD
    (no randomness, plain rows) runs as it is."""
    if system != "sha256":
        yield
        return
    from fidelity_authors import CHAT_TEMPLATE

    from unlearn import engine
    from unlearn.methods.sha256 import SHA256

    def their_tokens(tokenizer, prompt, answer, max_len, eos):
        tokenizer.chat_template = CHAT_TEMPLATE
        ids = list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 tokenize=True, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"])
        return ids + tokenizer(answer).input_ids, len(ids)

    micro = json.loads((theirs / "order.json").read_text())
    lume = load_lume(data)

    def their_order(self, forget, retain, rng):
        by_id = {**{("forget", lume.forget[e.index].id): e for e in forget},
                 **{("retain", lume.retain[e.index].id): e for e in retain}}
        per_epoch = -(-(len(forget) + len(retain)) // self.config.batch_size)
        epochs = [micro[i:i + per_epoch] for i in range(0, len(micro), per_epoch)]
        return [[[[by_id[tuple(key)] for batch in epoch[i:i + self.config.grad_accum]
                   for key in batch] for i in range(0, len(epoch), self.config.grad_accum)]
                 for epoch in epochs]]

    original_loss = SHA256.loss

    def loss(self, model, batch, ref):
        value = original_loss(self, model, batch, ref)
        recorded.append(float(value.detach()))
        return value

    with mock.patch.object(engine, "training_sequence", their_tokens), \
            mock.patch.object(SHA256, "stages", their_order), \
            mock.patch.object(SHA256, "loss", loss):
        yield


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
    layout = their_layout(data, args.work) if args.system == "sugd" else data
    theirs, their_model = run_theirs(args.system, args.python, code, target, layout, args.work)
    ours, our_model = run_ours(args.system, target, data, args.work, their_model.parent)
    result = compare(theirs, ours, args.steps)
    for row in result["losses"][:args.steps]:
        print(f"{spec['unit']} {row['step']:3d}  theirs {row['theirs']:+.6f}  "
              f"ours {row['ours']:+.6f}  rel {row['relative']:.1e}")
    gaps = weight_gaps(target, their_model, our_model)
    worst = max(gaps.items(), key=lambda kv: kv[1]["gap"] / kv[1]["moved"])
    print(f"{result['steps_compared']} {spec['unit']} losses: largest relative loss difference "
          f"{result['max_relative_difference']:.2e} (floor 1e-4), over all "
          f"{result['max_relative_difference_all_steps']:.2e}; steps {len(theirs)} theirs, "
          f"{len(ours)} ours; {len(gaps)} tensors trained, worst final gap "
          f"{worst[1]['gap']:.2e} against a change of {worst[1]['moved']:.2e} ({worst[0]})")
    record = {"system": args.system, "repository": spec["repository"], "commit": spec["commit"],
              "unit": spec["unit"],
              "settings": {"theirs": spec["theirs"], "ours": spec["ours"]}, **result,
              "weights": gaps}
    (HERE / "results" / f"fidelity-{args.system}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
