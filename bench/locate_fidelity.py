"""``unlearn locate`` beside SHA256's ``causal_trace.py`` on one model and its facts (issue 44).

    python bench/locate_fidelity.py --python /tmp/fidelity-venv/bin/python \
        --authors /work/.mirror/LAB-FLAIR+Constrained-Unlearning-for-LLM/repo

On the tiny target of ``bench/fidelity.py`` and its Task2 facts, in fp32 on the CPU: their
``calculate_hidden_flow`` (run by ``bench/locate_authors.py`` in the authors' environment,
their repository at a pinned commit) and the project's :class:`~unlearn.tracing.trace.Tracer`
restore every (position, layer) of each kind, the whole layer, the MLP and attention over a
window, with the same noise level and the same noise draws (theirs: NumPy's ``RandomState(1)``,
handed to ours), so that the restored probabilities differ only by the implementations. Then
each side's own noise rule, and the layers ours chooses from its own effects and from theirs.
Prints and writes ``bench/results/fidelity-locate.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from fidelity import HERE, authors_checkout, shared_target

from unlearn.data import load_lume
from unlearn.models.loading import load_model
from unlearn.tracing.trace import (
    KINDS,
    Tracer,
    choose_layers,
    encode,
    facts_from,
    position_groups,
    subject_noise,
)

REPOSITORY = "LAB-FLAIR/Constrained-Unlearning-for-LLM"
COMMIT = "61e0ab0"  # resolved to the full hash from the checkout


def facts_for_both(model, tokenizer, data: Path, limit: int) -> list[tuple[dict, object]]:
    """The Task2 facts the model answers right at top-1 (both sides trace only those), each as
    their ``known_QA_T2.json`` entry beside our encoding."""
    out = []
    for i, fact in enumerate(facts_from(load_lume(data).rows)):
        enc = encode(tokenizer, fact)
        if enc is None:
            continue
        with torch.no_grad():
            top = int(model(input_ids=enc.ids, logits_to_keep=1).logits.argmax())
        if top == enc.target:
            out.append(({"known_id": i, "subject": fact.subject, "prompt": fact.prompt,
                         "attribute": tokenizer.decode([enc.target])}, enc))
        if len(out) == limit:
            break
    return out


def their_draws(shape, generator=None, **kw) -> torch.Tensor:
    """Their noise: a fresh ``numpy.random.RandomState(1)`` normal draw for every trace."""
    return torch.from_numpy(np.random.RandomState(1).randn(*shape))


def ours_with_their_noise(model, encodings, noise: float, samples: int, window: int) -> list:
    tracer = Tracer(model, noise, samples, window)
    with mock.patch.object(torch, "randn", their_draws):
        return [tracer.trace(enc) for enc in encodings]


def side_by_side(theirs: list[dict], ours: list[dict]) -> dict:
    """Largest absolute difference of the restored probabilities per kind, and of the clean
    and corrupted probabilities, over every fact, position and layer."""
    gaps = {kind: max(float((torch.tensor(t[kind]) - o["restored"][kind]).abs().max())
                      for t, o in zip(theirs, ours)) for kind in KINDS}
    gaps["corrupted"] = max(abs(t["low_score"] - o["corrupted"]) for t, o in zip(theirs, ours))
    gaps["clean"] = max(abs(t["high_score"] - o["clean"]) for t, o in zip(theirs, ours))
    return gaps


def mlp_effect(tables: list[torch.Tensor], corrupted: list[float], subjects, position: str):
    """The MLP indirect effect per layer at one position group, averaged over facts."""
    rows = []
    for table, low, subject in zip(tables, corrupted, subjects):
        where = position_groups(table.shape[0], subject)[position]
        rows.append(table[where].mean(0) - low)
    return torch.stack(rows).mean(0).tolist()


def run_theirs(python: str, code: Path, target: Path, facts: Path, out: Path, window: int,
               samples: int) -> dict:
    subprocess.run([python, str(HERE / "locate_authors.py"), "--code", str(code), "--model",
                    str(target), "--facts", str(facts), "--out", str(out), "--window",
                    str(window), "--samples", str(samples)], check=True)
    return json.loads(out.read_text())


def one_window(model, tokenizer, encodings, theirs: dict, samples: int, window: int) -> dict:
    """Both sides at one window: the gaps at the same noise, then the MLP effect at the last
    subject token and the layers chosen from it, ours at its own noise rule and draws (as
    ``unlearn locate`` runs) beside theirs."""
    same = ours_with_their_noise(model, encodings, theirs["noise"], samples, window)
    own_noise = subject_noise(model, tokenizer, encodings)
    own = [Tracer(model, own_noise, samples, window).trace(enc) for enc in encodings]
    subjects = [enc.subject for enc in encodings]
    their_tables = [torch.tensor(t["mlp"]) for t in theirs["facts"]]
    their_low = [t["low_score"] for t in theirs["facts"]]
    effects = {"ours": mlp_effect([o["restored"]["mlp"] for o in own],
                                  [o["corrupted"] for o in own], subjects, "last subject token"),
               "theirs": mlp_effect(their_tables, their_low, subjects, "last subject token"),
               # their graph's "s_l" row reads the first subject token (generate_graphs.py)
               "theirs_graph_row": mlp_effect(their_tables, their_low, subjects,
                                              "first subject token")}
    return {"window": window, "noise": {"theirs": theirs["noise"], "ours": own_noise},
            "max_abs_difference_same_noise": side_by_side(theirs["facts"], same),
            "mlp_effect_last_subject_token": effects,
            "layers_chosen": {name: choose_layers(e) for name, e in effects.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--authors", type=Path, required=True, help="their repository's git directory")
    p.add_argument("--python", required=True, help="the interpreter of the authors' environment")
    p.add_argument("--work", type=Path, default=Path("runs/bench/fidelity"))
    p.add_argument("--facts", type=int, default=12)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--windows", default="10,3", help="MLP/attention windows to compare")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data, target = shared_target(args.work, 0)
    commit = subprocess.run(["git", "--git-dir", str(args.authors), "rev-parse", COMMIT],
                            check=True, capture_output=True, text=True).stdout.strip()
    code = authors_checkout(args.authors, commit, args.work)
    model, tokenizer = load_model(target, dtype=torch.float32, device="cpu")
    model.eval()
    both = facts_for_both(model, tokenizer, data, args.facts)
    facts_file = args.work / "locate-facts.json"
    facts_file.write_text(json.dumps([f for f, _ in both], indent=1))
    encodings, rows = [enc for _, enc in both], []
    for window in map(int, args.windows.split(",")):
        theirs = run_theirs(args.python, code, target, facts_file,
                            args.work / f"locate-theirs-w{window}.json", window, args.samples)
        row = one_window(model, tokenizer, encodings, theirs, args.samples, window)
        rows.append(row)
        print(f"window {window}: {len(both)} facts, {theirs['layers']} layers, "
              f"{args.samples} samples; noise theirs {theirs['noise']:.5f} (subjects tokenized "
              f"alone), ours {row['noise']['ours']:.5f} (subject tokens in their prompts)")
        for kind, gap in row["max_abs_difference_same_noise"].items():
            print(f"  same noise, largest |theirs - ours| of {kind} probabilities: {gap:.2e}")
        for name, effect in row["mlp_effect_last_subject_token"].items():
            print(f"  MLP effect at the last subject token, {name}: "
                  f"{[round(e, 4) for e in effect]} -> layers {row['layers_chosen'][name]}")
    record = {"repository": REPOSITORY, "commit": commit, "model": str(target),
              "facts": len(both), "samples": args.samples, "windows": rows}
    (HERE / "results" / "fidelity-locate.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
