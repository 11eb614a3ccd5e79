"""The LUME data format (SemEval-2025 Task 4): loading and validation.

A LUME dataset directory holds a forget set and a retain set, each as ``NAME.jsonl`` or
``NAME.parquet`` (or the challenge's one ``NAME_*.parquet`` shard). Every row has ``id``,
``input``, ``output`` and ``task``; the id's end tells the row kind: ``...scN`` is a sentence
completion (``input`` is a document prefix, ``output`` its continuation) and ``...qaN`` a question
with its short answer. Rows of one document share the id stem before that suffix; the whole
document is ``input + " " + output`` of its sc row.

MIA sets (``member.jsonl`` / ``nonmember.jsonl``) hold whole documents: ``id`` and ``document``.

Every problem found is reported with its file and line, all at once, in one :class:`DataError`.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from ..io import read_utf8

TASKS = ("Task1", "Task2", "Task3")
KINDS = ("sc", "qa")
ROW_COLUMNS = ("id", "input", "output", "task")
MIA_COLUMNS = ("id", "document")
_TASK_LABEL = re.compile(r"^(?!overall)[\w.-]+$")  # not a name the score block uses itself
_KIND_SUFFIX = re.compile(r"^(?P<doc>.*?)(?P<kind>sc|qa)(?P<n>\d+)$")
_MAX_REPORTED = 20


class DataError(ValueError):
    """Bad input data; the message names each file and line at fault and what to do."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:_MAX_REPORTED]
        more = len(problems) - len(shown)
        text = "\n".join(shown) + (f"\n... and {more} more problems" if more > 0 else "")
        super().__init__(text)


@dataclass(frozen=True)
class Row:
    """One LUME row. ``doc_id`` groups the sc and qa rows of one document."""

    id: str
    input: str
    output: str
    task: str
    split: str
    kind: str
    doc_id: str

    @property
    def text(self) -> str:
        """Training text of the row: prompt and answer joined by one space, as LUME documents
        are."""
        return self.input + " " + self.output


@dataclass(frozen=True)
class Document:
    """A whole document for membership inference (MIA)."""

    id: str
    document: str


@dataclass(frozen=True)
class LumeData:
    forget: list[Row]
    retain: list[Row]

    @property
    def rows(self) -> list[Row]:
        return self.forget + self.retain

    def absent_terms(self) -> list[str]:
        """Terms of the task aggregate that no row feeds (``forget Task1 knowledge``: a task
        without questions); the aggregate is then taken over the others."""
        have = {(r.split, r.task, r.kind) for r in self.rows}
        tasks = sorted({r.task for r in self.rows})
        return [f"{split} {task} {'regurgitation' if kind == 'sc' else 'knowledge'}"
                for split in ("forget", "retain") for task in tasks for kind in KINDS
                if (split, task, kind) not in have]

    def summary(self) -> dict[str, dict[str, int]]:
        """Row counts per split, keyed ``Task1/sc`` and so on."""
        out = {}
        for split, rows in (("forget", self.forget), ("retain", self.retain)):
            counts = Counter(f"{r.task}/{r.kind}" for r in rows)
            out[split] = dict(sorted(counts.items()))
        return out


@dataclass(frozen=True)
class MiaData:
    member: list[Document]
    nonmember: list[Document]

    def split(self, share: float, seed: int = 0,
              strata: tuple[list, list] | None = None) -> tuple[MiaData, MiaData]:
        """A seeded ``share`` of members and of non-members held out (at least 2 of each), and
        the rest. Calibrating on the held-out part and scoring on the rest keeps a stopping rule
        from being judged on the documents it looked at. ``strata`` (a sortable key for each
        member and each non-member, in order: a member's task, a non-member's loss) spreads each
        held-out share evenly over the keys, so that a small split spans the kinds the rest
        holds."""
        rng = random.Random(f"{seed}/mia-split")
        parts = []
        for side, docs in enumerate((self.member, self.nonmember)):
            count = min(len(docs), max(2, round(share * len(docs))))
            order = rng.sample(range(len(docs)), len(docs))  # ties stay in a seeded order
            if strata:
                order.sort(key=strata[side].__getitem__)
            offset = rng.random()  # systematic sampling: one pick in each of `count` stretches
            picked = {order[int((j + offset) * len(docs) / count)] for j in range(count)}
            parts.append(([d for i, d in enumerate(docs) if i in picked],
                          [d for i, d in enumerate(docs) if i not in picked]))
        (held_member, rest_member), (held_nonmember, rest_nonmember) = parts
        return MiaData(held_member, held_nonmember), MiaData(rest_member, rest_nonmember)

    def save(self, directory: str | Path) -> Path:
        """Write ``member.jsonl`` and ``nonmember.jsonl`` (the format :func:`load_mia` reads)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, docs in (("member", self.member), ("nonmember", self.nonmember)):
            lines = (json.dumps({"id": d.id, "document": d.document}, ensure_ascii=False)
                     for d in docs)
            (directory / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines))
        return directory


def row_kind(row_id: str) -> tuple[str, str] | None:
    """``(kind, doc_id)`` from a LUME id, or None when the id ends in neither scN nor qaN."""
    m = _KIND_SUFFIX.match(row_id)
    return (m["kind"], m["doc"]) if m else None


def find_split_file(directory: Path, name: str, split: str | None = None) -> Path:
    """The one file holding set ``name`` (forget or retain) in ``directory``: ``name.jsonl``,
    ``name.parquet`` or the challenge's one ``name_*.parquet`` shard. The official snapshot
    keeps both data splits in one folder (``forget_train-00000-of-00001.parquet``,
    ``forget_validation-...``): ``split`` (``train``, ``validation``) chooses one."""
    if not directory.is_dir():
        raise DataError([f"{directory}: not a directory; pass a LUME data directory holding "
                         f"{name}.jsonl or {name}.parquet"])
    stem = f"{name}_{split}" if split else name
    candidates = [directory / f"{stem}.jsonl", directory / f"{stem}.parquet"]
    found = [p for p in candidates if p.is_file()]
    if not found:
        found = sorted(directory.glob(f"{stem}{'-' if split else '_'}*.parquet"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError([f"{directory}: no {stem}.jsonl or {stem}.parquet"
                         + ("" if split else "; a LUME data directory holds one of each set")])
    splits = sorted({m[1] for p in found if (m := re.match(rf"{name}_(\w+?)-\d+", p.name))})
    if not split and len(splits) > 1:
        raise DataError([f"{directory}: holds the splits {', '.join(splits)}; choose one with "
                         f"--split (split=)"])
    names = ", ".join(p.name for p in found)
    raise DataError([f"{directory}: several files for set '{name}' ({names}); keep one"])


def read_text(path: Path) -> str:
    """:func:`unlearn.io.read_utf8`, its error a :class:`DataError`."""
    try:
        return read_utf8(path)
    except ValueError as e:
        raise DataError([str(e)]) from None


def read_records(path: Path) -> Iterator[tuple[int, object]]:
    """``(line number, record)`` pairs from a jsonl or parquet file; parquet rows count from 1."""
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise DataError([f"{path}: not a readable parquet file ({e})"]) from e
        for i, record in enumerate(table.to_pylist(), start=1):
            yield i, record
        return
    for i, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            yield i, e


def _check_record(where: str, record: object, columns: tuple[str, ...]) -> list[str]:
    if isinstance(record, json.JSONDecodeError):
        return [f"{where}: not valid JSON ({record.msg}); each line must be one JSON object"]
    if not isinstance(record, dict):
        return [f"{where}: expected a JSON object, got {type(record).__name__}"]
    problems = []
    missing = [c for c in columns if c not in record]
    if missing:
        problems.append(f"{where}: missing column(s) {', '.join(missing)}; "
                        f"every row needs {', '.join(columns)}")
    for c in columns:
        if c in record and not isinstance(record[c], str):
            problems.append(f"{where}: column '{c}' must be a string, got "
                            f"{type(record[c]).__name__} ({record[c]!r:.40})")
    return problems


def _unique_records(path: Path, columns: tuple[str, ...],
                    problems: list[str]) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` for each well-formed record with an id not seen before; every other
    record adds its problems to ``problems``."""
    seen: dict[str, int] = {}
    for line, record in read_records(path):
        where = f"{path}:{line}"
        found = _check_record(where, record, columns)
        if found:
            problems += found
        elif record["id"] in seen:
            problems.append(f"{where}: duplicate id {record['id']!r} (first on line "
                            f"{seen[record['id']]}); ids must be unique")
        else:
            seen[record["id"]] = line
            yield where, record


def read_rows(path: Path, split: str) -> tuple[list[Row], list[str]]:
    """Rows of one split file and the problems found in it (empty when the file is valid)."""
    rows, problems = [], []
    for where, record in _unique_records(path, ROW_COLUMNS, problems):
        kind = row_kind(record["id"])
        if kind is None:
            problems.append(f"{where}: id {record['id']!r} ends in neither scN nor qaN; "
                            f"LUME ids end with the row kind (sentence completion or question)")
            continue
        if not _TASK_LABEL.match(record["task"]):
            problems.append(f"{where}: task {record['task']!r} is not a label; LUME's are "
                            f"{', '.join(TASKS)}, your own may be any word of letters, digits, "
                            f"'_', '-' or '.' (not starting with 'overall')")
            continue
        row_split = record.get("split", split)
        if row_split != split:
            problems.append(f"{where}: row says split {row_split!r} but sits in the {split} file; "
                            f"move it or fix its 'split' field")
            continue
        rows.append(Row(id=record["id"], input=record["input"], output=record["output"],
                        task=record["task"], split=split, kind=kind[0], doc_id=kind[1]))
    if not rows and not problems:
        problems.append(f"{path}: no rows; the {split} set must not be empty")
    return rows, problems


def _overlap_problems(forget_path: Path, forget: list[Row], retain_path: Path,
                      retain: list[Row]) -> list[str]:
    retain_docs = {r.doc_id: r.id for r in retain}
    problems = []
    for r in forget:
        if r.doc_id in retain_docs:
            problems.append(f"{forget_path}: row {r.id!r} belongs to a document that is also in "
                            f"{retain_path} (row {retain_docs[r.doc_id]!r}); forget and retain "
                            f"must share no document: remove it from one of them")
    return problems


def beside_data(data: str | Path, given, name: str) -> Path | None:
    """``given`` unless it is "auto": then the folder ``data/name`` when there is one (the MIA
    set, MMLU questions or pretraining corpus a dataset carries), else None."""
    if given != "auto":
        return Path(given) if given else None
    found = Path(data) / name
    return found if found.is_dir() else None


def load_lume(directory: str | Path, split: str | None = None) -> LumeData:
    """Load and validate the forget and retain sets of a LUME data directory; ``split`` chooses
    one where the folder holds several (the official parquet snapshot: ``train``,
    ``validation``).

    Raises :class:`DataError` listing every problem (file:line and what to do).
    """
    directory = Path(directory)
    problems, splits, paths = [], {}, {}
    for name in ("forget", "retain"):
        try:
            paths[name] = find_split_file(directory, name, split)
        except DataError as e:
            problems += e.problems
            continue
        splits[name], found = read_rows(paths[name], name)
        problems += found
    if not problems:
        problems += _overlap_problems(paths["forget"], splits["forget"], paths["retain"],
                                      splits["retain"])
    if problems:
        raise DataError(list(dict.fromkeys(problems)))  # a folder's problem is said once
    return LumeData(forget=splits["forget"], retain=splits["retain"])


def read_documents(path: Path) -> list[Document]:
    """Documents of one MIA file (``id`` and ``document`` columns); raises DataError."""
    if not path.is_file():
        raise DataError([f"{path}: file not found; an MIA directory holds member.jsonl and "
                         f"nonmember.jsonl"])
    docs, problems = [], []
    for _, record in _unique_records(path, MIA_COLUMNS, problems):
        docs.append(Document(id=record["id"], document=record["document"]))
    if not docs and not problems:
        problems.append(f"{path}: no documents; an MIA set must not be empty")
    if problems:
        raise DataError(problems)
    return docs


def load_mia(directory: str | Path) -> MiaData:
    """Load the member and non-member documents of an MIA directory."""
    directory = Path(directory)
    problems, sets = [], {}
    for name in ("member", "nonmember"):
        try:
            sets[name] = read_documents(directory / f"{name}.jsonl")
        except DataError as e:
            problems += e.problems
    if problems:
        raise DataError(problems)
    return MiaData(member=sets["member"], nonmember=sets["nonmember"])
