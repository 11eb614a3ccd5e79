"""``unlearn eval``: score a model directory the LUME way and write the official files, the
lossless generations and the report (the numbers themselves: :mod:`unlearn.measure.official`)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import fmean

import pandas as pd

from ..accel import process_state
from ..data import beside_data, load_lume, load_mia, load_mmlu
from ..data.importing import read_source
from ..io import (
    EVAL,
    atomic_directory,
    claim_output,
    fingerprint,
    path_text,
    reset_staging,
    write_json,
)
from ..measure.memory import MemoryPlan, plan_inference, require_inference_fit, token_lengths
from ..measure.mmlu import MMLU_ROWS, MMLU_TOKENS
from ..measure.nll import document_nll
from ..measure.official import RowResult, Scores, score_model
from ..measure.utility import general_text
from ..models.loading import (
    ModelError,
    best_device,
    check_model_dir,
    inference_dtype,
    load_model,
    load_tokenizer,
    model_fingerprint,
)
from ..settings import check_seed
from .audit import PII_SAMPLES, pii_sampled_tokens
from .audit import audit as run_audit
from .report import write_report

MMLU_CUTOFF = 0.371  # the task's 7B floor: 75% of the original model's MMLU
CSV_COLUMNS = ["id", "task", "input", "expected_output", "model_output", "nll"]


def write_rows_csv(path: Path, results: list[RowResult]) -> None:
    """The official file format. Every string is quoted, so a lone carriage return or a quote in
    a generation survives a round trip through ``pd.read_csv``."""
    frame = pd.DataFrame([{c: getattr(r, c) for c in CSV_COLUMNS} for r in results],
                         columns=CSV_COLUMNS)
    frame.to_csv(path, index=False, quoting=csv.QUOTE_NONNUMERIC)


def read_rows_csv(path: Path) -> pd.DataFrame:
    """Read a file written by :func:`write_rows_csv` back unchanged (empty strings stay empty)."""
    return pd.read_csv(path, keep_default_na=False, dtype={c: str for c in CSV_COLUMNS[:5]})


def evaluate(model: str | Path, data: str | Path, out: str | Path | None = None,
             mia: str | Path | None = "auto", mmlu: str | Path | None = "auto",
             max_new_tokens: int = 256, dtype: str = "auto", audit: bool = False,
             samples: int = PII_SAMPLES, before: str | Path | None = None, resume: bool = False,
             seed: int = 0, split: str | None = None,
             reference: str | Path | None = "auto", general: str | Path | None = None) -> dict:
    """Score a model directory on a LUME dataset as SemEval-2025 Task 4 did.

    Writes, when ``out`` is given: ``results.json`` (the official keys plus ``final-score``),
    ``forget_0.csv``/``retain_0.csv`` and ``mia_results/{member,nonmember}_0.csv`` in the
    official formats, ``generations.jsonl`` (the lossless record of every row),
    ``report.html`` and ``eval.json`` (what was scored: model, data, settings). ``audit`` adds
    the leak audit (:mod:`unlearn.evaluation.audit`; ``samples`` completions per PII prompt,
    seeded by ``seed``); ``before`` names the evaluation directory of the model before
    unlearning, drawn for comparison in the report. ``dtype``: ``auto`` is bf16 on a GPU (as
    the official scorer) and fp32 on a CPU. Generations are saved as they finish; ``resume``
    reuses those an interrupted run with the same ``out`` made of the same model, data and
    ``max_new_tokens``. ``split`` chooses one data split where ``data`` holds several (the
    official parquet snapshot): ``train`` or ``validation``. ``mia`` (an MIA directory) and
    ``mmlu`` (MMLU-format questions) default to ``data/mia`` and ``data/mmlu`` when present;
    None skips them. ``results.json`` adds ``never_seen_nll``, the model's mean NLL of text it
    never saw: the documents of ``general`` (a ``.jsonl`` file with a ``text`` field or a folder
    of ``.txt`` files: a corpus of the user's own) when given, else the MIA non-members; and,
    against ``reference`` (a model directory; "auto": the model ``unlearn run`` started from,
    named in ``run.json``; None: none), ``general_text``: the utility u and its flag
    (:mod:`unlearn.measure.utility`). Returns the results dict.
    """
    check_seed(seed)
    check_model_dir(model)
    reference = reference_model(model, reference)
    mia, mmlu = beside_data(data, mia, "mia"), beside_data(data, mmlu, "mmlu")
    inputs = {"--model": model, "--data": data, "--mia": mia, "--mmlu": mmlu, "--before": before,
              "--reference": reference, "--general": general}
    if out is not None:  # checked before any work, claimed once the plan fits
        claim_output(out, EVAL, inputs, lock=False)
    compute_dtype = inference_dtype(dtype)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    lume = load_lume(data, split)
    mia_docs, questions = (load_mia(mia) if mia else None), (load_mmlu(mmlu) if mmlu else None)
    never_seen, previous = NeverSeen.of(general, mia_docs), before and _read_results(before)
    plan = memory_plan(model, lume, mia_docs, questions, max_new_tokens, compute_dtype,
                       reference, samples if audit else 0)
    if out is not None:
        claim_output(out, EVAL, inputs)
    lm, tokenizer = load_model(model, dtype=compute_dtype, device=best_device())
    made_by = {"model": str(model), "model_files": model_fingerprint(model),
               "data": fingerprint([(r.id, r.input, r.output, r.task, r.split)
                                    for r in lume.rows]),
               "max_new_tokens": max_new_tokens, "dtype": str(compute_dtype)}
    state = process_state()  # under `accelerate launch`: the rows shared out, one writer
    if out is None or not state.is_main_process:
        # the leak audit (no collective step) is the writer's alone
        scores = _score(lm, tokenizer, lume, mia_docs, questions, max_new_tokens,
                        audit and state.is_main_process, samples, seed, None, "")[0]
        if state.is_main_process:
            _measure_general_text(scores, lm, model, tokenizer, reference, never_seen)
        state.wait_for_everyone()  # until the main process has written the outputs
        return scores.results
    with atomic_directory(out, EVAL, resumable=True) as staging:
        if not resume:
            reset_staging(staging)
        # resuming keeps one process's generations: with several, each reruns its share
        partial = staging / "generations.partial.jsonl" if state.num_processes == 1 else None
        scores, found = _score(lm, tokenizer, lume, mia_docs, questions, max_new_tokens, audit,
                               samples, seed, partial, fingerprint(made_by))
        if partial is not None:
            partial.unlink()
        _measure_general_text(scores, lm, model, tokenizer, reference, never_seen)
        _write_outputs(staging, scores, found, mia_docs, previous, str(model))
        write_json(staging / "eval.json", {**made_by, "data_dir": str(data), "split": split,
                                           "mia": path_text(mia), "mmlu": path_text(mmlu),
                                           "audit": audit, "samples": samples,
                                           "seed": seed, "reference": path_text(reference),
                                           "general": path_text(general),
                                           "reference_files": reference and
                                           model_fingerprint(reference),
                                           "memory_plan": plan.as_record()})
    state.wait_for_everyone()
    return scores.results


def memory_plan(model, lume, mia_docs, questions, max_new_tokens: int, dtype,
                reference=None, samples: int = 0) -> MemoryPlan:
    """What :func:`evaluate` holds at its peak, planned before any weight loads from the data's
    token lengths (the model's tokenizer only): generation from every row's prompt, scoring of
    every row and MIA document, MMLU's batches, the leak audit's sampling (``samples`` per PII
    prompt; 0: no audit), and the reference model read beside it. Refuses a plan that cannot
    fit; the main process prints it."""
    tokenizer = load_tokenizer(model)
    rows = lume.rows
    documents = [d.document for d in mia_docs.member + mia_docs.nonmember] if mia_docs else []
    beside = reference if reference and Path(reference).resolve() != Path(model).resolve() else None
    plan = plan_inference(model, dtype, prompts=token_lengths(tokenizer, (r.input for r in rows)),
                          max_new_tokens=max_new_tokens,
                          scored=token_lengths(tokenizer, [r.input + r.output for r in rows]
                                               + documents),
                          forward=MMLU_TOKENS if questions else 0,
                          last_logits=MMLU_ROWS if questions else 0,
                          sampled=pii_sampled_tokens(tokenizer, rows, samples), reference=beside)
    require_inference_fit(plan, "unlearn eval")
    if process_state().is_main_process:
        print(plan.table())
    return plan


def _score(lm, tokenizer, lume, mia_docs, questions, max_new_tokens, audit, samples, seed,
           partial, key):
    """Scores (and the leak audit's findings, when asked) of a loaded model."""
    scores = score_model(lm, tokenizer, lume, mia_docs, questions, max_new_tokens, partial, key)
    results, found = scores.results, None
    if audit:
        found = run_audit(lm, tokenizer, lume, mia_docs, samples=samples, seed=seed)
        results["audit"] = {"mia": {"auc": found["mia"]["auc"]}} if "mia" in found else {}
        results["audit"]["pii"] = found["pii"]
    if "mmlu_average" in results and results["mmlu_average"] < MMLU_CUTOFF:
        print(f"warning: MMLU {results['mmlu_average']:.3f} is below the task's cut-off "
              f"{MMLU_CUTOFF}")
    return scores, found


def reference_model(model: str | Path, reference: str | Path | None) -> Path | None:
    """The model whose reading of never-seen text ``model``'s is set against: ``reference``
    itself (checked), None for none, and for "auto" the model ``unlearn run`` unlearned
    (``run.json``'s ``model``) when that directory is still there."""
    if reference is None:
        return None
    if reference != "auto":
        return check_model_dir(reference)
    record = Path(model) / "run.json"
    source = Path(json.loads(record.read_text())["model"]) if record.is_file() else None
    return source if source is not None and (source / "config.json").is_file() else None


@dataclass(frozen=True)
class NeverSeen:
    """The text the utility reads: a corpus of the user's own (``general``), else the MIA
    non-members, whose losses the MIA has already measured."""

    texts: list[str]
    source: str  # the corpus's path, or "mia non-members"

    @classmethod
    def of(cls, general: str | Path | None, mia_docs) -> NeverSeen | None:
        if general is not None:
            return cls([d.text for d in read_source(general, "general", "general")],
                       str(general))
        if mia_docs is not None and mia_docs.nonmember:
            return cls([d.document for d in mia_docs.nonmember], MIA_NON_MEMBERS)
        return None


MIA_NON_MEMBERS = "mia non-members"


def _measure_general_text(scores: Scores, lm, model, tokenizer, reference: Path | None,
                          never_seen: NeverSeen | None) -> None:
    """``never_seen_nll`` in the results and, against ``reference``, ``general_text``: the
    never-seen documents' NLL under the reference beside the model's. Per-token losses compare
    only under one tokenizer, so a reference reading other tokens is refused."""
    if never_seen is None:
        return
    if never_seen.source == MIA_NON_MEMBERS and scores.mia_nll is not None:
        mine = scores.mia_nll["nonmember"]
    else:
        mine = document_nll(lm, tokenizer, never_seen.texts, desc="general text")
    scores.results["never_seen_nll"] = fmean(mine)
    if reference is None:
        return
    if Path(reference).resolve() == Path(model).resolve():
        theirs = mine
    else:
        ref_lm, its_tokenizer = load_model(reference, dtype=next(lm.parameters()).dtype,
                                           device=best_device())
        if its_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ModelError(f"{reference}: reads other tokens than {model}, so their per-token "
                             f"losses do not compare; give the model {model} was made from")
        theirs = document_nll(ref_lm, its_tokenizer, never_seen.texts, desc="reference")
        del ref_lm
    scores.results["general_text"] = {**general_text(mine, theirs, str(reference)),
                                      "text": never_seen.source}


def _write_outputs(directory: Path, scores: Scores, found, mia_docs, previous,
                   title: str) -> None:
    """The official files, the lossless generations and the report. ``results.json`` comes
    before the report, so a report that fails to draw loses no score."""
    write_rows_csv(directory / "forget_0.csv", [r for r in scores.rows if r.split == "forget"])
    write_rows_csv(directory / "retain_0.csv", [r for r in scores.rows if r.split == "retain"])
    with open(directory / "generations.jsonl", "w", encoding="utf-8") as f:
        for r in scores.rows:
            f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
    if scores.mia_nll is not None:
        (directory / "mia_results").mkdir(exist_ok=True)
        docs = {"member": mia_docs.member, "nonmember": mia_docs.nonmember}
        for name, values in scores.mia_nll.items():
            pd.DataFrame({"id": [d.id for d in docs[name]], "nll": values}).to_csv(
                directory / "mia_results" / f"{name}_0.csv", index=False)
    write_json(directory / "results.json", scores.results)
    write_report(directory / "report.html", scores.results, scores.mia_nll, found, previous,
                 title=f"unlearn evaluation: {title}")


def _read_results(directory: str | Path) -> dict:
    path = Path(directory) / "results.json"
    if not path.is_file():
        raise ValueError(f"{path}: not found; --before takes the output directory of an earlier "
                         f"evaluation (of the model before unlearning)")
    return json.loads(path.read_text())
