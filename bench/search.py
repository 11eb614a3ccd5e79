"""Settings with the best utility-adjusted share S, found by Optuna (issue 42).

    python bench/search.py --target T --oracle O --data D --name N --method sugd \
        [--trials 20] [--budget 0.25] [--mia D] [--mmlu D] [--enqueue JSON] [key=value ...]

Each trial runs METHOD on the target with settings drawn from the method's space (``SPACES``
below) over the fixed ``key=value`` ones, through ``unlearn.bench`` (one OUT for the whole
study, so the target and the oracle are scored once): the kept model is scored the LUME way on
the MIA documents no run calibrated on, and S = (final / oracle's final) × u, u the general-text
utility against the oracle (:mod:`unlearn.measure.utility`). Optuna's TPE sampler maximises S;
a trial whose run took more than ``--budget`` of the target's training (its base's pretraining
included, selection included) is infeasible, a constraint the sampler learns from.

Every finished trial is written to ``bench/results/search-N.json`` at once (settings, S, share,
u, never-seen NLL, MIA AUC, time share), best first; the study lives in an Optuna journal beside
``--out`` (``OUT.optuna.log``), so a second call with the same name continues it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import optuna

import unlearn
from unlearn.accel import resolve_precision
from unlearn.io import write_json
from unlearn.settings import key_values

RESULTS = Path(__file__).parent / "results"


def sugd_space(trial: optuna.Trial) -> dict:
    """SUGD: where forget rows are drawn (the never-seen level or the base model), how much of
    the network moves, how hard and how long, and what holds general text."""
    return {"teacher": trial.suggest_categorical("teacher", ["none", "auto"]),
            "layers": trial.suggest_categorical("layers", ["last:2", "last:4", "all"]),
            "lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
            "epochs": trial.suggest_int("epochs", 1, 7),
            "positive_ratio": trial.suggest_int("positive_ratio", 1, 7),
            "positive_factor": trial.suggest_float("positive_factor", 0.25, 2.0, log=True),
            "anchor_weight": trial.suggest_categorical("anchor_weight", [0.0, 0.3, 1.0, 3.0])}


def gd_space(trial: optuna.Trial) -> dict:
    """GD (and the other single-stage baselines): rate, length, layers, the retain weight and
    the hold on general text."""
    return {"teacher": trial.suggest_categorical("teacher", ["none", "auto"]),
            "layers": trial.suggest_categorical("layers", ["last:2", "last:4", "all"]),
            "lr": trial.suggest_float("lr", 1e-5, 3e-3, log=True),
            "epochs": trial.suggest_int("epochs", 1, 10),
            "retain_weight": trial.suggest_float("retain_weight", 0.25, 4.0, log=True),
            "anchor_weight": trial.suggest_categorical("anchor_weight", [0.0, 0.3, 1.0, 3.0])}


def npo_space(trial: optuna.Trial) -> dict:
    return {"layers": trial.suggest_categorical("layers", ["last:2", "last:4", "all"]),
            "lr": trial.suggest_float("lr", 1e-5, 3e-3, log=True),
            "epochs": trial.suggest_int("epochs", 1, 10),
            "beta": trial.suggest_float("beta", 0.05, 1.0, log=True),
            "anchor_weight": trial.suggest_categorical("anchor_weight", [0.0, 0.3, 1.0, 3.0])}


def sha256_space(trial: optuna.Trial) -> dict:
    """SHA256: which early MLPs move (the small target has 8 layers), where forget rows are
    drawn, how hard and how long, what the retain weight is measured against, and the hold on
    general text."""
    return {"teacher": trial.suggest_categorical("teacher", ["none", "auto"]),
            "layers": trial.suggest_categorical("layers", ["0-2", "0-3", "0-5", "all"]),
            "lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
            "epochs": trial.suggest_int("epochs", 4, 20),
            "retain_reference": trial.suggest_categorical("retain_reference",
                                                          ["rows", "batches", "source"]),
            "anchor_weight": trial.suggest_categorical("anchor_weight", [0.0, 0.3, 1.0])}


SPACES = {"sugd": sugd_space, "gd": gd_space, "npo": npo_space, "npo_kl": npo_space,
          "sha256": sha256_space}


def training_seconds(model: Path) -> float:
    """What building ``model`` took: its own training and, when unlearn built the model it
    started from, that one's (a target's base pretraining)."""
    record = json.loads((model / "target.json").read_text())
    init = record.get("init")
    if init and (Path(init) / "target.json").is_file():
        return record["train_seconds"] + training_seconds(Path(init))
    return record["train_seconds"]


def trial_row(trial: optuna.trial.FrozenTrial) -> dict:
    return {"trial": trial.number, "state": trial.state.name, "S": trial.value,
            "settings": trial.user_attrs.get("settings", trial.params),
            **{k: v for k, v in trial.user_attrs.items() if k != "settings"}}


def write_study(study: optuna.Study, path: Path, header: dict) -> None:
    rows = [trial_row(t) for t in study.trials if t.state.is_finished()]
    rows.sort(key=lambda r: (r["S"] is None, not r.get("within_budget"), -(r["S"] or 0)))
    write_json(path, {**header, "trials": rows})


def objective(args, fixed: dict, target_seconds: float):
    space = SPACES[args.method]

    def run_trial(trial: optuna.Trial) -> float:
        settings = {**space(trial), **fixed}
        label = f"t{trial.number}"
        board = unlearn.bench(args.data, args.out, methods=[f"{label}:{args.method}"],
                              settings={label: settings}, target=args.target,
                              oracle=args.oracle, mia=args.mia, mmlu=args.mmlu, eval_points=0,
                              receipts=False, seeds=1)
        row = next(r for r in board["rows"] if r["model"] == label)
        share = row["unlearn seconds"] / target_seconds
        trial.set_user_attr("settings", settings)
        for key, column in (("share_of_oracle", "vs oracle"), ("utility", "utility u"),
                            ("never_seen_nll", "never-seen NLL"), ("mia_auc", "MIA AUC"),
                            ("task_aggregate", "task aggregate"), ("kept_step", "kept step"),
                            ("seconds", "unlearn seconds")):
            trial.set_user_attr(key, row[column])
        trial.set_user_attr("time_share", share)
        trial.set_user_attr("within_budget", share <= args.budget)
        return row["S"]

    return run_trial


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--target", "--oracle", "--data", "--name"):
        p.add_argument(flag, required=True)
    p.add_argument("--method", default="sugd", choices=sorted(SPACES))
    p.add_argument("--mia", default="auto")
    p.add_argument("--mmlu", default="auto")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--budget", type=float, default=0.25,
                   help="the most a run may take, as a share of the target's training")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    p.add_argument("--out", default=None, help="default: runs/bench/search-NAME")
    p.add_argument("--enqueue", action="append", default=[], metavar="JSON",
                   help="settings to try first, as a JSON object of the space's names (the best "
                        "of another study, the defaults); repeatable")
    p.add_argument("fixed", nargs="*", metavar="key=value")
    args = p.parse_args()
    args.out = Path(args.out or f"runs/bench/search-{args.name}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fixed = key_values(args.fixed)
    target_seconds = training_seconds(Path(args.target))
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(f"{args.out}.optuna.log"))
    sampler = optuna.samplers.TPESampler(
        seed=args.seed, n_startup_trials=min(8, args.trials),
        constraints_func=lambda t: [t.user_attrs.get("time_share", 0.0) - args.budget])
    study = optuna.create_study(study_name=f"{args.name}-{args.method}", storage=storage,
                                sampler=sampler, direction="maximize", load_if_exists=True)
    for params in args.enqueue:
        study.enqueue_trial(json.loads(params), skip_if_exists=True)
    header = {"command": "python " + " ".join(sys.argv), "method": args.method,
              "target": args.target, "oracle": args.oracle, "data": args.data,
              "target_seconds": target_seconds, "budget": args.budget, "fixed": fixed,
              # trained models differ between CPUs with and without bf16: say which ran it
              "machine": f"{os.cpu_count()} cores, {resolve_precision()} training"}
    path = RESULTS / f"search-{args.name}.json"
    study.optimize(objective(args, fixed, target_seconds), n_trials=args.trials,
                   callbacks=[lambda s, _: write_study(s, path, header)])
    best = json.loads(path.read_text())["trials"][0]
    print(f"best within budget: trial {best['trial']} S {best['S']:.3f} "
          f"(share {best['share_of_oracle']:.3f}, u {best['utility']:.3f}, "
          f"time {best['time_share']:.2f}) {best['settings']}")


if __name__ == "__main__":
    main()
