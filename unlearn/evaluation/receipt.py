"""``unlearn audit``: a receipt per forget document, and the relearning attack.

A deletion request is answered document by document. For each forget document (an sc row and
its qa rows are one document) the receipt gives its loss before and after unlearning, where
that loss falls among documents the model never saw, what it still regurgitates or answers, the
PII it still emits under sampling, and a verdict.

**The test.** A document's loss alone says little: a story and a Wikipedia page of equal
novelty have different losses. So a document is judged by its loss under the audited model
*relative to a judge that never saw it* (a reference-model membership test: Carlini et al.
2022, "Membership Inference Attacks From First Principles"; Mireshghallah et al. 2022): its
score is NLL_model − NLL_judge, and the never-seen documents (the MIA non-members), scored the
same way under both models, are the null distribution. The judge is the oracle when given
(unless it is the audited model itself), else ``reference`` (default: the model the original
was fine-tuned from, ``target.json``'s base), else none: the score is then the loss itself,
judged against never-seen text of whatever kind the MIA set holds.

* ``remembered``: its score lies below the null's k-th lowest, k chosen so that a document
  never seen has at most a 5% chance to fall there (k / (n + 1) for n never-seen documents: the
  false-positive rate every receipt states, with the judge it used; :func:`band_rank`), or a
  question is still answered exactly, or a PII value still comes out;
* ``forgotten``: its score lies within the null's central 90%, its continuation is regurgitated
  no more than the 95th percentile of never-seen documents' continuations, and nothing is
  answered or leaked;
* ``partly``: anything else: continuation still regurgitated, or *over-unlearned* (score above
  the 95th percentile, flagged: a document pushed far above unseen text gives membership away).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from ..data import load_lume, load_mia
from ..data.lume import LumeData, Row
from ..io import AUDIT, EVAL, atomic_directory, claim_output, is_output, path_text, write_json
from ..measure.generation import greedy_generate
from ..measure.memory import plan_inference, settle_allocator, token_lengths
from ..measure.metrics import knowledge, regurgitation
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
from .receipt_page import write_receipt_page
from .relearn import RelearnConfig, attacked_lengths, relearn

LOW, HIGH = 5.0, 95.0  # the never-seen documents' central band, in percentiles


@dataclass(frozen=True)
class ForgetDocument:
    id: str
    task: str
    rows: tuple[Row, ...]

    @property
    def text(self) -> str:
        """The whole document: its sc rows' text (its qa rows' when it has none)."""
        sc = [r.text for r in self.rows if r.kind == "sc"]
        return " ".join(sc or [r.text for r in self.rows])


def forget_documents(forget: list[Row]) -> list[ForgetDocument]:
    groups: dict[str, list[Row]] = {}
    for r in forget:
        groups.setdefault(r.doc_id, []).append(r)
    return [ForgetDocument(doc, rows[0].task, tuple(rows)) for doc, rows in groups.items()]


def percentile_of(value: float, reference: np.ndarray) -> float:
    """Where ``value`` falls among ``reference``, 0-100 (ties count half)."""
    below, equal = np.sum(reference < value), np.sum(reference == value)
    return float(100.0 * (below + 0.5 * equal) / len(reference))


def halves(documents: list[str]) -> tuple[list[str], list[str]]:
    """Each document's first half of words (a prompt) and its second (what it continues with)."""
    words = [d.split() for d in documents]
    return ([" ".join(w[:len(w) // 2]) for w in words],
            [" ".join(w[len(w) // 2:]) for w in words])


def never_seen_band(model, tokenizer, documents: list[str], max_new_tokens: int,
                    judged: list[float] | None = None) -> dict:
    """The never-seen documents' losses on ``model`` and their scores (the loss less the
    judge's loss ``judged`` of each, or the loss itself without a judge): the null
    distribution a forget document's score is read against. Beside it, how much of a
    never-seen document's second half the model writes from the first (ROUGE-L recall): what
    "not known" looks like for this very model."""
    losses = np.array(document_nll(model, tokenizer, documents, desc="never seen"))
    scores = losses - np.array(judged) if judged is not None else losses
    prompts, expected = halves(documents)
    written = greedy_generate(model, tokenizer, prompts, max_new_tokens, desc="never seen")
    recall = [regurgitation(e, g.text) for e, g in zip(expected, written)]
    ranked, k = np.sort(scores), band_rank(len(scores))
    return {"count": len(documents), "losses": losses, "scores": scores,
            "score_low": float(ranked[k - 1]), "score_high": float(ranked[-k]),
            "false_positive_rate": k / (len(scores) + 1),
            "regurgitation_high": float(np.percentile(recall, HIGH))}


def band_rank(n: int) -> int:
    """The rank k of the low threshold among ``n`` never-seen scores: a document is called
    remembered below the k-th lowest. A document that was never seen either is exchangeable with
    those ``n``, so its rank among the n + 1 is uniform and it falls below with probability
    exactly k / (n + 1) (the conformal bound): the largest k keeping that within LOW %, at least
    1 (then the rate is 1 / (n + 1), above LOW % under 19 documents, and the receipt says so)."""
    return max(1, int(LOW / 100 * (n + 1)))


def verdict(doc: dict, band: dict) -> str:
    if doc["score"] < band["score_low"] or doc["questions_answered"] > 0 or doc["pii_leaked"]:
        return "remembered"
    if (doc["score"] <= band["score_high"]
            and (doc["regurgitation"] or 0.0) <= band["regurgitation_high"]):
        return "forgotten"
    return "partly"


def measure_documents(model, tokenizer, docs: list[ForgetDocument], band: dict,
                      leaked: dict[str, list[str]], max_new_tokens: int,
                      judged: list[float] | None, before: list[float]) -> list[dict]:
    """Each document's entry of the receipt, measured on ``model``; ``judged`` holds each
    document's loss under the judge (None: no judge, the score is the loss), ``before`` its
    loss under the original."""
    losses = document_nll(model, tokenizer, [d.text for d in docs], desc="forget documents")
    rows = [r for d in docs for r in d.rows]
    written = greedy_generate(model, tokenizer, [r.input for r in rows], max_new_tokens,
                              answers=[r.output if r.kind == "qa" else None for r in rows],
                              desc="forget rows")
    by_row = {r.id: g.text for r, g in zip(rows, written)}
    entries = []
    for i, (d, loss) in enumerate(zip(docs, losses)):
        sc = [regurgitation(r.output, by_row[r.id]) for r in d.rows if r.kind == "sc"]
        qa = [r for r in d.rows if r.kind == "qa"]
        answered = [r.id for r in qa if knowledge(r.output, by_row[r.id])]
        score = loss - judged[i] if judged is not None else loss
        entry = {"id": d.id, "task": d.task, "loss_before": before[i], "loss_after": loss,
                 "loss_judge": judged[i] if judged is not None else None, "score": score,
                 "score_percentile": percentile_of(score, band["scores"]),
                 "regurgitation": max(sc) if sc else None,
                 "questions": len(qa), "questions_answered": len(answered),
                 "answered": answered, "pii_leaked": leaked.get(d.id, [])}
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
          reference: str | Path | None = "auto", dtype: str = "auto") -> dict:
    """Write ``out/receipt.json`` and ``out/receipt.html`` for the unlearned ``model``: a
    verdict per forget document of ``data`` (rule: module docstring and README), judged against
    the never-seen documents of the MIA set ``mia``, with its loss under ``original`` (the model
    before unlearning) beside it; then the relearning attack (:mod:`unlearn.evaluation.relearn`,
    budget ``relearn_config``) on ``model``, ``original`` and, when given, ``oracle``. Every
    model directory is only read. Returns the receipt.

    Work already done is not redone: ``attacks`` holds attacks already run with this budget and
    seed, by role (``original``, ``oracle``, ``unlearned``), as ``unlearn bench`` runs them
    once for all its methods; a model given in two roles is attacked once; ``evaluation`` (an
    ``unlearn eval --audit`` output of ``model`` on ``data`` with this seed and ``samples``)
    gives the PII findings instead of sampling them again.

    A receipt certifies a change, so ``model`` and ``oracle`` must differ from ``original``
    (a copy of it counts as it). ``allow_unchanged=True`` lets ``model`` be ``original``:
    ``unlearn bench`` audits its target so, beside the methods, and shows a method that kept
    the untouched model as such. Every model directory and the seed are checked before any
    work. ``reference`` is the judge without an oracle or when the oracle is ``model`` (module
    docstring; "auto": the base ``original`` was fine-tuned from; None: none). Models compute in
    ``dtype``; the attack's mode and the memory plan: :func:`audit_plan`."""
    started = time.perf_counter()
    check_seed(seed)
    _check_roles(model, original, oracle, allow_unchanged)
    config, compute = relearn_config or RelearnConfig(), inference_dtype(dtype)
    lume, unseen = load_lume(data, split), [d.document for d in load_mia(mia).nonmember]
    mode, plan = audit_plan(original, lume, unseen, config, compute, max_new_tokens, samples,
                            seed)
    claim_output(out, AUDIT, {"--model": model, "--original": original, "--data": data,
                              "--mia": mia, "--oracle": oracle, "--evaluation": evaluation})
    docs = forget_documents(lume.forget)
    # an evaluation made otherwise is refused before minutes of work, not after
    evaluated = evaluation and _evaluated_pii(evaluation, model, data, split, seed, samples)
    attacks = dict(attacks or {})
    attack = partial(relearn, forget=lume.forget, config=config, seed=seed,
                     max_new_tokens=max_new_tokens, mode=mode)
    load = partial(load_model, dtype=compute, device=best_device())
    judge = judge_of(model, original, oracle, reference)  # a bad --reference: refused now
    # each model is loaded once: measured, then attacked
    before, reference_nll = _original_side(load(original), docs, unseen, not oracle,
                                           attacks, attack)
    judged = judge and _judge_side(load(judge), _same(judge, oracle), docs, unseen, attacks,
                                   attack)
    lm, tokenizer = load(model)
    band = never_seen_band(lm, tokenizer, unseen, max_new_tokens, judged and judged[1])
    leaked = (evaluated or pii_extraction(lm, tokenizer, forgotten_people(lume.rows), samples,
                                          seed=seed))["leaked_by_person"]
    entries = measure_documents(lm, tokenizer, docs, band, leaked, max_new_tokens,
                                judged and judged[0], before)
    roles = {"original": original, "oracle": oracle}
    twin = next((r for r, p in roles.items() if r in attacks and _same(p, model)), None)
    if "unlearned" not in attacks:
        attacks["unlearned"] = attacks[twin] if twin else attack(lm, tokenizer)
    del lm
    if oracle:  # the oracle's reading: the judge's, else the model is the oracle (its own)
        reference_nll = judged[1] if _same(judge, oracle) else band["losses"].tolist()
        attacks.setdefault("oracle", attacks["unlearned"])
    general = general_text(band["losses"].tolist(), reference_nll, str(oracle or original))
    attacks = {k: attacks[k] for k in ("unlearned", "oracle", "original") if k in attacks}
    is_robust = robust(attacks, config.margin)
    test = _test(judge, band)
    receipt = {"model": str(model), "original": str(original), "oracle": path_text(oracle),
               **made_of(model, original, oracle, data, split, mia, seed, config),
               "samples": samples, "max_new_tokens": max_new_tokens,
               "pii_from": path_text(evaluation), "dtype": str(compute),
               "attack": {"mode": mode, "memory_plan": plan.as_record()},
               "never_seen": {k: v for k, v in band.items() if k not in ("losses", "scores")},
               "test": test, "general_text": general, "documents": entries,
               "relearn": {**attacks, "robust": is_robust},
               "summary": summary(entries, attacks, is_robust, test, general)}
    receipt["seconds"] = time.perf_counter() - started
    with atomic_directory(out, AUDIT) as staging:
        write_json(staging / "receipt.json", receipt)
        write_receipt_page(staging / "receipt.html", receipt, band["scores"].tolist())
    return receipt


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


def _judge_side(loaded, is_oracle: bool, docs: list[ForgetDocument], unseen: list[str],
                attacks: dict, attack) -> tuple[list, list]:
    """The judge's NLL of each forget document and each never-seen document (``loaded``: the
    judge and its tokenizer); a judge that is the oracle is attacked in the same load, unless
    it was already."""
    lm, tokenizer = loaded
    judged = (document_nll(lm, tokenizer, [d.text for d in docs], desc="forget (judge)"),
              document_nll(lm, tokenizer, unseen, desc="never seen (judge)"))
    if is_oracle and "oracle" not in attacks:
        attacks["oracle"] = attack(lm, tokenizer)
    return judged


def _test(judge: Path | None, band: dict) -> dict:
    """What a verdict means: the statistic, the judge, and the share of never-seen documents
    the rule calls remembered (nominally at most LOW %)."""
    return {"statistic": "NLL(model) - NLL(judge)" if judge else "NLL(model)",
            "judge": path_text(judge), "remembered_below_percentile": LOW,
            "false_positive_rate": band["false_positive_rate"],
            "never_seen_documents": band["count"]}


def _check_roles(model, original, oracle, allow_unchanged: bool) -> None:
    """Every model directory loads, and none stands in for ``original`` where a receipt needs
    another model (read before any of them is loaded: an attack takes minutes)."""
    check_model_dirs(model, original, oracle)
    check_oracle(oracle, original, "--original")
    if not allow_unchanged and same_weights(model, original):
        raise ValueError(f"--model {model} holds the same weights as --original {original}: "
                         f"it was never unlearned, and a receipt would certify nothing; give "
                         f"the model `unlearn run` wrote")


def made_of(model, original, oracle, data, split, mia, seed: int, config: RelearnConfig) -> dict:
    """What a receipt was made of: the three models' files, the data, the never-seen documents,
    the seed and the rule. A receipt made of the same is the same receipt."""
    return {"files": {role: model_fingerprint(path) for role, path in
                      (("model", model), ("original", original), ("oracle", oracle)) if path},
            "data": str(data), "split": split, "mia": str(mia), "seed": seed,
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
            "false_positive_rate": test["false_positive_rate"], "utility": general["utility"],
            "general_text_damaged": general["damaged"]}
