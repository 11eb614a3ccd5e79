"""Multiple-choice questions in MMLU's CSV format: ``question, A, B, C, D, answer`` with no header.

A directory of such files is read whole (real MMLU's ``test/`` folder when there is one). Prompts
are those of the MMLU harness the organisers ran (open-instruct's ``run_mmlu.py``): five answered
questions of the subject from ``dev/{subject}_dev.csv`` when that folder is there (its
``--ntrain`` default), none otherwise; a model answers with the option letter of highest
probability.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from pathlib import Path

from .lume import DataError, read_text

LETTERS = ("A", "B", "C", "D")
SHOTS = 5  # answered dev questions before each test question: the harness's --ntrain default
HEADER = ["question", "A", "B", "C", "D", "answer"]


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # one of LETTERS
    shots: tuple[Question, ...] = ()  # the subject's answered dev questions, shown first

    def _example(self) -> str:
        options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, self.choices))
        return f"{self.question}{options}\nAnswer:"

    def prompt_with(self, shots: int) -> str:
        """The harness's prompt with the first ``shots`` dev questions answered before this one.
        Its subject is each word of the file name after a space, hence two spaces after
        "about", as the harness writes it."""
        subject = "".join(" " + word for word in self.subject.split("_"))
        header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        answered = "".join(f"{s._example()} {s.answer}\n\n" for s in self.shots[:shots])
        return header + answered + self._example()

    @property
    def prompt(self) -> str:
        return self.prompt_with(len(self.shots))

    @property
    def text(self) -> str:
        """The question answered, as a training text."""
        return f"{self.prompt} {self.answer}"


def _subject(path: Path) -> str:
    name = path.stem
    for suffix in ("_test", "_dev", "_val"):
        name = name.removesuffix(suffix)
    return name


def read_questions(path: Path) -> list[Question]:
    questions, problems = [], []
    rows = csv.reader(io.StringIO(read_text(path), newline=""))
    for line, record in enumerate(rows, start=1):
        if line == 1 and [c.strip().lower() for c in record] == [h.lower() for h in HEADER]:
            continue
        where = f"{path}:{line}"
        if len(record) != 6:
            problems.append(f"{where}: {len(record)} columns, expected 6 "
                            f"(question, A, B, C, D, answer)")
        elif record[5].strip() not in LETTERS:
            problems.append(f"{where}: answer {record[5]!r} is not one of A, B, C, D")
        else:
            questions.append(Question(_subject(path), record[0], tuple(record[1:5]),
                                      record[5].strip()))
    if problems:
        raise DataError(problems)
    return questions


def _with_shots(test_file: Path, questions: list[Question]) -> list[Question]:
    """``questions`` each preceded by the first ``SHOTS`` questions of the subject's dev file
    (``dev/{subject}_dev.csv`` beside ``test/``), when there is one."""
    dev = test_file.parent.parent / "dev" / f"{_subject(test_file)}_dev.csv"
    if test_file.parent.name != "test" or not dev.is_file():
        return questions
    shots = tuple(read_questions(dev)[:SHOTS])
    return [replace(q, shots=shots) for q in questions]


def load_mmlu(directory: str | Path) -> list[Question]:
    """All questions of an MMLU-format directory (its ``test/`` subfolder when present, with
    the subject's ``dev/`` questions as shots when that folder is there)."""
    directory = Path(directory)
    if (directory / "test").is_dir():
        directory = directory / "test"
    files = sorted(directory.glob("*.csv")) if directory.is_dir() else []
    if not files:
        raise DataError([f"{directory}: no .csv files; an MMLU directory holds CSVs of "
                         f"question, A, B, C, D, answer"])
    questions = [q for path in files for q in _with_shots(path, read_questions(path))]
    if not questions:
        raise DataError([f"{directory}: the CSV files hold no questions"])
    return questions


def write_questions(path: Path, questions: list[Question]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        for q in questions:
            writer.writerow([q.question, *q.choices, q.answer])
