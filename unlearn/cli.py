"""The ``unlearn`` command line: a thin shell over the package's Python functions."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from . import __version__
from .data import DataError, load_lume, synthesize
from .evaluation.audit import PII_SAMPLES
from .evaluation.relearn import RelearnConfig
from .methods import METHODS
from .models import PRESETS, ModelError
from .target import build_target


def _settings(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"setting {pair!r} is not key=value")
        out[key] = value
    return out


def _add_data_args(parser) -> None:
    parser.add_argument("--data", required=True, help="LUME data directory")
    parser.add_argument("--split", choices=("train", "validation"), default=None,
                        help="the data split, where --data holds several (the official parquet "
                             "snapshot: forget_train-*.parquet, forget_validation-*.parquet); "
                             "default: the one the directory holds")


def _optional_dir(value: str):
    """``none`` turns off a directory that would otherwise be found next to the data."""
    return None if value.lower() == "none" else value


def cmd_synth(args) -> None:
    out = synthesize(args.out, seed=args.seed, docs_per_task=args.docs_per_task)
    print(f"wrote synthetic LUME-style benchmark to {out}")


def cmd_check(args) -> None:
    data = load_lume(args.dir, args.split)
    print(json.dumps(data.summary(), indent=2))
    absent = data.absent_terms()
    if absent:
        print(f"note: no rows for {', '.join(absent)}; the task aggregate is the harmonic mean "
              f"of the other terms")


def cmd_target(args) -> None:
    record = build_target(args.data, args.out, preset=args.preset, init=args.init,
                          pretrain=args.pretrain, mmlu=args.mmlu, mia=args.mia, seed=args.seed,
                          split=args.split, **_settings(args.settings))
    print(json.dumps(record["memorisation"], indent=2))
    print(f"target written to {args.out} ({record['parameters']:,} parameters, "
          f"{record['train_seconds']:.0f} s of training)")


def cmd_eval(args) -> None:
    from .evaluation.scoring import evaluate
    from .evaluation.table import results_table
    results = evaluate(args.model, args.data, args.out, mia=args.mia, mmlu=args.mmlu,
                       max_new_tokens=args.max_new_tokens, dtype=args.dtype, audit=args.audit,
                       samples=args.samples, before=args.before, resume=args.resume,
                       seed=args.seed, split=args.split)
    print(results_table(results))
    print(f"results and report.html written to {args.out}")


def cmd_run(args) -> None:
    from .engine import run
    record = run(args.method, args.model, args.data, args.out, config=args.config,
                 seed=args.seed, eval_every=args.eval_every, profile=args.profile, mia=args.mia,
                 mmlu=args.mmlu, split=args.split, **_settings(args.settings))
    selection = record.get("selection")
    if selection and selection["rule"] == "score":
        kept = next(t for t in selection["trail"] if t["step"] == selection["kept_step"])
        print(f"selection: kept step {selection['kept_step']} of {record['steps_trained']} "
              f"trained (estimated final score {kept['estimate']:.3f}; "
              f"{len(selection['trail'])} checks, {selection['seconds']:.0f} s)")
    print(f"{args.method}: {record['steps']} steps in {record['train_seconds']:.0f} s, "
          f"{record['trainable_parameters']:,} parameters trained, peak memory "
          f"{record['peak_memory_mb']:.0f} MB; model written to {args.out}")


def cmd_locate(args) -> None:
    from .tracing import locate
    record = locate(args.model, args.data, args.out, samples=args.samples, window=args.window,
                    share=args.share, max_facts=args.max_facts, seed=args.seed,
                    split=args.split)
    print(f"traced {record['facts_used']} facts ({record['facts_skipped']} skipped: not "
          f"answered right at top-1) in {record['seconds']:.0f} s")
    print(f"layers chosen: {record['layers_chosen']} ({record['rule']})")
    print(f"trace.json and heatmaps written to {args.out}")


def cmd_audit(args) -> None:
    from .evaluation.receipt import audit
    config = RelearnConfig(steps=args.relearn_steps, lr=args.relearn_lr,
                           share=args.relearn_share)
    receipt = audit(args.model, args.original, args.data, args.mia, args.out,
                    oracle=args.oracle, split=args.split, seed=args.seed, samples=args.samples,
                    max_new_tokens=args.max_new_tokens, relearn_config=config,
                    evaluation=args.evaluation)
    s = receipt["summary"]
    print(f"{s['documents']} forget documents: {s['forgotten']} forgotten, {s['partly']} "
          f"partly, {s['remembered']} remembered ({s['over_unlearned']} over-unlearned)")
    for name, after in s["relearned"].items():
        print(f"relearned {name}: knowledge {after['knowledge']}, "
              f"regurgitation {after['regurgitation']}")
    print(f"robust: {s['relearn_robust']}; receipt.json and receipt.html written to {args.out}")


def cmd_bench(args) -> None:
    from .leaderboard import bench, settings_by_label
    per_method = settings_by_label(args.settings)
    board = bench(args.data, args.out, methods=args.methods.split(","), mia=args.mia,
                  mmlu=args.mmlu, pretrain=args.pretrain, preset=args.preset, seeds=args.seeds,
                  eval_points=args.eval_points, target_settings=per_method.pop("target", None),
                  trace=args.trace, settings=per_method, target=args.target,
                  oracle=args.oracle, split=args.split, receipts=not args.no_receipts)
    print((Path(args.out) / "leaderboard.md").read_text())
    print(f"{len(board['rows'])} models; report: {Path(args.out) / 'report.html'}")


def cmd_demo(args) -> None:
    from .demo import demo
    demo(args.out, preset=args.preset, seed=args.seed)


def _add_data(sub) -> None:
    """``unlearn data synth|check``."""
    data = sub.add_parser("data", help="create or check LUME-format data").add_subparsers(
        dest="data_command", required=True)
    s = data.add_parser("synth", help="write the synthetic LUME-style benchmark")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--docs-per-task", type=int, default=40)
    s.set_defaults(func=cmd_synth)
    c = data.add_parser("check", help="validate a LUME data directory and count its rows")
    c.add_argument("dir")
    c.add_argument("--split", choices=("train", "validation"), default=None,
                   help="the data split, where DIR holds several (the official parquet snapshot)")
    c.set_defaults(func=cmd_check)


def _add_target(sub) -> None:
    """``unlearn target``: build a memorising model."""
    t = sub.add_parser("target", help="train a model that has memorised a LUME dataset")
    _add_data_args(t)
    t.add_argument("--out", required=True, help="model directory to write")
    t.add_argument("--preset", choices=sorted(PRESETS), default="small")
    t.add_argument("--init",
                   help="fine-tune this local HF causal LM instead of training from scratch")
    for name, what in (("pretrain", "general corpus to pretrain on first"),
                       ("mmlu", "MMLU-format general-knowledge questions to learn"),
                       ("mia", "MIA set to measure (never trained on)")):
        t.add_argument(f"--{name}", type=_optional_dir, default="auto",
                       help=f"{what}; default: DATA/{name} when present; 'none' to skip")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("settings", nargs="*", metavar="key=value",
                   help="override preset fields, e.g. epochs=80 lr=1e-3")
    t.set_defaults(func=cmd_target)


def _add_eval(sub) -> None:
    """``unlearn eval``: the official LUME scores."""
    e = sub.add_parser("eval", help="score a model as SemEval-2025 Task 4 did (LUME)")
    e.add_argument("--model", required=True, help="HF model directory")
    _add_data_args(e)
    e.add_argument("--mia", help="MIA directory (member.jsonl, nonmember.jsonl)")
    e.add_argument("--mmlu", help="MMLU-format directory of CSVs")
    e.add_argument("--out", required=True)
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 on a GPU (as the official scorer), fp32 on a CPU")
    e.add_argument("--audit", action="store_true",
                   help="leak audit: four MIAs on the forget documents, PII extraction")
    e.add_argument("--samples", type=int, default=PII_SAMPLES,
                   help="PII samples per prompt (audit)")
    e.add_argument("--before", help="evaluation directory of the model before unlearning, "
                                    "drawn for comparison in report.html")
    e.add_argument("--resume", action="store_true",
                   help="reuse the generations of an interrupted run with the same --out")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_eval)


def _add_run(sub) -> None:
    """``unlearn run``: one method on one model."""
    r = sub.add_parser("run", help="unlearn the forget set from a model")
    r.add_argument("--method", required=True, choices=sorted(METHODS))
    r.add_argument("--model", required=True, help="HF model directory (only read)")
    _add_data_args(r)
    r.add_argument("--out", required=True, help="model directory to write")
    r.add_argument("--config", help="JSON, TOML or YAML file of method settings")
    r.add_argument("--profile", choices=["auto", "paper", "small"], default="auto",
                   help="defaults: the paper's, or adjusted for small from-scratch targets "
                        "(auto: small when the model's target.json says it was built from scratch)")
    r.add_argument("--eval-every", type=int, default=0, metavar="EPOCHS",
                   help="score forget/retain every this many epochs into run.json")
    r.add_argument("--mia", type=_optional_dir, default="auto",
                   help="MIA set whose held-out split calibrates the choice of the model kept "
                        "(select=score); default: DATA/mia when present; 'none' to skip")
    r.add_argument("--mmlu", type=_optional_dir, default="auto",
                   help="MMLU-format questions the estimate asks; default: DATA/mmlu when "
                        "present; 'none' to skip")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("settings", nargs="*", metavar="key=value",
                   help="override method settings, e.g. lr=1e-4 lora=true layers=last:2")
    r.set_defaults(func=cmd_run)


def _add_locate(sub) -> None:
    """``unlearn locate``: causal tracing."""
    lo = sub.add_parser("locate", help="causal tracing: which layers carry the Task2 facts")
    lo.add_argument("--model", required=True)
    _add_data_args(lo)
    lo.add_argument("--out", required=True)
    lo.add_argument("--samples", type=int, default=10, help="noise samples per fact")
    lo.add_argument("--window", type=int, default=10, help="layers restored together (MLP/attn)")
    lo.add_argument("--share", type=float, default=0.6,
                    help="share of the MLP effect the chosen block of layers must hold")
    lo.add_argument("--max-facts", type=int)
    lo.add_argument("--seed", type=int, default=0)
    lo.set_defaults(func=cmd_locate)


def _add_audit(sub) -> None:
    """``unlearn audit``: a receipt per forget document and the relearning attack."""
    a = sub.add_parser("audit", help="a verdict per forget document (forgotten, partly, "
                       "remembered) and a relearning attack; writes receipt.json and .html")
    a.add_argument("--model", required=True, help="the unlearned model")
    a.add_argument("--original", required=True, help="the model before unlearning")
    _add_data_args(a)
    a.add_argument("--mia", required=True, help="MIA directory: its non-members are the "
                   "never-seen documents every forget document is judged against")
    a.add_argument("--out", required=True)
    a.add_argument("--oracle", help="a model never trained on the forget set: the relearning "
                   "attack on it is what robust is judged against; default: none")
    a.add_argument("--seed", type=int, default=0, help="PII sampling and the attack's split")
    a.add_argument("--samples", type=int, default=PII_SAMPLES, help="PII samples per prompt")
    a.add_argument("--evaluation", help="an `unlearn eval --audit` output of --model (same "
                   "data, seed and samples): its PII findings are used, not sampled again")
    a.add_argument("--max-new-tokens", type=int, default=256)
    defaults = RelearnConfig()
    a.add_argument("--relearn-steps", type=int, default=defaults.steps,
                   help="the attacker's fine-tuning steps")
    a.add_argument("--relearn-lr", type=float, default=defaults.lr,
                   help="the attacker's learning rate")
    a.add_argument("--relearn-share", type=float, default=defaults.share,
                   help="share of the forget documents the attacker fine-tunes on")
    a.set_defaults(func=cmd_audit)


def _add_bench(sub) -> None:
    """``unlearn bench``: methods against the oracle."""
    b = sub.add_parser("bench", help="compare methods on one target against the oracle")
    _add_data_args(b)
    for name, what in (("pretrain", "general corpus for the target and oracle"),
                       ("mmlu", "MMLU-format general-knowledge questions"),
                       ("mia", "MIA set")):
        b.add_argument(f"--{name}", type=_optional_dir, default="auto",
                       help=f"{what}; default: DATA/{name} when present; 'none' to skip")
    b.add_argument("--methods", default="sugd,sha256,gd,npo",
                   help="comma list; label:method runs a variant with settings label.key=value")
    b.add_argument("--out", required=True)
    b.add_argument("--preset", choices=sorted(PRESETS), default="small")
    b.add_argument("--seeds", type=int, default=1)
    b.add_argument("--target", help="a model directory to unlearn (e.g. your checkpoint) "
                   "instead of one built from DATA; default: build the target and oracle")
    b.add_argument("--oracle", help="with --target: the model never trained on the forget set, "
                   "every final score set against it; default: none")
    b.add_argument("--trace", help="an `unlearn locate` output: its heatmaps go in the report")
    b.add_argument("--eval-points", type=int, default=6,
                   help="evaluations along each method's run (its trajectory in the report)")
    b.add_argument("--no-receipts", action="store_true",
                   help="skip `unlearn audit` of every model (the verdict per forget document "
                        "and the relearning attack; needs the MIA set)")
    b.add_argument("settings", nargs="*", metavar="method.key=value",
                   help="method settings, e.g. sugd.lr=5e-4; target.key=value sets the target "
                        "preset's, e.g. target.pretrain_tokens=600000")
    b.set_defaults(func=cmd_bench)


def _add_demo(sub) -> None:
    """``unlearn demo``: the main job on the synthetic benchmark."""
    d = sub.add_parser("demo", help="the main job on the embedded synthetic benchmark")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--preset", choices=sorted(PRESETS), default="small")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unlearn", description=__doc__)
    p.add_argument("--version", action="version", version=f"unlearn {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_data(sub)
    _add_target(sub)
    _add_eval(sub)
    _add_run(sub)
    _add_locate(sub)
    _add_audit(sub)
    _add_bench(sub)
    _add_demo(sub)
    return p


def _rank() -> int:
    """This process's rank under `accelerate launch`/torchrun (0 when run alone)."""
    return int(os.environ.get("RANK", "0"))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if _rank() != 0:  # one process reports; the others work silently beside it
        sys.stdout = open(os.devnull, "w")
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(f"unlearn {args.command}: interrupted; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except (MemoryError, torch.OutOfMemoryError) as e:
        detail = (str(e).splitlines() or ["the allocator gave up"])[0][:120]
        print(f"unlearn {args.command}: error: out of memory ({detail}); lower batch_size= "
              f"(or max_len=, --max-new-tokens), or use gradient_checkpointing=true or "
              f"lora=true", file=sys.stderr)
        return 2
    except (DataError, ModelError, ValueError, FloatingPointError, OSError) as e:
        print(f"unlearn {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
