"""``unlearn audit``: a receipt per forget document, and the relearning attack.

A deletion request is answered document by document. For each forget document (an sc row and
its qa rows are one document) the receipt gives its loss before and after unlearning, where
that loss falls among documents the model never saw, what it still regurgitates or answers, the
PII it still emits under sampling, and a verdict.

**The test.** A document's loss alone says little: a story and a Wikipedia page of equal
novelty have different losses. So a document is judged by its loss under the audited model
*relative to a judge that never saw it* (a reference-model membership test: Carlini et al.
2022, "Membership Inference Attacks From First Principles"; Mireshghallah et al. 2022): its
score is NLL_model − NLL_judge, and never-seen documents, scored the same way under both
models, are the null distribution: those of the document's own task where the audit has some
(``never_seen``), else the MIA non-members (:mod:`unlearn.evaluation.nulls`). The judge is the
oracle when given (unless it is the audited model itself), else ``reference`` (default: the
model the original was fine-tuned from, ``target.json``'s base), else none: the score is then
the loss itself.

* ``remembered``: its score lies below the null's k-th lowest, k chosen so that a document
  never seen has at most a 5% chance to fall there (k / (n + 1) for n never-seen documents: the
  false-positive rate every receipt states, with the judge it used; ``nulls.band_rank``), or a
  question is still answered exactly (the model is asked the never-seen documents' questions
  too, and the share it answers bounds what this adds: ``false_positive_bound``), or a PII
  value still comes out;
* ``forgotten``: its score lies within the null's central 90%, its continuation is regurgitated
  no more than the 95th percentile of never-seen documents' continuations, and nothing is
  answered or leaked;
* ``partly``: anything else: continuation still regurgitated, or *over-unlearned* (score above
  the 95th percentile, flagged: a document pushed far above unseen text gives membership away).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np

from ..data import beside_data, load_lume, load_mia
from ..data.lume import LumeData
from ..io import AUDIT, EVAL, atomic_directory, claim_output, is_output, path_text, write_json
from ..measure.memory import plan_inference, settle_allocator, token_lengths
from ..measure.nll import document_nll
from ..measure.utility import general_text
from ..models.loading import (
    best_device,
    check_model_dirs,
    check_oracle,
    inference_dtype,
    load_model,
    load_tokenizer,
    model_fingerprint,
    same_weights,
    teacher_of,
)
from ..plan import GIB, HEADROOM, MemoryPlan, MemoryPlanError, plan_attack
from ..settings import check_seed
from .audit import PII_SAMPLES, forgotten_people, pii_extraction, pii_sampled_tokens
from .nulls import (
    GENERAL,
    HIGH,
    LOW,
    ForgetDocument,
    Questions,
    by_group,
    flat,
    forget_documents,
    halves,
    never_seen_band,
    never_seen_groups,
    null_of,
    row_scores,
    stated_test,
)
from .receipt_page import write_receipt_page
from .relearn import RelearnConfig, attacked_lengths, relearn


def percentile_of(value: float, reference: np.ndarray) -> float:
    """Where ``value`` falls among ``reference``, 0-100 (ties count half)."""
    below, equal = np.sum(reference < value), np.sum(reference == value)
    return float(100.0 * (below + 0.5 * equal) / len(reference))


def verdict(doc: dict, band: dict) -> str:
    if doc["score"] < band["score_low"] or doc["questions_answered"] > 0 or doc["pii_leaked"]:
        return "remembered"
    if (doc["score"] <= band["score_high"]
            and (doc["regurgitation"] or 0.0) <= band["regurgitation_high"]):
        return "forgotten"
    return "partly"


def measure_documents(model, tokenizer, docs: list[ForgetDocument], bands: dict[str, dict],
                      leaked: dict[str, list[str]], max_new_tokens: int,
                      judged: list[float] | None, before: list[float]) -> list[dict]:
    """Each document's entry of the receipt, measured on ``model`` and read against its
    group's band in ``bands`` (:func:`nulls.null_of`); ``judged`` holds each document's loss
    under the judge (None: no judge, the score is the loss), ``before`` its loss under the
    original."""
    losses = document_nll(model, tokenizer, [d.text for d in docs], desc="forget documents")
    scored = row_scores(model, tokenizer, [d.rows for d in docs], max_new_tokens, "forget rows")
    entries = []
    for i, (d, loss, scores) in enumerate(zip(docs, losses, scored)):
        sc = [s for r, s in zip(d.rows, scores) if r.kind == "sc"]
        qa = [r for r in d.rows if r.kind == "qa"]
        hits = [r.id for r, s in zip(d.rows, scores) if r.kind == "qa" and s]
        score = loss - judged[i] if judged is not None else loss
        null = null_of(d, bands)
        band = bands[null]
        entry = {"id": d.id, "task": d.task, "null": null, "loss_before": before[i],
                 "loss_after": loss,
                 "loss_judge": judged[i] if judged is not None else None, "score": score,
                 "score_percentile": percentile_of(score, band["scores"]),
                 "regurgitation": max(sc) if sc else None,
                 "questions": len(qa), "questions_answered": len(hits), "answered": hits,
                 "pii_leaked": leaked.get(d.id, [])}
        entry["verdict"] = verdict(entry, band)
        entry["over_unlearned"] = score > band["score_high"]
        entries.append(entry)
    return entries


def judge_of(model, original, oracle, reference) -> Path | None:
    """The model a document's loss is set against: one that never saw the forget documents and
    is not the audited model. The oracle, else ``reference`` ("auto": the base ``original`` was
    fine-tuned from, when unlearn built it; None: none)."""
    found = teacher_of(original, reference or "none")
    for candidate in (oracle, found):
        if candidate is not None and not (_same(candidate, model)
                                          or same_weights(candidate, model)):
            return Path(candidate)
    return None


def audit(model: str | Path, original: str | Path, data: str | Path, mia: str | Path,
          out: str | Path, oracle: str | Path | None = None, split: str | None = None,
          seed: int = 0, samples: int = PII_SAMPLES, max_new_tokens: int = 256,
          relearn_config: RelearnConfig | None = None, attacks: dict | None = None,
          evaluation: str | Path | None = None, allow_unchanged: bool = False,
          reference: str | Path | None = "auto", dtype: str = "auto",
          never_seen: str | Path | None = "auto") -> dict:
    """Write ``out/receipt.json`` and ``out/receipt.html`` for the unlearned ``model``: a
    verdict per forget document of ``data`` (rule: module docstring and README), with its loss
    under ``original`` (the model before unlearning) beside it; then the relearning attack
    (:mod:`unlearn.evaluation.relearn`, budget ``relearn_config``) on ``model``, ``original``
    and, when given, ``oracle``. Every model directory is only read. Returns the receipt.

    A document is read against the never-seen documents of its own task in ``never_seen`` (a
    LUME-format dataset of the same tasks that no model saw; "auto": the folder
    ``data/never_seen`` when there is one, as the synthetic benchmark writes), else against the
    MIA set ``mia``'s non-members (:mod:`unlearn.evaluation.nulls`).

    Work already done is not redone: ``attacks`` holds attacks already run with this budget and
    seed, by role (``original``, ``oracle``, ``unlearned``), as ``unlearn bench`` runs them
    once for all its methods; a model given in two roles is attacked once; ``evaluation`` (an
    ``unlearn eval --audit`` output of ``model`` on ``data`` with this seed and ``samples``)
    gives the PII findings instead of sampling them again.

    A receipt certifies a change, so ``model`` and ``oracle`` must differ from ``original``
    (a copy of it counts as it). ``allow_unchanged=True`` lets ``model`` be ``original``:
    ``unlearn bench`` audits its target so, beside the methods, and shows a method that kept
    the untouched model as such. Every model directory, the data and the seed are checked
    before any work. ``reference`` is the judge without an oracle or when the oracle is
    ``model`` (module docstring; "auto": the base ``original`` was fine-tuned from; None:
    none). Models compute in ``dtype``; the attack's mode and the memory plan:
    :func:`audit_plan`."""
    started = time.perf_counter()
    check_seed(seed)
    _check_roles(model, original, oracle, allow_unchanged)
    config, compute = relearn_config or RelearnConfig(), inference_dtype(dtype)
    lume, never_seen = load_lume(data, split), beside_data(data, never_seen, "never_seen")
    docs = forget_documents(lume.forget)
    groups, questions = never_seen_groups([d.document for d in load_mia(mia).nonmember],
                                          never_seen, split, lume.rows, docs)
    mode, plan = audit_plan(original, lume, flat(groups), config, compute, max_new_tokens,
                            samples, seed)
    claim_output(out, AUDIT, {"--model": model, "--original": original, "--data": data,
                              "--mia": mia, "--oracle": oracle, "--evaluation": evaluation,
                              "--never-seen": never_seen})
    # an evaluation made otherwise is refused before minutes of work, not after
    evaluated = evaluation and _evaluated_pii(evaluation, model, data, split, seed, samples)
    attack = partial(relearn, forget=lume.forget, config=config, seed=seed,
                     max_new_tokens=max_new_tokens, mode=mode)
    judge = judge_of(model, original, oracle, reference)  # a bad --reference: refused now
    roles = {"model": model, "original": original, "oracle": oracle, "judge": judge}
    read = _read_models(roles, partial(load_model, dtype=compute, device=best_device()), docs,
                        (groups, questions), lume, evaluated, dict(attacks or {}), attack,
                        max_new_tokens, samples, seed)
    is_robust = robust(read["attacks"], config.margin)
    test = stated_test(path_text(judge), read["bands"], read["entries"])
    receipt = {"model": str(model), "original": str(original), "oracle": path_text(oracle),
               **made_of(model, original, oracle, data, split, mia, seed, config, never_seen),
               "samples": samples, "max_new_tokens": max_new_tokens,
               "pii_from": path_text(evaluation), "dtype": str(compute),
               "attack": {"mode": mode, "memory_plan": plan.as_record()},
               "never_seen": {name: {k: v for k, v in band.items() if k not in ("losses", "scores")}
                              for name, band in read["bands"].items()},
               "test": test, "general_text": read["general"], "documents": read["entries"],
               "relearn": {**read["attacks"], "robust": is_robust},
               "summary": summary(read["entries"], read["attacks"], is_robust, test,
                                  read["general"])}
    receipt["seconds"] = time.perf_counter() - started
    with atomic_directory(out, AUDIT) as staging:
        write_json(staging / "receipt.json", receipt)
        write_receipt_page(staging / "receipt.html", receipt,
                           {name: band["scores"].tolist() for name, band in read["bands"].items()})
    return receipt


def _read_models(roles: dict, load, docs: list[ForgetDocument],
                 nulls: tuple[dict[str, list[str]], Questions], lume: LumeData,
                 evaluated: dict | None, attacks: dict, attack, max_new_tokens: int,
                 samples: int, seed: int) -> dict:
    """Every measurement of the receipt, each model loaded once (measured, then attacked):
    the forget documents' losses before, the judge's losses, each never-seen group's band on
    the model (``nulls``: the groups' texts and questions), the entry of every document, the
    attacks and the general-text utility."""
    model, original, oracle, judge = (roles[r] for r in ("model", "original", "oracle", "judge"))
    groups, questions = nulls
    before, reference_nll = _original_side(load(original), docs, groups[GENERAL], not oracle,
                                           attacks, attack)
    judged = judge and _judge_side(load(judge), _same(judge, oracle), docs, groups, attacks,
                                   attack)
    lm, tokenizer = load(model)
    read_against = {null_of(d, groups) for d in docs}
    bands = {name: never_seen_band(lm, tokenizer, texts, max_new_tokens,
                                   judged and judged[1][name], name, name in read_against,
                                   questions.get(name))
             for name, texts in groups.items()}
    leaked = (evaluated or pii_extraction(lm, tokenizer, forgotten_people(lume.rows), samples,
                                          seed=seed))["leaked_by_person"]
    entries = measure_documents(lm, tokenizer, docs, bands, leaked, max_new_tokens,
                                judged and judged[0], before)
    twin = next((r for r in ("original", "oracle") if r in attacks and _same(roles[r], model)),
                None)
    if "unlearned" not in attacks:
        attacks["unlearned"] = attacks[twin] if twin else attack(lm, tokenizer)
    del lm
    mine = bands[GENERAL]["losses"].tolist()
    if oracle:  # the oracle's reading: the judge's, else the model is the oracle (its own)
        reference_nll = judged[1][GENERAL] if _same(judge, oracle) else mine
        attacks.setdefault("oracle", attacks["unlearned"])
    return {"bands": bands, "entries": entries,
            "general": general_text(mine, reference_nll, str(oracle or original)),
            "attacks": {k: attacks[k] for k in ("unlearned", "oracle", "original")
                        if k in attacks}}


def audit_plan(original, lume: LumeData, unseen: list[str], config: RelearnConfig, dtype,
               max_new_tokens: int, samples: int, seed: int) -> tuple[str, MemoryPlan]:
    """The attack's mode and the audit's memory plan, made before any weight loads from the
    data's token lengths (``original``'s tokenizer only): the attack on the rows it trains on
    (mode ``config.mode``, or under auto full fine-tuning where it fits the device, else
    LoRA), or the largest of the measurements (scoring every document, generation from every
    prompt, PII sampling). Refused, before any work, where the mode chosen cannot fit;
    printed."""
    tokenizer = load_tokenizer(original)
    docs, forget = forget_documents(lume.forget), lume.forget
    reading = plan_inference(
        original, dtype, max_new_tokens=max_new_tokens,
        prompts=token_lengths(tokenizer, [r.input for r in forget] + halves(unseen)[0]),
        scored=token_lengths(tokenizer, [d.text for d in docs] + unseen),
        sampled=pii_sampled_tokens(tokenizer, lume.rows, samples))
    longest = max(attacked_lengths(tokenizer, forget, config, seed))
    for mode in ("full", "lora") if config.mode == "auto" else (config.mode,):
        training = replace(config.training(mode, dtype), max_len=longest)
        plan = plan_attack(original, training, dtype, reading)
        if plan.fits:
            print(f"relearning attack: {mode} fine-tuning; {plan.table()}")
            settle_allocator(plan)
            return mode, plan
    raise MemoryPlanError(f"the relearning attack ({mode}) needs about {plan.peak / GIB:.1f} GiB"
                          f", more than {HEADROOM:.0%} of the {plan.available / GIB:.1f} GiB "
                          f"{plan.device} has: give --dtype bf16, --relearn-mode lora or a "
                          f"device with more memory\n{plan.table()}")


def _original_side(loaded, docs: list[ForgetDocument], unseen: list[str], general: bool,
                   attacks: dict, attack) -> tuple[list[float], list[float] | None]:
    """The forget documents' NLL under the model before unlearning (``loaded``: it and its
    tokenizer), its NLL of the never-seen documents when ``general`` text is set against it
    (no oracle), and its attack."""
    source, tokenizer = loaded
    before = document_nll(source, tokenizer, [d.text for d in docs], desc="before")
    reference = document_nll(source, tokenizer, unseen, desc="never seen") if general else None
    if "original" not in attacks:
        attacks["original"] = attack(source, tokenizer)
    return before, reference


def _judge_side(loaded, is_oracle: bool, docs: list[ForgetDocument],
                groups: dict[str, list[str]], attacks: dict, attack) -> tuple[list, dict]:
    """The judge's NLL of each forget document and of each group's never-seen documents
    (``loaded``: the judge and its tokenizer); a judge that is the oracle is attacked in the
    same load, unless it was already."""
    lm, tokenizer = loaded
    unseen = document_nll(lm, tokenizer, flat(groups), desc="never seen (judge)")
    judged = (document_nll(lm, tokenizer, [d.text for d in docs], desc="forget (judge)"),
              by_group(unseen, groups))
    if is_oracle and "oracle" not in attacks:
        attacks["oracle"] = attack(lm, tokenizer)
    return judged


def _check_roles(model, original, oracle, allow_unchanged: bool) -> None:
    """Every model directory loads, and none stands in for ``original`` where a receipt needs
    another model (read before any of them is loaded: an attack takes minutes)."""
    check_model_dirs(model, original, oracle)
    check_oracle(oracle, original, "--original")
    if not allow_unchanged and same_weights(model, original):
        raise ValueError(f"--model {model} holds the same weights as --original {original}: "
                         f"it was never unlearned, and a receipt would certify nothing; give "
                         f"the model `unlearn run` wrote")


def made_of(model, original, oracle, data, split, mia, seed: int, config: RelearnConfig,
            never_seen: Path | None) -> dict:
    """What a receipt was made of: the three models' files, the data, the never-seen documents
    (the MIA set's and ``never_seen``), the seed and the rule. A receipt made of the same is
    the same receipt."""
    return {"files": {role: model_fingerprint(path) for role, path in
                      (("model", model), ("original", original), ("oracle", oracle)) if path},
            "data": str(data), "split": split, "mia": str(mia),
            "never_seen_data": path_text(never_seen), "seed": seed,
            "rule": {"band_percentiles": [LOW, HIGH], "judge": "oracle, else the base",
                     "relearn": asdict(config)}}


def _same(a, b) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def _evaluated_pii(evaluation, model, data, split, seed: int, samples: int) -> dict:
    """The PII findings of an ``unlearn eval --audit`` output, once it is shown to have
    sampled this very model, data, seed and sample count."""
    evaluation = Path(evaluation)
    if not is_output(evaluation, EVAL):
        raise ValueError(f"{evaluation} is not an `unlearn eval` output: give the directory "
                         f"an `unlearn eval --audit` wrote, or leave the evaluation out")
    made = json.loads((evaluation / EVAL.record).read_text())
    wanted = {"model_files": model_fingerprint(model), "data_dir": str(data), "split": split,
              "audit": True, "seed": seed, "samples": samples}
    differ = [k for k, v in wanted.items() if made.get(k) != v]
    if differ:
        raise ValueError(f"{evaluation} did not audit this model the same way ({', '.join(differ)}"
                         f" differ): run `unlearn eval --audit` again or leave it out")
    return json.loads((evaluation / "results.json").read_text())["audit"]["pii"]


def robust(attacks: dict, margin: float) -> bool | None:
    """Whether the unlearned model relearns no more than the oracle does (+ ``margin``), on
    knowledge and regurgitation alike; None without an oracle to compare with."""
    if "oracle" not in attacks:
        return None
    mine, oracle = attacks["unlearned"]["after"], attacks["oracle"]["after"]
    return all(mine[k] is None or oracle[k] is None or mine[k] <= oracle[k] + margin
               for k in ("knowledge", "regurgitation"))


def summary(entries: list[dict], attacks: dict, is_robust: bool | None, test: dict,
            general: dict) -> dict:
    """Counts per verdict, overall and per task; the share forgotten; the relearn figures; the
    judge and its false-positive rate; the general-text utility."""
    verdicts = ("forgotten", "partly", "remembered")
    by_task: dict[str, dict[str, int]] = {}
    for e in entries:
        by_task.setdefault(e["task"], dict.fromkeys(verdicts, 0))[e["verdict"]] += 1
    counts = {v: sum(e["verdict"] == v for e in entries) for v in verdicts}
    return {"documents": len(entries), **counts,
            "forgotten_share": counts["forgotten"] / len(entries) if entries else None,
            "remembered_share": counts["remembered"] / len(entries) if entries else None,
            "over_unlearned": sum(e["over_unlearned"] for e in entries),
            "by_task": dict(sorted(by_task.items())),
            "relearned": {name: a["after"] for name, a in attacks.items()},
            "relearn_robust": is_robust, "judge": test["judge"],
            "false_positive_rate": test["false_positive_rate"],
            "false_positive_bound": test["false_positive_bound"], "utility": general["utility"],
            "general_text_damaged": general["damaged"]}
