"""A general text corpus for pretraining a target before it memorises the task data.

Accepted forms, in one directory:
- a LUME data directory (forget/retain files): every row's text,
- ``*.jsonl`` files whose objects carry a ``document`` or ``text`` field,
- ``*.txt`` files, one document each.
"""

from __future__ import annotations

from pathlib import Path

from .lume import DataError, find_split_file, load_lume, read_records, read_text


def _jsonl_documents(path: Path) -> tuple[list[str], list[str]]:
    docs, problems = [], []
    for line, record in read_records(path):
        text = record.get("document", record.get("text")) if isinstance(record, dict) else None
        if not isinstance(text, str):
            problems.append(f"{path}:{line}: expected an object with a string 'document' or "
                            f"'text' field")
        elif text.strip():
            docs.append(text)
    return docs, problems


def _is_lume_directory(directory: Path) -> bool:
    try:
        find_split_file(directory, "forget")
        find_split_file(directory, "retain")
    except DataError:
        return False
    return True


def load_corpus(directory: str | Path) -> list[str]:
    """Documents of a pretraining corpus directory, in a stable order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError([f"{directory}: corpus directory not found"])
    if _is_lume_directory(directory):
        return [row.text for row in load_lume(directory).rows]
    docs, problems = [], []
    for path in sorted(directory.glob("*.jsonl")):
        found, bad = _jsonl_documents(path)
        docs += found
        problems += bad
    for path in sorted(directory.glob("*.txt")):
        text = read_text(path)
        if text.strip():
            docs.append(text)
    if problems:
        raise DataError(problems)
    if not docs:
        raise DataError([f"{directory}: no documents; a corpus directory holds LUME split "
                         f"files, .jsonl files with a 'document' field, or .txt files"])
    return docs
