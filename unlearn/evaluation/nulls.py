"""The never-seen documents a receipt reads each forget document against: its null distribution.

A document's score (its loss under the audited model, less a judge's) means something only
beside the scores of documents no model saw, scored the same way. Those documents should be
of the document's own kind: a judge that never saw a forget story has still read the retain
set's stories, so it reads any story more easily than a Wikipedia page, and a story scored
against pages is called remembered more often than the rate the receipt states. So a forget
document is read against the never-seen documents of its own task where the audit is given
some (``--never-seen``: a LUME-format dataset of the same tasks that no model saw, such as a
held-out split); a task without them is read against the MIA non-members (``general``).

Each group's threshold is its k-th lowest score (:func:`band_rank`); a receipt states each
group's false-positive rate and, over its forget documents, the rate it expects overall. A
question answered also makes a document remembered, and some answers can be guessed (an award
name from the retain set's biographies): so the model is asked the never-seen documents'
questions too, and the share of those documents with one answered, added to the rank rule's
rate, bounds what the whole rule calls a document no model saw (``false_positive_bound``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import DataError, load_lume
from ..data.lume import Row
from ..measure.generation import greedy_generate
from ..measure.memorisation import score_rows
from ..measure.metrics import regurgitation
from ..measure.nll import document_nll

LOW, HIGH = 5.0, 95.0  # a never-seen group's central band, in percentiles
GENERAL = "general"  # the group of the MIA non-members: text of any kind the models never saw


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


def forget_documents(rows: list[Row]) -> list[ForgetDocument]:
    """``rows`` grouped into documents (an sc row and its qa rows are one)."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.doc_id, []).append(r)
    return [ForgetDocument(doc, rows[0].task, tuple(rows)) for doc, rows in groups.items()]


Questions = dict[str, list[tuple[Row, ...]]]  # by group: each never-seen document's qa rows


def never_seen_groups(general: list[str], never_seen: Path | None, split: str | None,
                      data_rows: list[Row], docs: list[ForgetDocument]
                      ) -> tuple[dict[str, list[str]], Questions]:
    """The never-seen texts by group: ``general`` (the MIA non-members) and, from the LUME
    dataset ``never_seen`` (every document in it, forget or retain alike), those of each task
    the forget documents ``docs`` have; beside them, the questions of each task's never-seen
    documents (the MIA non-members have none). Refused where one of its documents is in the
    data (``data_rows``) or where none of its tasks is a forget document's."""
    groups, questions = {GENERAL: general}, {}
    if never_seen is None:
        return groups, questions
    held = forget_documents(load_lume(never_seen, split).rows)
    data_docs = forget_documents(data_rows)
    seen = {d.id for d in data_docs} | {d.text for d in data_docs}
    clash = [d.id for d in held if d.id in seen or d.text in seen]
    if clash:
        raise DataError([f"{never_seen}: document {clash[0]!r} ({len(clash)} in all) is also in "
                         f"the data: never-seen documents must be ones no model trained on; "
                         f"remove them or give another --never-seen"])
    tasks = sorted({d.task for d in docs})
    for task in tasks:
        own = [d for d in held if d.task == task]
        if own:
            groups[task] = [d.text for d in own]
            asked = [tuple(r for r in d.rows if r.kind == "qa") for d in own]
            questions[task] = [q for q in asked if q]
    if len(groups) == 1:
        found = ", ".join(sorted({d.task for d in held}))
        raise DataError([f"{never_seen}: none of its tasks ({found}) is a task of the forget "
                         f"documents ({', '.join(tasks)}): give never-seen documents labelled "
                         f"with the forget documents' tasks"])
    return groups, questions


def null_of(doc: ForgetDocument, groups: dict) -> str:
    """The group ``doc`` is read against: its task's, else the general one."""
    return doc.task if doc.task in groups and doc.task != GENERAL else GENERAL


def flat(groups: dict[str, list[str]]) -> list[str]:
    return [text for texts in groups.values() for text in texts]


def by_group(values: list[float], groups: dict[str, list[str]]) -> dict[str, list[float]]:
    """``values`` (one per text of :func:`flat`) cut back into ``groups``."""
    out, start = {}, 0
    for name, texts in groups.items():
        out[name], start = values[start:start + len(texts)], start + len(texts)
    return out


def halves(documents: list[str]) -> tuple[list[str], list[str]]:
    """Each document's first half of words (a prompt) and its second (what it continues with)."""
    words = [d.split() for d in documents]
    return ([" ".join(w[:len(w) // 2]) for w in words],
            [" ".join(w[len(w) // 2:]) for w in words])


def row_scores(model, tokenizer, docs: list[tuple[Row, ...]], max_new_tokens: int,
               desc: str) -> list[list[float]]:
    """Each document's rows scored the official way (:func:`score_rows`), in one pass."""
    rows = [r for d in docs for r in d]
    scores, out, start = score_rows(model, tokenizer, rows, max_new_tokens, desc), [], 0
    for d in docs:
        out.append(scores[start:start + len(d)])
        start += len(d)
    return out


def band_rank(n: int) -> int:
    """The rank k of the low threshold among ``n`` never-seen scores: a document is called
    remembered below the k-th lowest. A document that was never seen either is exchangeable with
    those ``n``, so its rank among the n + 1 is uniform and it falls below with probability
    exactly k / (n + 1) (the conformal bound): the largest k keeping that within LOW %, at least
    1 (then the rate is 1 / (n + 1), above LOW % under 19 documents, and the receipt says so)."""
    return max(1, int(LOW / 100 * (n + 1)))


def never_seen_band(model, tokenizer, documents: list[str], max_new_tokens: int,
                    judged: list[float] | None = None, name: str = GENERAL,
                    read_against: bool = True,
                    questions: list[tuple[Row, ...]] | None = None) -> dict:
    """One group's never-seen documents: their losses on ``model`` and their scores (the loss
    less the judge's loss ``judged`` of each, or the loss itself without a judge), the null
    distribution a forget document's score is read against. Beside it, where forget documents
    are ``read_against`` it (a group none is read against needs no more), what "not
    known" looks like for this very model: how much of a never-seen document's second half it
    writes from the first (ROUGE-L recall), and the share of the documents with ``questions``
    (each document's qa rows) of which it answers one."""
    desc = f"never seen ({name})"
    losses = np.array(document_nll(model, tokenizer, documents, desc=desc))
    scores = losses - np.array(judged) if judged is not None else losses
    ranked, k = np.sort(scores), band_rank(len(scores))
    band = {"count": len(documents), "losses": losses, "scores": scores,
            "score_low": float(ranked[k - 1]), "score_high": float(ranked[-k]),
            "false_positive_rate": k / (len(scores) + 1), "regurgitation_high": None,
            "asked_documents": 0, "answered_documents": 0, "answered_share": None}
    if not read_against:
        return band
    prompts, expected = halves(documents)
    written = greedy_generate(model, tokenizer, prompts, max_new_tokens, desc=desc)
    recall = [regurgitation(e, g.text) for e, g in zip(expected, written)]
    band["regurgitation_high"] = float(np.percentile(recall, HIGH))
    if questions:
        hits = sum(any(q) for q in row_scores(model, tokenizer, questions, max_new_tokens,
                                              f"{desc}: questions"))
        band.update(asked_documents=len(questions), answered_documents=hits,
                    answered_share=hits / len(questions))
    return band


def stated_test(judge: str | None, bands: dict[str, dict], entries: list[dict]) -> dict:
    """What a verdict means: the statistic, the judge, each group's never-seen documents, the
    share of them its rank rule calls remembered (nominally at most LOW %) and that share plus
    the share of them with a question answered (a bound on the whole rule's), and over the
    receipt what a model that never saw any forget document would be called: each group's
    rates, weighted by the forget documents read against it."""
    nulls = {name: {"never_seen_documents": band["count"],
                    "false_positive_rate": band["false_positive_rate"],
                    "answered_share": band["answered_share"],
                    "false_positive_bound": min(1.0, band["false_positive_rate"]
                                                + (band["answered_share"] or 0.0)),
                    "forget_documents": sum(e["null"] == name for e in entries)}
             for name, band in bands.items()}
    used = [n for n in nulls.values() if n["forget_documents"]]
    if not used:  # no forget document: the general group's rates
        used = [{**nulls[GENERAL], "forget_documents": 1}]
    weight = sum(n["forget_documents"] for n in used)

    def weighted(key: str) -> float:
        return sum(n[key] * n["forget_documents"] for n in used) / weight

    return {"statistic": "NLL(model) - NLL(judge)" if judge else "NLL(model)",
            "judge": judge, "remembered_below_percentile": LOW,
            "false_positive_rate": weighted("false_positive_rate"),
            "false_positive_bound": weighted("false_positive_bound"),
            "never_seen_documents": sum(n["never_seen_documents"] for n in used), "nulls": nulls}
