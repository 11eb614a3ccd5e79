"""``unlearn data import``: plain documents in, a LUME-format directory out.

A deletion request names documents, not LUME rows. Each document given (a line of a ``.jsonl``
file with a ``text`` field, or one ``.txt`` file of a folder) becomes one sentence-completion
row: the first half of its words is the prompt, the rest the continuation the model should no
longer write (LUME's sc rows are documents cut the same way). Questions tied to a document id
become its qa rows. Every document carries a task label: its record's ``task`` field, else the
one given for all (``custom``); the score is then over the tasks and terms that exist.

Written to ``OUT``::

    forget.jsonl, retain.jsonl   the rows, ids ``DOCsc1`` and ``DOCqaN`` (LUME's convention)
    mia/member.jsonl             a seeded sample of forget documents, as many as there are
                                 never-seen ones (all of them when fewer)
    mia/nonmember.jsonl          the never-seen documents (``--nonmember``), when given
    never_seen/                  the same as LUME rows with their tasks (forget.jsonl and
                                 retain.jsonl, alternately): what a receipt reads each forget
                                 document of the same task against (``unlearn audit``)
    import.json                  what was read, and the counts
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..io import IMPORT, atomic_directory, claim_output, write_json
from ..settings import check_seed
from .lume import DataError, Document, MiaData, read_records, read_text, row_kind

CUSTOM_TASK = "custom"


@dataclass(frozen=True)
class SourceDocument:
    id: str
    text: str
    task: str
    where: str  # file and line (or file), for error messages


def read_source(path: str | Path, role: str, task: str) -> list[SourceDocument]:
    """The documents of a ``.jsonl`` file (``text``; optional ``id`` and ``task``) or of a
    folder of ``.txt`` files (id: the file name without ``.txt``); raises DataError."""
    path = Path(path)
    if path.is_dir():
        entries = sorted(path.iterdir())
        files = [e for e in entries if e.is_file() and e.suffix == ".txt"]
        skipped = [e for e in entries if e not in files]
        if skipped:  # a document dropped in silence would stay in the model
            raise DataError([f"{e}: {'a folder' if e.is_dir() else 'not a .txt file'} in the "
                             f"{role} folder, which holds only .txt documents; move it out, or "
                             f"give it as .txt" for e in skipped])
        found = [SourceDocument(f.stem, read_text(f).strip(), task, str(f)) for f in files]
        if not files:
            raise DataError([f"{path}: no .txt files; a folder given as {role} documents holds "
                             f"one document per .txt file"])
    elif path.is_file() and path.suffix == ".jsonl":
        found, problems = [], []
        for line, record in read_records(path):
            where = f"{path}:{line}"
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                problems.append(f"{where}: expected a JSON object with a string 'text' field "
                                f"(optional 'id', 'task')")
                continue
            fields = {k: record.get(k) for k in ("id", "task")}
            if any(v is not None and not isinstance(v, str) for v in fields.values()):
                problems.append(f"{where}: 'id' and 'task' must be strings")
                continue
            found.append(SourceDocument(fields["id"] or f"{role}{line}", record["text"].strip(),
                                        fields["task"] or task, where))
        if problems:
            raise DataError(problems)
    else:
        raise DataError([f"{path}: not found, or neither a .jsonl file nor a folder of .txt "
                         f"files; give the {role} documents as one of those"])
    if not found:
        raise DataError([f"{path}: no documents; the {role} set must not be empty"])
    return found


def _check(documents: dict[str, list[SourceDocument]]) -> None:
    """One DataError listing every empty document, every id used twice, every text given in two
    roles and every id that would not survive the LUME id convention."""
    problems, ids, texts = [], {}, {}
    for role, docs in documents.items():
        for d in docs:
            if len(d.text.split()) < 2:
                problems.append(f"{d.where}: a document needs at least two words (a prompt and "
                                f"a continuation)")
            if d.id in ids:
                problems.append(f"{d.where}: id {d.id!r} is used again (first at "
                                f"{ids[d.id]}); give every document its own id")
            if d.text in texts and texts[d.text][0] != role:
                problems.append(f"{d.where}: the same text is a {texts[d.text][0]} document "
                                f"({texts[d.text][1]}); a document is in one set only")
            if row_kind(f"{d.id}sc1") != ("sc", d.id):
                problems.append(f"{d.where}: id {d.id!r} cannot carry a row suffix; use "
                                f"letters, digits, '_' or '-'")
            ids.setdefault(d.id, d.where)
            texts.setdefault(d.text, (role, d.where))
    if problems:
        raise DataError(problems)


def sc_row(doc: SourceDocument, split: str) -> dict:
    """The document as a sentence-completion row: its first half of words, then the rest (cut
    before the middle word; the text keeps its own spacing and line breaks)."""
    starts = [m.start() for m in re.finditer(r"\S+", doc.text)]
    cut = starts[len(starts) // 2]
    return {"id": f"{doc.id}sc1", "input": doc.text[:cut].rstrip(), "output": doc.text[cut:],
            "task": doc.task, "split": split}


def question_rows(path: str | Path, documents: dict[str, tuple[SourceDocument, str]]) -> list[dict]:
    """qa rows from a ``.jsonl`` of ``id`` (a forget or retain document's), ``question`` and
    ``answer``, numbered per document in file order; raises DataError."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".jsonl"):
        raise DataError([f"{path}: not found or not a .jsonl file; questions are lines of "
                         f'{{"id": DOCUMENT_ID, "question": ..., "answer": ...}}'])
    rows, problems, count = [], [], {}
    for line, record in read_records(path):
        where = f"{path}:{line}"
        if not isinstance(record, dict) or not all(
                isinstance(record.get(k), str) for k in ("id", "question", "answer")):
            problems.append(f"{where}: expected string fields 'id', 'question' and 'answer'")
        elif record["id"] not in documents:
            problems.append(f"{where}: no forget or retain document has id {record['id']!r}")
        else:
            doc, split = documents[record["id"]]
            count[doc.id] = count.get(doc.id, 0) + 1
            rows.append({"id": f"{doc.id}qa{count[doc.id]}", "input": record["question"],
                         "output": record["answer"], "task": doc.task, "split": split})
    if problems:
        raise DataError(problems)
    return rows


def import_documents(forget: str | Path, retain: str | Path, out: str | Path,
                     nonmember: str | Path | None = None, questions: str | Path | None = None,
                     task: str = CUSTOM_TASK, seed: int = 0) -> Path:
    """Write the LUME-format directory ``out`` (module docstring) from the ``forget`` and
    ``retain`` documents, the never-seen ``nonmember`` ones (for ``mia/``) and ``questions``.
    Every input is only read; nothing is left at ``out`` when one is at fault. Returns ``out``."""
    check_seed(seed)
    claim_output(out, IMPORT, {"--forget": forget, "--retain": retain,
                               "--nonmember": nonmember, "--questions": questions})
    sources = {"forget": read_source(forget, "forget", task),
               "retain": read_source(retain, "retain", task)}
    if nonmember is not None:
        sources["nonmember"] = read_source(nonmember, "nonmember", task)
    _check(sources)
    rows = {split: [sc_row(d, split) for d in sources[split]] for split in ("forget", "retain")}
    if questions is not None:
        owners = {d.id: (d, split) for split in rows for d in sources[split]}
        for row in question_rows(questions, owners):
            rows[row["split"]].append(row)
    with atomic_directory(out, IMPORT) as staging:
        for split, records in rows.items():
            _write_rows(staging / f"{split}.jsonl", records)
        if nonmember is not None:
            _mia(sources["forget"], sources["nonmember"], seed).save(staging / "mia")
            _write_never_seen(staging / "never_seen", sources["nonmember"])
        write_json(staging / IMPORT.record, {
            "forget": str(forget), "retain": str(retain), "nonmember": str(nonmember or ""),
            "questions": str(questions or ""), "task": task, "seed": seed,
            "documents": {role: len(docs) for role, docs in sources.items()},
            "rows": {split: len(records) for split, records in rows.items()}})
    return Path(out)


def _write_rows(path: Path, records: list[dict]) -> None:
    lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_text("".join(lines), encoding="utf-8")


def _write_never_seen(out: Path, never_seen: list[SourceDocument]) -> None:
    """The never-seen documents as a LUME dataset (alternately forget and retain: a receipt
    reads them all alike), each with its task: what ``unlearn audit`` reads a forget document
    of the same task against. None under two documents: one states no rate."""
    if len(never_seen) < 2:
        return
    out.mkdir()
    for split, docs in (("forget", never_seen[0::2]), ("retain", never_seen[1::2])):
        _write_rows(out / f"{split}.jsonl", [sc_row(d, split) for d in docs])


def _mia(forget: list[SourceDocument], never_seen: list[SourceDocument], seed: int) -> MiaData:
    """Members: a seeded sample of forget documents as large as the never-seen set (balanced
    classes for the AUC); non-members: every never-seen document."""
    members = random.Random(f"{seed}/import-members").sample(
        forget, min(len(forget), len(never_seen)))
    rows = [sc_row(d, "forget") for d in members]  # a member as the model saw it
    return MiaData([Document(d.id, r["input"] + " " + r["output"]) for d, r in zip(members, rows)],
                   [Document(d.id, d.text) for d in never_seen])
