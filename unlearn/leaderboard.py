"""``unlearn bench``: methods side by side on one target, against the oracle.

For each seed: build (or reuse, keyed by data, preset and seed) a pretrained base, then from it
the target and the **oracle** (the same recipe memorising the retain rows only: the model that
never saw the forget set, which every unlearning method approximates). Sharing the base makes the
oracle differ from the target by the forget documents alone, as a real deletion would, and pays
for pretraining once. Run every method with evaluations along the way, score every model the LUME
way with the leak audit, audit every model document by document and attack it by relearning
(``unlearn audit``; the target's and the oracle's attacks run once), then write a leaderboard and
a report.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from .data import beside_data, load_lume
from .engine import resolve_config, run
from .evaluation.audit import PII_SAMPLES
from .evaluation.receipt import audit, made_of
from .evaluation.relearn import RelearnConfig
from .evaluation.report import bench_report
from .evaluation.scoring import evaluate
from .io import (
    AUDIT,
    BENCH,
    EVAL,
    RUN,
    claim_output,
    fingerprint,
    in_place,
    is_output,
    path_text,
    write_json,
)
from .measure.official import task_names
from .measure.utility import DAMAGED_BELOW, adjusted_share, damage_note, utility
from .methods import get_method
from .methods.base import UnlearnConfig
from .models.loading import check_model_dirs, check_oracle, model_fingerprint, teacher_of
from .models.presets import preset_settings
from .selection import scored_rest
from .settings import SEED_RANGE, key_values, shown
from .target import build_target


def _terms(results: dict) -> dict[str, float | None]:
    """The task scores as measured (forget not inverted: lower is better there), for every task
    of the data; None where a split has no row for one."""
    tasks = sorted({t for split in ("forget", "retain")
                    for t in task_names(results[f"{split}-set"])})
    return {f"{split} {task} {score}": results[f"{split}-set"].get(task, {}).get(f"{score}-score")
            for split in ("forget", "retain") for task in tasks
            for score in ("regurgitation", "knowledge")}


def _row(name: str, results: dict, oracle: dict | None, reference: dict,
         run_record: dict | None, target_seconds: float | None, receipt: dict | None) -> dict:
    """A model's leaderboard row; ``reference`` (the oracle's results, else the target's) is
    what its reading of never-seen text is set against (:mod:`unlearn.measure.utility`)."""
    row = {"model": name, **_terms(results),
           "task aggregate": results["harmonic-mean-task-aggregate"],
           "MIA AUC": results.get("mia_loss_acc"), "MIA score": results.get("mia_final_score"),
           "MMLU": results.get("mmlu_average"), "final score": results["final-score"],
           "vs oracle": results["final-score"] / oracle["final-score"] if oracle else None}
    mine, theirs = results.get("never_seen_nll"), reference.get("never_seen_nll")
    u = utility(mine, theirs) if mine is not None and theirs is not None else None
    row.update({"never-seen NLL": mine, "reference never-seen NLL": theirs, "utility u": u,
                "S": adjusted_share(results["final-score"],
                                    oracle["final-score"] if oracle else None, u),
                "general text damaged": None if u is None else u < DAMAGED_BELOW})
    if run_record:
        row["unlearn seconds"] = run_record["train_seconds"]  # choosing the model included
        selection = run_record.get("selection") or {}
        row["selection seconds"] = selection.get("seconds")
        row["kept step"] = selection.get("kept_step")
        row["fraction of target training"] = (run_record["train_seconds"] / target_seconds
                                              if target_seconds else None)
        row["peak memory MB"] = run_record.get("peak_memory_mb")
    row["PII leak rate"] = results.get("audit", {}).get("pii", {}).get("leak_rate")
    if receipt:
        summary = receipt["summary"]
        relearned = summary["relearned"]["unlearned"]
        row.update({"forgotten share": summary["forgotten_share"],
                    # on the oracle's row: the verdict's false positives
                    "remembered share": summary["remembered_share"],
                    "relearned knowledge": relearned["knowledge"],
                    "relearned regurgitation": relearned["regurgitation"],
                    "relearn robust": summary["relearn_robust"]})
    return row


def _made_the_same_way(out: Path, kind, same: dict) -> bool:
    """Whether ``out`` is a finished output of ``kind`` whose record holds ``same``'s values."""
    if not is_output(out, kind):
        return False
    made = json.loads((out / kind.record).read_text())
    return all(made.get(k) == v for k, v in same.items())


def _cached_receipt(model: Path, out: Path, original: Path, oracle: Path | None, data: Path,
                    mia: Path, seed: int, split: str | None, **kw) -> dict:
    """The receipt in ``out`` when it was made of these very model files the same way, else a
    new one in its place."""
    same = made_of(model, original, oracle, data, split, mia, seed, RelearnConfig(),
                   beside_data(data, "auto", "never_seen"))
    if _made_the_same_way(out, AUDIT, same):
        return json.loads((out / AUDIT.record).read_text())
    return audit(model, original, data, mia, out, oracle=oracle, split=split, seed=seed,
                 allow_unchanged=True, **kw)


def _cached_eval(model: Path, data, out: Path, **kw) -> dict:
    """The evaluation in ``out`` when it scored these very model files the same way, else a
    new one in its place."""
    same = {"model_files": model_fingerprint(model), "data_dir": str(data), "audit": True,
            "mia": path_text(kw.get("mia")), "mmlu": path_text(kw.get("mmlu")),
            "seed": kw.get("seed", 0), "split": kw.get("split"), "samples": PII_SAMPLES}
    if _made_the_same_way(out, EVAL, same):
        return json.loads((out / "results.json").read_text())
    # the utility is set against the oracle's (or target's) evaluation, in the row
    return evaluate(model, data, out, audit=True, reference=None, **kw)


def finished_run(model: Path, method: str, target: Path, seed: int, eval_points: int,
                  inputs: dict, overrides: dict) -> bool:
    """Whether ``model`` holds a run of ``method`` with these settings on this very target."""
    config, _ = resolve_config(get_method(method), target, **overrides)
    return _made_the_same_way(model, RUN, {
        "method": method, "seed": seed, "eval_points": eval_points,
        **{k: path_text(v) for k, v in inputs.items()}, "model_files": model_fingerprint(target),
        "config": json.loads(json.dumps(asdict(config)))})


def bench(data: str | Path, out: str | Path, methods=("sugd", "sha256", "gd", "npo"),
          mia="auto", mmlu="auto", pretrain="auto", preset: str = "small", seeds: int = 1,
          eval_points: int = 6, cache: str | Path | None = None,
          settings: dict[str, dict] | None = None, target_settings: dict | None = None,
          trace: str | Path | None = None, target: str | Path | None = None,
          oracle: str | Path | None = None, split: str | None = None,
          receipts: bool = True) -> dict:
    """Compare ``methods`` on the target built from ``data``; write ``out/leaderboard.{md,csv,
    json}`` and ``out/report.html``. ``mia``/``mmlu``/``pretrain`` default to the ``data``
    subdirectories of those names when present. ``settings[method]`` overrides a method's
    config; a method may be a variant ``label:method`` whose settings sit under its label
    (``sugd_fixed:sugd`` with ``{"sugd_fixed": {"select": "none"}}``). Runs are given the MIA
    set and choose their model on a held-out split of it (``select_split``); every model is
    scored on the MIA documents outside that split.
    ``target`` (a model directory, e.g. a real checkpoint) is unlearned instead of a target
    built here, and ``oracle`` (optional: without one no score is set against it) is the
    model that never saw the forget set; ``preset``, ``pretrain`` and ``target_settings`` then
    go unused. ``target_settings`` overrides the preset. Each method is evaluated at
    ``eval_points`` moments of its run (its trajectory in the report). ``trace`` (an
    ``unlearn locate`` output; default: the one a method's ``trace=`` setting names) puts the
    causal-tracing heatmaps in the report. ``split`` chooses one data split where ``data``
    holds several (the official parquet snapshot). ``receipts`` (with an MIA set) audits every
    model as ``unlearn audit`` does: a verdict per forget document and the relearning attack,
    whose figures join the leaderboard; the target and the oracle are attacked once per seed.
    Returns the leaderboard (rows and, over several seeds, mean and std)."""
    data, out = Path(data), Path(out)
    mia, mmlu, pretrain = (beside_data(data, mia, "mia"), beside_data(data, mmlu, "mmlu"),
                           beside_data(data, pretrain, "pretrain"))
    settings = settings or {}
    _check_inputs(methods, settings, seeds, eval_points, target, oracle, preset, target_settings)
    # extended in place, never replaced: OUT may hold its inputs (the demo's data), not be one
    claim_output(out, BENCH, {"--data": data, "--mia": mia, "--mmlu": mmlu,
                              "--pretrain": pretrain, "--trace": trace, "cache": cache,
                              "--target": target, "--oracle": oracle}, in_place=True)
    lume = load_lume(data, split)
    held_out = _calibration_share(settings, methods, mia)
    made = {"data": str(data), "split": split, "methods": list(methods), "preset": preset,
            "seeds": seeds, "settings": settings, "target_settings": target_settings,
            "target": path_text(target), "oracle": path_text(oracle), "receipts": receipts}
    with in_place(out, BENCH, made):
        runs, first, trajectories, first_receipts = [], {}, {}, {}
        for seed in range(seeds):
            if target is None:
                key = fingerprint([(r.id, r.input, r.output) for r in lume.rows], preset,
                                  str(pretrain), str(mmlu), target_settings)
                models = _build(data, Path(cache or out / "cache") / f"{preset}-{key}-seed{seed}",
                                preset, pretrain, mmlu, mia, seed, target_settings or {}, split)
            else:
                models = {"target": Path(target), "oracle": Path(oracle) if oracle else None}
            rows, evals, runs_of_seed, audited = _bench_seed(
                data, out / f"seed{seed}", models, methods, lume, mia, mmlu, held_out, seed,
                eval_points, settings, split, receipts)
            if seed == 0:
                first, trajectories = evals, {label: _trajectory(record)
                                              for label, record in runs_of_seed.items()}
                first_receipts = {label: (receipt, f"seed0/audit-{label}/receipt.html")
                                  for label, receipt in audited.items()}
            runs.append(rows)
        board = _leaderboard(runs)
        board["damaged"] = [damage_note(r["model"], r["never-seen NLL"],
                                        r["reference never-seen NLL"])
                            for r in board["rows"] if r.get("general text damaged")]
        trace = trace or next((s["trace"] for s in settings.values() if s.get("trace")), None)
        _write_board(out, board, first, trajectories, first_receipts, trace)
    return board


def _write_board(out: Path, board: dict, evals: dict, trajectories: dict, receipts: dict,
                 trace) -> None:
    """``leaderboard.{csv,md,json}`` and ``report.html`` (seed 0's evaluations, trajectories
    and receipts; the causal-tracing heatmaps of ``trace`` when given)."""
    frame = pd.DataFrame(board["rows"])
    frame.to_csv(out / "leaderboard.csv", index=False)
    (out / "leaderboard.md").write_text(_markdown(frame))
    write_json(out / "leaderboard.json", board)
    bench_report(out / "report.html", evals, trajectories,
                 {k: out / "seed0" / f"eval-{k}" for k in evals}, frame,
                 Path(trace) if trace else None, receipts)


LABEL = re.compile(r"[A-Za-z0-9_-]+")  # a method's label names directories under OUT
RESERVED_LABELS = ("target", "oracle", "base")  # the models a bench builds or is given


def _check_inputs(methods, settings: dict[str, dict], seeds: int, eval_points: int, target,
                  oracle, preset: str, target_settings: dict | None) -> None:
    """Refuse, before any work, what would fail later or write outside OUT: a label that is
    not a plain name (``../x`` or an absolute path would name another directory), an unknown
    method, settings of no method given or not its own, a bad seed count, and model
    directories that cannot load or are one model in two roles."""
    labels = []
    for entry in methods:
        label, _, name = entry.partition(":")
        if not LABEL.fullmatch(label) or label in RESERVED_LABELS:
            raise ValueError(f"method label {shown(label)!r}: use letters, digits, '_' and '-' "
                             f"only (it names a directory under --out), other than "
                             f"{', '.join(RESERVED_LABELS)}")
        if label in labels:
            raise ValueError(f"method label {label!r} is given twice; give each run its own "
                             f"label:method")
        labels.append(label)
        get_method(name or label).Config().override(**settings.get(label, {}))
    stray = sorted(set(settings) - set(labels))
    if stray:
        raise ValueError(f"settings for {shown(', '.join(stray))}: no such method label in "
                         f"--methods ({', '.join(labels)})")
    if not 1 <= seeds <= len(SEED_RANGE):
        raise ValueError(f"seeds={seeds}: must be at least 1")
    if eval_points < 0:
        raise ValueError(f"eval_points={eval_points}: must be at least 0")
    if target is None:
        if oracle is not None:
            raise ValueError("oracle= needs target=: a built target comes with its own oracle")
        preset_settings(preset, target_settings or {})
        return
    check_model_dirs(target, oracle)
    check_oracle(oracle, target, "--target")


def _bench_seed(data: Path, base: Path, models: dict, methods, lume, mia, mmlu, held_out,
                seed: int, eval_points: int, settings: dict, split: str | None,
                receipts: bool) -> tuple[list, dict, dict, dict]:
    """One seed: the target (and oracle) scored, every method run from the target and scored,
    then, with ``receipts`` and an MIA set, every model audited. Returns the leaderboard rows,
    every model's results, every run's record and every model's receipt."""
    target_seconds = _training_seconds(models.get("base") or _built_base(models["target"]),
                                       models["target"])
    # no model is judged on the MIA documents that chose a run's model (the run's seed gives
    # the same split the run held out)
    scored = (scored_rest(mia, held_out, seed, lume, models["target"]).save(base / "mia-scored")
              if held_out else mia)
    kw = dict(mia=scored, mmlu=mmlu, seed=seed, split=split)
    evals = {kind: _cached_eval(models[kind], data, base / f"eval-{kind}", **kw)
             for kind in ("target", "oracle") if models.get(kind)}
    records = {}
    for entry in methods:
        label, _, name = entry.partition(":")  # `label:method`: a variant of a method
        model = base / label
        inputs = dict(mia=mia, mmlu=mmlu, split=split)
        if not finished_run(model, name or label, models["target"], seed, eval_points,
                             inputs, settings.get(label, {})):
            run(name or label, models["target"], data, model, seed=seed,
                eval_points=eval_points, **inputs, **settings.get(label, {}))
        records[label] = json.loads((model / "run.json").read_text())
        evals[label] = _cached_eval(model, data, base / f"eval-{label}",
                                    before=base / "eval-target", **kw)
    audited = (_receipts(base, models, [e.partition(":")[0] for e in methods], data, scored,
                         seed, split) if receipts and scored else {})
    reference = evals.get("oracle") or evals["target"]
    # the oracle's row shows what exact retraining from the base cost, when it was built here
    retrain = _training_seconds(models.get("oracle"))
    costs = {**records, **({"oracle": {"train_seconds": retrain}} if retrain else {})}
    rows = [_row(k, evals[k], evals.get("oracle"), reference, costs.get(k), target_seconds,
                 audited.get(k)) for k in evals]
    return rows, evals, records, audited


def _receipts(base: Path, models: dict, labels: list[str], data: Path, mia: Path, seed: int,
              split: str | None) -> dict[str, dict]:
    """Every model's receipt (``unlearn audit``) in ``base/audit-LABEL``. The target and the
    oracle are attacked once, with the target's receipt; every other receipt reuses those
    attacks, and the PII findings of the model's evaluation."""
    paths = {"target": models["target"], "oracle": models.get("oracle"),
             **{label: base / label for label in labels}}
    done, attacks = {}, {}
    for label, model in paths.items():
        if model is None:
            continue
        done[label] = _cached_receipt(model, base / f"audit-{label}", models["target"],
                                      models.get("oracle"), data, mia, seed, split,
                                      attacks=attacks, evaluation=base / f"eval-{label}")
        attacks = {role: done[label]["relearn"][role] for role in ("original", "oracle")
                   if role in done[label]["relearn"]}
    return done


def _training_seconds(*models: Path | None) -> float | None:
    """What building these models took (a target: its base's pretraining and its memorising),
    when unlearn built every one of them; None otherwise."""
    records = [m / "target.json" for m in models if m]
    if not records or not all(r.is_file() for r in records):
        return None
    return sum(json.loads(r.read_text())["train_seconds"] for r in records)


def _built_base(target: Path) -> Path | None:
    """The base a given target (``--target``) was fine-tuned from, when unlearn built that base
    as a model of its own: its pretraining is part of what the target cost. A base saved inside
    a target trained from scratch is not: the target's own time holds its pretraining."""
    base = teacher_of(target)
    return base if base and (base / "target.json").is_file() else None


def _trajectory(record: dict) -> list:
    return [(e["eval"]["forget-set"], e["eval"]["retain-set"])
            for e in record["history"] if "eval" in e]


def settings_by_label(pairs: list[str]) -> dict[str, dict[str, str]]:
    """``label.key=value`` pairs (a method, a variant's label or ``target``) grouped by label:
    ``["sugd.lr=5e-4"]`` -> ``{"sugd": {"lr": "5e-4"}}``."""
    grouped: dict[str, dict[str, str]] = {}
    for key, value in key_values(pairs).items():
        label, _, name = key.partition(".")
        if not name:
            raise ValueError(f"setting {key}={value}: name the method (or target), e.g. "
                             f"sugd.lr={value}")
        grouped.setdefault(label, {})[name] = value
    return grouped


def _calibration_share(settings: dict[str, dict], methods, mia) -> float | None:
    """The share of the bench's MIA set that runs hold out to choose their model
    (``select_split``; one share for all, so every model is scored on the same rest), or None
    without an MIA set."""
    if not mia:
        return None
    labels = [entry.partition(":")[0] for entry in methods]
    shares = {float(settings.get(label, {}).get("select_split", UnlearnConfig.select_split))
              for label in labels}
    if len(shares) > 1:
        raise ValueError(f"select_split differs between {', '.join(labels)}: every model is "
                         f"scored on the MIA documents none calibrated on, so give them one share")
    return shares.pop()


def _build(data: Path, prefix: Path, preset: str, pretrain, mmlu, mia, seed: int,
           target_settings: dict, split: str | None) -> dict[str, Path]:
    """The base (pretraining only), then the target and the oracle fine-tuned from it, the
    corpus replayed but not pretrained on again. Each is reused once complete."""
    built = {}
    for kind in ("base", "target", "oracle"):
        model = built[kind] = prefix.with_name(f"{kind}-{prefix.name}")
        if (model / "target.json").exists():
            continue
        if kind == "base":
            build_target(data, model, preset=preset, pretrain=pretrain, mmlu=mmlu, mia=mia,
                         seed=seed, split=split, **{**target_settings, "epochs": 0})
        else:
            build_target(data, model, preset=preset, init=built["base"], pretrain=pretrain,
                         mmlu=mmlu, mia=mia, seed=seed, oracle=kind == "oracle", split=split,
                         **{**target_settings, "pretrain_tokens": 0})
    return built


def _leaderboard(runs: list[list[dict]]) -> dict:
    """One row per model: the value for one seed; mean and std over several."""
    if len(runs) == 1:
        return {"seeds": 1, "rows": runs[0]}
    rows = []
    for i, first in enumerate(runs[0]):
        row = {"model": first["model"]}
        for column, value in first.items():
            if column == "model" or value is None:
                continue
            values = [r[i][column] for r in runs]
            row[column] = statistics.mean(values)
            row[f"{column} std"] = statistics.stdev(values)
        rows.append(row)
    return {"seeds": len(runs), "rows": rows, "per_seed": runs}


def _markdown(frame: pd.DataFrame) -> str:
    def cell(v):
        return "" if v is None or (isinstance(v, float) and v != v) else (
            f"{v:.3f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(frame.columns) + " |",
             "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join(lines) + "\n"
