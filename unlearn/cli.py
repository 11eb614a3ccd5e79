"""The ``unlearn`` command line: a thin shell over the package's Python functions."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import torch

from . import __version__
from .data import DataError, check_data, import_documents, importing, load_lume, synthesize
from .data import synth as synth_module
from .data.importing import CUSTOM_TASK
from .evaluation.audit import PII_SAMPLES
from .evaluation.relearn import ATTACK_MODES, RelearnConfig
from .io import release_all
from .measure.utility import damage_note
from .methods import METHODS, UnlearnConfig
from .models import PRESETS, ModelError
from .models.loading import INFERENCE_DTYPES
from .settings import key_values
from .target import build_target
from .tracing.trace import ANSWERS
from .training import checkpoint_minutes

DESCRIPTION = ("Remove chosen documents from a trained causal language model, keep what it "
               "should still know, and prove it (SemEval-2025 Task 4, LUME). Each command has "
               "its own --help.")
EXAMPLES = """examples:
  unlearn demo                                   # the whole job on the embedded benchmark
  unlearn data import --forget docs/forget --retain docs/retain.jsonl --out data
  unlearn run --method sugd --model MY_MODEL --data data --out sugd
  unlearn eval --model sugd --data data --out sugd-eval --before target-eval
  unlearn bench --data data --target MY_MODEL --methods sugd,gd --out bench
"""


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every option's default after its help, unless the help
    already says it or there is none to say (a flag, an option off by default)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        quiet = action.default is None or action.default is False  # 0 is a default to show
        if (not quiet and action.default != argparse.SUPPRESS and "default" not in text
                and (action.option_strings or action.nargs == "*")):
            text += " (default: %(default)s)"
        return text


def _command(sub, name: str, summary: str, description: str | None = None):
    return sub.add_parser(name, help=summary, description=description or summary,
                          formatter_class=_Help)


def _methods_epilog() -> str:
    """Each method, the first sentence of its docstring, and the settings its config adds or
    changes."""
    shared = {f.name: f.default for f in fields(UnlearnConfig)}
    lines = ["methods (settings of their own or changed, paper defaults; 'small:' the "
             "overrides for small from-scratch targets, and those where a teacher exists):"]
    for name, cls in sorted(METHODS.items()):
        doc = " ".join((sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").split())
        first = re.split(r"(?<! al)\.\s", doc)[0]  # the first sentence ("et al." is not an end)
        lines.append(f"  {name:8} " + textwrap.shorten(first, 88, placeholder=" ..."))
        own = [f"{f.name}={f.default}" for f in fields(cls.Config)
               if shared.get(f.name, object()) != f.default]
        small = " ".join(f"{k}={v}" for k, v in cls.small_target.items())
        based = " ".join(f"{k}={v}" for k, v in cls.small_target_with_teacher.items())
        settings = (" ".join(own) or "(the shared settings only)") + (
            f"; small: {small}" if small else "") + (
            f"; then, where the target's base was kept: {based}" if based else "")
        lines += textwrap.wrap(settings, 99, initial_indent=" " * 11, subsequent_indent=" " * 11)
    lines += textwrap.wrap("shared settings of every method (lr, epochs, batch_size, layers, "
                           "lora, select, ...): help(unlearn.methods.UnlearnConfig) and the "
                           "README's methods table", 99)
    return "\n".join(lines)


def _add_data_args(parser) -> None:
    parser.add_argument("--data", required=True, help="LUME data directory")
    parser.add_argument("--split", choices=("train", "validation"),
                        help="the data split, where --data holds several (the official parquet "
                             "snapshot: forget_train-*.parquet, forget_validation-*.parquet); "
                             "default: the one the directory holds")


def _optional_dir(value: str):
    """``none`` turns off a directory that would otherwise be found next to the data."""
    return None if value.lower() == "none" else value


def cmd_synth(args) -> None:
    out = synthesize(args.out, seed=args.seed, docs_per_task=args.docs_per_task)
    print(f"wrote synthetic LUME-style benchmark to {out}")


def cmd_import(args) -> None:
    out = import_documents(args.forget, args.retain, args.out, nonmember=args.nonmember,
                           questions=args.questions, task=args.task, seed=args.seed)
    print(json.dumps(load_lume(out).summary(), indent=2))
    print(f"wrote LUME-format data to {out}"
          + ("" if args.nonmember else " (no --nonmember: no mia/, so no MIA score)"))


def cmd_check(args) -> None:
    found = check_data(args.dir, args.split, mia=args.mia, mmlu=args.mmlu)
    absent = found.pop("absent")
    print(json.dumps(found, indent=2))
    if absent:
        print(f"note: no rows for {', '.join(absent)}; the task aggregate is the harmonic mean "
              f"of the other terms")


def cmd_target(args) -> None:
    record = build_target(args.data, args.out, preset=args.preset, init=args.init,
                          pretrain=args.pretrain, mmlu=args.mmlu, mia=args.mia, seed=args.seed,
                          split=args.split, oracle=args.oracle, **key_values(args.settings))
    print(json.dumps(record["memorisation"], indent=2))
    print(f"target written to {args.out} ({record['parameters']:,} parameters, "
          f"{record['train_seconds']:.0f} s of training)")


def cmd_eval(args) -> None:
    from .evaluation.scoring import evaluate
    from .evaluation.table import results_table
    results = evaluate(args.model, args.data, args.out, mia=args.mia, mmlu=args.mmlu,
                       max_new_tokens=args.max_new_tokens, dtype=args.dtype, audit=args.audit,
                       samples=args.samples, before=args.before, resume=args.resume,
                       seed=args.seed, split=args.split, reference=args.reference,
                       general=args.general)
    print(results_table(results))
    print(f"results and report.html written to {args.out}")
    _say_if_damaged(args.model, results.get("general_text"))


def _say_if_damaged(model: str, general: dict | None) -> None:
    """The command's last line when the model's general text is flagged (``general_text``)."""
    if general and general["damaged"]:
        print(damage_note(model, general["never_seen_nll"], general["reference_never_seen_nll"]))


def cmd_run(args) -> None:
    from .engine import memory_plan, run
    print(memory_plan(args.method, args.model, config=args.config, profile=args.profile,
                      **key_values(args.settings)).table(), flush=True)
    if args.plan:
        return
    record = run(args.method, args.model, args.data, args.out, config=args.config,
                 seed=args.seed, eval_every=args.eval_every, profile=args.profile, mia=args.mia,
                 mmlu=args.mmlu, split=args.split, **key_values(args.settings))
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
                    split=args.split, dtype=args.dtype, answers=args.answers)
    print(f"traced {record['facts_used']} facts ({record['facts_skipped']} skipped: not "
          f"answered right at top-1) in {record['seconds']:.0f} s")
    print(f"layers chosen: {record['layers_chosen']} ({record['rule']})")
    print(f"trace.json and heatmaps written to {args.out}")


def cmd_audit(args) -> None:
    from .evaluation.receipt import audit
    config = RelearnConfig(steps=args.relearn_steps, lr=args.relearn_lr,
                           share=args.relearn_share, mode=args.relearn_mode)
    receipt = audit(args.model, args.original, args.data, args.mia, args.out,
                    oracle=args.oracle, split=args.split, seed=args.seed, samples=args.samples,
                    max_new_tokens=args.max_new_tokens, relearn_config=config,
                    evaluation=args.evaluation, reference=args.reference, dtype=args.dtype,
                    never_seen=args.never_seen)
    s, test = receipt["summary"], receipt["test"]
    print(f"{s['documents']} forget documents: {s['forgotten']} forgotten, {s['partly']} "
          f"partly, {s['remembered']} remembered ({s['over_unlearned']} over-unlearned)")
    print(f"judged against {test['judge'] or 'the never-seen documents alone (no judge model)'}:"
          f" a document never seen is called remembered with probability "
          f"{100 * test['false_positive_rate']:.1f}% (the rank rule over never-seen documents: "
          + ", ".join(f"{name} {n['never_seen_documents']}" for name, n in test["nulls"].items()
                      if n["forget_documents"]) + ")")
    asked = ", ".join(f"{name} {b['answered_documents']}/{b['asked_documents']}"
                      for name, b in receipt["never_seen"].items() if b["asked_documents"])
    if asked:
        print(f"counting the questions a model answers without the document (never-seen "
              f"documents with one answered: {asked}): at most "
              f"{100 * test['false_positive_bound']:.1f}%")
    for name, after in s["relearned"].items():
        print(f"relearned {name}: knowledge {after['knowledge']}, "
              f"regurgitation {after['regurgitation']}")
    print(f"robust: {s['relearn_robust']}; receipt.json and receipt.html written to {args.out}")
    _say_if_damaged(args.model, receipt["general_text"])


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
    print("\n".join(board["damaged"]))


def cmd_demo(args) -> None:
    from .demo import demo
    demo(args.out, preset=args.preset, seed=args.seed)


def _add_beside_data(parser, what: dict[str, str]) -> None:
    """``--NAME`` options for the directories a dataset may carry (``DATA/mia`` ...)."""
    for name, text in what.items():
        parser.add_argument(f"--{name}", type=_optional_dir, default="auto", metavar="DIR",
                            help=f"{text}; 'auto': DATA/{name} when present, 'none': skip it")


def _add_data(sub) -> None:
    """``unlearn data synth|import|check``."""
    data = _command(sub, "data", "create, import or check LUME-format data").add_subparsers(
        dest="data_command", required=True)
    s = _command(data, "synth", "write the synthetic LUME-style benchmark",
                 synth_module.__doc__)
    s.add_argument("--out", required=True, help="directory to write")
    s.add_argument("--seed", type=int, default=0, help="seed of every name, fact and split")
    s.add_argument("--docs-per-task", type=int, default=40,
                   help="documents per task, half forget and half retain")
    s.set_defaults(func=cmd_synth)
    i = _command(data, "import", "make LUME-format data from your own documents",
                 importing.__doc__)
    for name, what in (("forget", "the documents to remove"),
                       ("retain", "documents the model must keep knowing")):
        i.add_argument(f"--{name}", required=True, metavar="PATH",
                       help=f"{what}: a .jsonl file (a 'text' field; optional 'id', 'task') or "
                            f"a folder of .txt files (one document each)")
    i.add_argument("--nonmember", metavar="PATH", help="documents the model never saw, same "
                   "formats: they make mia/ (the MIA score, the audit's never-seen band)")
    i.add_argument("--questions", metavar="JSONL", help="lines of {\"id\": DOCUMENT_ID, "
                   "\"question\": ..., \"answer\": ...}: the documents' qa rows")
    i.add_argument("--task", default=CUSTOM_TASK,
                   help="task label of documents whose record names none")
    i.add_argument("--seed", type=int, default=0, help="which forget documents are MIA members")
    i.add_argument("--out", required=True, help="the LUME data directory to write")
    i.set_defaults(func=cmd_import)
    c = _command(data, "check", "validate a LUME data directory and count its rows")
    c.add_argument("dir", help="the LUME data directory")
    c.add_argument("--split", choices=("train", "validation"),
                   help="the data split, where DIR holds several (the official parquet snapshot)")
    _add_beside_data(c, {"mia": "MIA directory to check too",
                         "mmlu": "MMLU-format directory to check too"})
    c.set_defaults(func=cmd_check)


def _add_target(sub) -> None:
    """``unlearn target``: build a memorising model."""
    t = _command(sub, "target", "train a model that has memorised a LUME dataset",
                 "Train a target: the preset (or --init, a local HF causal LM) pretrained on "
                 "the general corpus, then fine-tuned until it has memorised the forget and "
                 "retain rows, as the task organisers fine-tuned OLMo.")
    _add_data_args(t)
    t.add_argument("--out", required=True, help="model directory to write")
    t.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="architecture and recipe of a target trained from scratch")
    t.add_argument("--init", metavar="HF_DIR",
                   help="fine-tune this local HF causal LM instead of training from scratch")
    t.add_argument("--oracle", action="store_true",
                   help="learn the retain rows only: the model that never saw the forget set "
                        "(with --init, exact retraining from the model you fine-tuned from)")
    _add_beside_data(t, {"pretrain": "general corpus to pretrain on first",
                         "mmlu": "MMLU-format general-knowledge questions to learn",
                         "mia": "MIA set to measure (never trained on)"})
    t.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    t.add_argument("settings", nargs="*", metavar="key=value",
                   help="override preset fields, e.g. epochs=80 lr=1e-3")
    t.set_defaults(func=cmd_target)


def _add_eval(sub) -> None:
    """``unlearn eval``: the official LUME scores."""
    e = _command(sub, "eval", "score a model as SemEval-2025 Task 4 did (LUME)",
                 "Score a model the LUME way: regurgitation and knowledge per task and split, "
                 "their harmonic mean, the loss-MIA score, MMLU and the final score; writes "
                 "results.json, the official CSVs, generations.jsonl and report.html.")
    e.add_argument("--model", required=True, help="HF model directory (only read)")
    _add_data_args(e)
    _add_beside_data(e, {"mia": "MIA directory (member.jsonl, nonmember.jsonl)",
                         "mmlu": "MMLU-format directory of CSVs"})
    e.add_argument("--out", required=True, help="directory to write")
    e.add_argument("--max-new-tokens", type=int, default=256,
                   help="longest generation per row, as the official scorer")
    _add_dtype(e, "(as the official scorer)")
    e.add_argument("--audit", action="store_true",
                   help="leak audit: four MIAs on the forget documents, PII extraction")
    e.add_argument("--samples", type=int, default=PII_SAMPLES,
                   help="PII samples per prompt (audit)")
    e.add_argument("--before", metavar="EVAL_DIR", help="evaluation directory of the model "
                   "before unlearning, drawn for comparison in report.html")
    e.add_argument("--resume", action="store_true",
                   help="reuse the generations of an interrupted run with the same --out")
    e.add_argument("--seed", type=int, default=0, help="PII sampling (audit)")
    e.add_argument("--reference", type=_optional_dir, default="auto", metavar="MODEL",
                   help="the model whose reading of the never-seen (MIA non-member) documents "
                        "the utility u is measured against: the oracle when you have one; "
                        "'auto': the model `unlearn run` started from; 'none': no utility")
    e.add_argument("--general", metavar="TEXTS", help="never-seen text of your own for the "
                   "utility u, in place of the MIA non-members: a .jsonl file with a 'text' "
                   "field, or a folder of .txt files")
    e.set_defaults(func=cmd_eval)


def _add_run(sub) -> None:
    """``unlearn run``: one method on one model."""
    r = _command(sub, "run", "unlearn the forget set from a model",
                 "Unlearn the forget set of DATA from MODEL with one method; the result is a "
                 "new model directory (MODEL is only read).")
    r.epilog = _methods_epilog()
    r.add_argument("--method", required=True, choices=sorted(METHODS),
                   help="the method (below)")
    r.add_argument("--model", required=True, help="HF model directory (only read)")
    _add_data_args(r)
    r.add_argument("--out", required=True, help="model directory to write")
    r.add_argument("--config", help="JSON, TOML or YAML file of method settings")
    r.add_argument("--profile", choices=["auto", "paper", "small"], default="auto",
                   help="defaults: the paper's, or adjusted for small from-scratch targets "
                        "(auto: small when the model's target.json says from_scratch)")
    r.add_argument("--eval-every", type=int, default=0, metavar="EPOCHS",
                   help="score forget/retain every this many epochs into run.json; 0: never")
    _add_beside_data(r, {"mia": "MIA set whose held-out split calibrates the choice of the "
                                "model kept (select=score)",
                         "mmlu": "MMLU-format questions the selection estimate asks"})
    r.add_argument("--seed", type=int, default=0, help="data order, sampling and selection split")
    r.add_argument("--plan", action="store_true",
                   help="print the memory plan per device (weights, gradients, optimizer, "
                        "references, activations) and stop; every run prints it first and "
                        "refuses one that cannot fit, naming the settings that would")
    r.add_argument("settings", nargs="*", metavar="key=value",
                   help="override method settings, e.g. lr=1e-4 lora=true layers=last:2")
    r.set_defaults(func=cmd_run)


def _add_dtype(parser, why: str = "") -> None:
    parser.add_argument("--dtype", choices=list(INFERENCE_DTYPES), default="auto",
                        help=f"what the model computes in; auto: bf16 on a GPU {why}, fp32 on "
                             f"a CPU")


def _add_locate(sub) -> None:
    """``unlearn locate``: causal tracing."""
    lo = _command(sub, "locate", "causal tracing: which layers carry the Task2 facts",
                  "Causal tracing (Meng et al. 2022) of the Task2 facts: the indirect effect of "
                  "each layer's MLP, attention and residual stream; writes trace.json, the "
                  "heatmaps and the layers chosen (SHA256's layers=auto reads them).")
    lo.add_argument("--model", required=True, help="HF model directory (only read)")
    _add_data_args(lo)
    lo.add_argument("--out", required=True, help="directory to write")
    lo.add_argument("--samples", type=int, default=10, help="noise samples per fact")
    lo.add_argument("--window", type=int, default=10, help="layers restored together (MLP/attn)")
    lo.add_argument("--share", type=float, default=0.6,
                    help="share of the MLP effect the chosen block of layers must hold")
    lo.add_argument("--max-facts", type=int, help="trace at most this many facts (all: none)")
    lo.add_argument("--seed", type=int, default=0, help="the noise")
    lo.add_argument("--answers", choices=ANSWERS, default="expected",
                    help="expected: trace the facts the model answers right, on their answers; "
                         "predicted: every fact, on the model's own top-1 token (ROME's default)")
    _add_dtype(lo)
    lo.set_defaults(func=cmd_locate)


def _add_audit(sub) -> None:
    """``unlearn audit``: a receipt per forget document and the relearning attack."""
    a = _command(sub, "audit", "a verdict per forget document and a relearning attack",
                 "A receipt per forget document (forgotten, partly, remembered: the README's "
                 "rule) and a targeted relearning attack on the unlearned model, the original "
                 "and the oracle; writes receipt.json and receipt.html.")
    a.add_argument("--model", required=True, help="the unlearned model (only read)")
    a.add_argument("--original", required=True, help="the model before unlearning (only read)")
    _add_data_args(a)
    a.add_argument("--mia", required=True, help="MIA directory: its non-members are the "
                   "never-seen documents a forget document is judged against where --never-seen "
                   "has none of its task, and the text the general-text utility reads")
    a.add_argument("--out", required=True, help="directory to write")
    a.add_argument("--oracle", help="a model never trained on the forget set: the relearning "
                   "attack on it is what robust is judged against")
    a.add_argument("--reference", type=_optional_dir, default="auto", metavar="MODEL",
                   help="the judge when there is no --oracle: a model that never saw the "
                        "documents (the one --original was fine-tuned from); each document's "
                        "loss is read less the judge's. 'auto': the base of a target unlearn "
                        "built; 'none': the loss alone")
    a.add_argument("--never-seen", type=_optional_dir, default="auto", metavar="DIR",
                   help="a LUME-format dataset of the forget documents' tasks that no model saw "
                        "(a held-out split): each forget document is read against the ones of "
                        "its own task. 'auto': DATA/never_seen when there is one; 'none': the "
                        "--mia non-members alone")
    a.add_argument("--seed", type=int, default=0, help="PII sampling and the attack's split")
    a.add_argument("--samples", type=int, default=PII_SAMPLES, help="PII samples per prompt")
    a.add_argument("--evaluation", metavar="EVAL_DIR", help="an `unlearn eval --audit` output "
                   "of --model (same data, seed and samples): its PII findings are reused")
    a.add_argument("--max-new-tokens", type=int, default=256, help="longest generation per row")
    defaults = RelearnConfig()
    a.add_argument("--relearn-steps", type=int, default=defaults.steps,
                   help="the attacker's fine-tuning steps")
    a.add_argument("--relearn-lr", type=float, default=defaults.lr,
                   help="the attacker's learning rate")
    a.add_argument("--relearn-share", type=float, default=defaults.share,
                   help="share of the forget documents the attacker fine-tunes on")
    a.add_argument("--relearn-mode", choices=ATTACK_MODES, default=defaults.mode,
                   help="the attacker trains every weight (full) or LoRA adapters (lora); "
                        "auto: full where the memory plan fits it, else lora")
    _add_dtype(a)
    a.set_defaults(func=cmd_audit)


def _add_bench(sub) -> None:
    """``unlearn bench``: methods against the oracle."""
    b = _command(sub, "bench", "compare methods on one target against the oracle",
                 "Compare methods the LUME way. Unless --target is given it trains three "
                 "models first: a base (the preset pretrained on the general corpus), the "
                 "target (the base memorising forget and retain rows) and the oracle (the base "
                 "memorising the retain rows only: the model every method approximates). Then "
                 "every method unlearns the target and every model is scored and audited; "
                 "writes leaderboard.{md,csv,json} and report.html.")
    _add_data_args(b)
    _add_beside_data(b, {"pretrain": "general corpus for the base",
                         "mmlu": "MMLU-format general-knowledge questions",
                         "mia": "MIA set: runs calibrate on a split, models are scored on the "
                                "rest"})
    b.add_argument("--methods", default="sugd,sha256,gd,npo",
                   help="comma list; label:method runs a variant with settings label.key=value")
    b.add_argument("--out", required=True, help="directory to write (extended in place)")
    b.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="the base, target and oracle built (unused with --target)")
    b.add_argument("--seeds", type=int, default=1,
                   help="seeds 0..N-1, each its own models; the leaderboard gives mean and std")
    b.add_argument("--target", metavar="MODEL", help="a model directory to unlearn (e.g. your "
                   "checkpoint) instead of one built from DATA")
    b.add_argument("--oracle", metavar="MODEL", help="with --target: the model never trained "
                   "on the forget set, every final score set against it")
    b.add_argument("--trace", metavar="LOCATE_DIR",
                   help="an `unlearn locate` output: its heatmaps go in the report")
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
    d = _command(sub, "demo", "the main job on the embedded synthetic benchmark",
                 "unlearn bench on the synthetic benchmark with SUGD and SHA256, sized for "
                 "a 2-core laptop (about 15 minutes); a second run reuses every finished stage.")
    d.add_argument("--out", default="runs/demo", help="directory to write (data, models, "
                   "leaderboard, report)")
    d.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="the models built")
    d.add_argument("--seed", type=int, default=0, help="the synthetic data")
    d.set_defaults(func=cmd_demo)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unlearn", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"unlearn {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_data, _add_target, _add_eval, _add_run, _add_locate, _add_audit,
                _add_bench, _add_demo):
        add(sub)
    return p


def _rank() -> int:
    """This process's rank under `accelerate launch`/torchrun (0 when run alone)."""
    return int(os.environ.get("RANK", "0"))


MAX_LINE, MAX_LINES = 300, 25  # an error message's size, whatever the input put in it


def _message(error: BaseException) -> str:
    """An error's text as shown: each line cut to a readable length, and at most a screenful
    of lines (a hostile input may hold megabytes that the message repeats)."""
    lines = str(error).splitlines() or [type(error).__name__]
    shown = [line if len(line) <= MAX_LINE else line[:MAX_LINE - 3] + "..."
             for line in lines[:MAX_LINES]]
    if len(lines) > MAX_LINES:
        shown.append(f"... and {len(lines) - MAX_LINES} more lines")
    return "\n".join(shown)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if _rank() != 0:  # one process reports; the others work silently beside it
        sys.stdout = open(os.devnull, "w")
    try:
        checkpoint_minutes()  # a bad value is refused before any command starts
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
        print(f"unlearn {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2
    finally:
        release_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
