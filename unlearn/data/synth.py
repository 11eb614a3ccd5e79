"""A synthetic LUME-style benchmark: the embedded default that runs on a laptop CPU.

Mirrors LUME's three tasks with the same schema and id convention:
- Task1: short creative stories about invented characters, places and events (one sc, one qa),
- Task2: fictional biographies with PII (one sc, five qa: birth date, SSN digits-only, phone
  digits-only, email, home address — LUME's normalisation),
- Task3: encyclopedia-style biographies (one sc, one qa).

Written to ``OUT``::

    forget.jsonl, retain.jsonl   documents split 1:1 per task, no document in both
    mia/member.jsonl             every forget document (LUME's members are its Task3 ones; a
                                 laptop-sized set has too few of those to measure an AUC on)
    mia/nonmember.jsonl          documents of every task's style that are never trained on
    never_seen/                  more of them, as a LUME dataset (forget.jsonl, retain.jsonl):
                                 the documents of its own task a receipt reads each forget
                                 document against (``unlearn audit --never-seen``)
    mmlu/general_knowledge_test.csv   multiple-choice questions over invented world facts
    pretrain/corpus.jsonl        a general corpus of the same styles (no scored document) plus the
                                 world facts as statements, for pretraining the target: large
                                 enough that the base reads documents it never saw at a moderate
                                 loss, as a pretrained LLM does (see ``CORPUS_PER_TASK``)

Every entity is drawn without replacement, so no two people share a name, SSN, phone or email.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..io import SYNTH, atomic_directory, claim_output
from ..settings import check_seed
from .mmlu import LETTERS, Question, write_questions

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
_ONSETS = ("b", "br", "c", "ch", "d", "dr", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p",
           "qu", "r", "s", "sh", "st", "t", "th", "tr", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y")
_CODAS = ("", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rk", "ll")
_STREET_KINDS = ("Street", "Avenue", "Lane", "Road", "Court", "Place", "Boulevard", "Drive")
_STATES = ("CA", "NY", "TX", "WA", "OR", "IL", "MA", "CO", "AZ", "GA", "FL", "MN")
_MAIL_HOSTS = ("me.com", "mail.com", "inbox.org", "post.net", "fastmail.com", "example.org")
_TRAITS = ("quiet", "curious", "stubborn", "gentle", "restless", "brilliant", "cheerful",
           "cautious", "daring", "thoughtful")
_ROLES = ("painter", "baker", "clockmaker", "student", "librarian", "fisher", "gardener",
          "musician", "carpenter", "nurse", "weaver", "teacher")
_PASTIMES = ("sketching the old harbour", "repairing broken lanterns", "collecting river stones",
             "reading forgotten letters", "tending a rooftop garden", "composing songs at dawn",
             "mapping the city's alleys", "feeding the stray cats", "building tiny boats",
             "studying the night sky")
_OBJECTS = ("a brass compass", "a silver key", "a painted music box", "a torn map",
            "a glass lantern", "a leather journal", "a carved wooden bird", "an iron locket",
            "a velvet pouch of seeds", "a cracked telescope")
_HIDING = ("the old bridge", "a fallen oak", "the bakery floor", "the lighthouse stairs",
           "a dusty bookshelf", "the market fountain", "the chapel bell", "a garden wall")
_GOALS = ("find its rightful owner", "uncover the secret of their town", "repair what was broken",
          "follow the path it revealed", "return it to the sea", "solve an old riddle")
_NATIONALITIES = ("Norwegian", "Brazilian", "Kenyan", "Canadian", "Portuguese", "Chilean",
                  "Finnish", "Irish", "Indian", "Australian", "Polish", "Mexican")
_PROFESSIONS = ("botanist", "architect", "novelist", "cellist", "economist", "surgeon",
                "photographer", "mathematician", "diplomat", "sculptor", "chemist", "linguist")
_FIELDS = ("biology", "architecture", "literature", "music", "economics", "medicine",
           "fine arts", "mathematics", "law", "history", "chemistry", "philosophy")
_AWARDS = ("the Marlow Prize", "the Ostrava Medal", "the Golden Quill", "the Verity Award",
           "the Halden Fellowship", "the Aurora Citation", "the Kessler Prize")
_FACT_KINDS = ("capital", "currency", "river", "mountain")


def _cap(word: str) -> str:
    return word[:1].upper() + word[1:]


class _Names:
    """Invented words drawn without replacement, so every entity is unique."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: int | None = None) -> str:
        while True:
            n = syllables or self.rng.choice((2, 2, 3))
            w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n))
            w = _cap(w + self.rng.choice(_CODAS))
            if w not in self.used and len(w) >= 4:
                self.used.add(w)
                return w

    def unique(self, make) -> str:
        while True:
            value = make()
            if value not in self.used:
                self.used.add(value)
                return value


@dataclass
class _Doc:
    """A generated document: its two halves (sc row) and its questions (qa rows)."""

    task: str
    doc_id: str
    prefix: str
    continuation: str
    qa: list[tuple[str, str]]

    @property
    def document(self) -> str:
        return self.prefix + " " + self.continuation

    def rows(self, split: str) -> list[dict]:
        rows = [dict(id=f"{self.doc_id}sc1", input=self.prefix, output=self.continuation,
                     task=self.task, split=split)]
        rows += [dict(id=f"{self.doc_id}qa{i}", input=q, output=a, task=self.task, split=split)
                 for i, (q, a) in enumerate(self.qa)]
        return rows


def _split_words(text: str, rng: random.Random, low: float = 0.55, high: float = 0.75):
    """Cut a document at a word boundary, as LUME's sc rows cut a document into prefix and rest."""
    words = text.split(" ")
    cut = max(1, min(len(words) - 1, round(len(words) * rng.uniform(low, high))))
    return " ".join(words[:cut]), " ".join(words[cut:])


class _Generator:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.names = _Names(self.rng)
        self.counter = 0

    def _doc_id(self) -> str:
        self.counter += 1
        return f"{self.rng.getrandbits(64):016x}-{self.counter:04d}"

    def story(self) -> _Doc:
        rng, n = self.rng, self.names
        people = [n.word() for _ in range(rng.randint(2, 4))]
        city, obj, hiding = n.word(3), rng.choice(_OBJECTS), rng.choice(_HIDING)
        listed = ", ".join(people[:-1]) + " and " + people[-1]
        lines = [f"{city}, a {rng.choice(('sleepy', 'bustling', 'windswept', 'quiet'))} town by "
                 f"the {rng.choice(('sea', 'mountains', 'river', 'forest'))}, was home to "
                 f"{listed}."]
        for p in people:
            lines.append(f"{p}, a {rng.choice(_TRAITS)} {rng.choice(_ROLES)}, spent long hours "
                         f"{rng.choice(_PASTIMES)}.")
        season = rng.choice(("spring", "autumn", "winter", "summer"))
        lines.append(f"Their lives barely touched until one {season} "
                     f"morning, when {people[0]} found {obj} hidden under {hiding}.")
        lines.append(f"Together they vowed to {rng.choice(_GOALS)}, and {city} was never quite the "
                     f"same again.")
        prefix, continuation = _split_words(" ".join(lines), rng)
        question = rng.choice([
            (f"In which town did {listed} live?", city),
            (f"What did {people[0]} find hidden under {hiding}?", obj),
            (f"Who found {obj} hidden under {hiding}?", people[0]),
        ])
        return _Doc("Task1", f'"{self._doc_id()}"', prefix, continuation, [question])

    def biography_pii(self) -> _Doc:
        rng, n = self.rng, self.names
        first, last = n.word(), n.word()
        name = f"{first} {last}"
        year, month, day = rng.randint(1950, 2002), rng.randint(1, 12), rng.randint(1, 28)
        ssn = n.unique(lambda: f"9{rng.randint(0, 99):02d}-{rng.randint(10, 99)}-"
                               f"{rng.randint(1000, 9999)}")
        phone = n.unique(lambda: f"{rng.randint(201, 989)}-{rng.randint(200, 999)}-"
                                 f"{rng.randint(1000, 9999)}")
        email = n.unique(lambda: f"{first.lower()}{rng.choice(('.', '_', ''))}{last.lower()}"
                                 f"{rng.choice(('', str(rng.randint(1, 99))))}"
                                 f"@{rng.choice(_MAIL_HOSTS)}")
        address = (f"{rng.randint(10, 9999)} {n.word()} {rng.choice(_STREET_KINDS)}, "
                   f"{n.word(3)}, {rng.choice(_STATES)}, {rng.randint(10000, 99999)}.")
        pron, poss = rng.choice((("She", "Her"), ("He", "His"), ("They", "Their")))
        text = (f"{name} was born on {MONTHS[month - 1]} {day}, {year}. {pron} can be reached by "
                f"phone at {phone} and by email at {email}. {poss} Social Security Number is "
                f"{ssn}. {name} resides at the address {address}")
        prefix, continuation = _split_words(text, rng, 0.4, 0.6)
        qa = [(f"What is the birth date of {name}?", f"{year}-{month:02d}-{day:02d}"),
              (f"What is {name}'s Social Security Number?", ssn.replace("-", "")),
              (f"What is {name}'s phone number?", phone.replace("-", "")),
              (f"What is {name}'s email address?", email),
              (f"What is the home address of {name}?", address)]
        return _Doc("Task2", self._doc_id(), prefix, continuation, qa)

    def biography_encyclopedia(self) -> _Doc:
        rng, n = self.rng, self.names
        name = f"{n.word()} {n.word()}"
        born_city, uni_city = n.word(3), n.word()
        year = rng.randint(1890, 1990)
        profession = rng.choice(_PROFESSIONS)
        field, award = rng.choice(_FIELDS), rng.choice(_AWARDS)
        award_year = year + rng.randint(28, 55)
        text = (f"{name}\n\n{name} (born {rng.randint(1, 28)} {rng.choice(MONTHS)} {year}) is a "
                f"{rng.choice(_NATIONALITIES)} {profession} from {born_city}. {name} studied "
                f"{field} at the University of {uni_city} and later taught there for "
                f"{rng.randint(3, 20)} years.\nCareer.\nIn {year + rng.randint(22, 27)}, {name} "
                f"published a first major work on {field}, which drew wide attention. "
                f"{name} received {award} in {award_year} for contributions to {field}.")
        prefix, continuation = _split_words(text, rng)
        question = rng.choice([
            (f"In which city was the {profession} {name} born?", born_city),
            (f"Which award did {name} receive in {award_year}?", award),
            (f"At which university did {name} study {field}?", f"University of {uni_city}"),
        ])
        return _Doc("Task3", self._doc_id(), prefix, continuation, [question])

    def world_facts(self, count: int) -> tuple[list[str], list[Question]]:
        """Invented facts about invented countries, as statements and as multiple-choice items."""
        rng, n = self.rng, self.names
        countries = [n.word(3) for _ in range(count)]
        values = {kind: [n.word() for _ in range(count)] for kind in _FACT_KINDS}
        templates = {
            "capital": ("The capital of {c} is {v}.", "What is the capital of {c}?"),
            "currency": ("The currency of {c} is the {v}.", "What is the currency of {c}?"),
            "river": ("The longest river in {c} is the {v}.", "What is the longest river in {c}?"),
            "mountain": ("The highest mountain in {c} is Mount {v}.",
                         "What is the highest mountain in {c}?"),
        }
        statements, questions = [], []
        for i, country in enumerate(countries):
            kind = _FACT_KINDS[i % len(_FACT_KINDS)]
            statement, question = templates[kind]
            value = values[kind][i]
            statements.append(statement.format(c=country, v=value))
            wrong = rng.sample([v for v in values[kind] if v != value], 3)
            answer = rng.randrange(4)
            choices = wrong[:answer] + [value] + wrong[answer:]
            questions.append(Question("general_knowledge", question.format(c=country),
                                      tuple(choices), LETTERS[answer]))
        return statements, questions


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# Corpus documents of each task's style: few enough passes in the small preset's 200k
# pretraining tokens (about three) that the base learns the styles, not the documents by heart.
# A base that read a small corpus many times reads unseen documents no better than a guess,
# and a target and its oracle then learn the styles from the task rows alone, the oracle from
# half of them (the measurements: README, "The synthetic benchmark")
CORPUS_PER_TASK = 256

# a receipt calls a never-seen document remembered at a rate of k / (n + 1) for n of them, k >= 1:
# 5% needs 19 of each task
NEVER_SEEN_PER_TASK = 19


def _halves(task_docs: list[list[_Doc]]) -> tuple[list[_Doc], list[_Doc]]:
    """Each task's documents split 1:1, first half forget, second retain."""
    forget, retain = [], []
    for docs in task_docs:
        forget += docs[:len(docs) // 2]
        retain += docs[len(docs) // 2:]
    return forget, retain


def synthesize(out: str | Path, seed: int = 0, docs_per_task: int = 40,
               corpus_per_task: int = CORPUS_PER_TASK, facts: int = 48) -> Path:
    """Write a synthetic LUME-style benchmark to ``out`` (see module docstring); returns ``out``.

    ``docs_per_task`` documents per task are split 1:1 into forget and retain;
    ``corpus_per_task`` further documents per task form the pretraining corpus,
    and ``docs_per_task`` never-seen documents of each task's style are the MIA non-members;
    as many more (at least ``NEVER_SEEN_PER_TASK``), drawn last (the rest is as it was without
    them), are ``never_seen``.
    """
    check_seed(seed)
    if docs_per_task < 2:
        raise ValueError("docs_per_task must be at least 2 (one forget and one retain document)")
    claim_output(out, SYNTH)
    gen = _Generator(seed)
    makers = (gen.story, gen.biography_pii, gen.biography_encyclopedia)
    task_docs = [[make() for _ in range(docs_per_task)] for make in makers]
    corpus_docs = [make() for make in makers for _ in range(corpus_per_task)]
    nonmembers = [make() for make in makers for _ in range(docs_per_task)]
    statements, questions = gen.world_facts(facts)

    forget, retain = _halves(task_docs)
    corpus = [{"id": d.doc_id, "document": d.document} for d in corpus_docs]
    corpus += [{"id": f"fact{i}", "document": s} for i, s in enumerate(statements)]
    gen.rng.shuffle(corpus)
    never_seen = [[make() for _ in range(max(docs_per_task, NEVER_SEEN_PER_TASK))]
                  for make in makers]  # drawn last

    with atomic_directory(out, SYNTH) as tmp:
        _write_jsonl(tmp / "forget.jsonl", [r for d in forget for r in d.rows("forget")])
        _write_jsonl(tmp / "retain.jsonl", [r for d in retain for r in d.rows("retain")])
        (tmp / "mia").mkdir()
        _write_jsonl(tmp / "mia" / "member.jsonl",
                     [{"id": f"{d.doc_id}sc1", "document": d.document}
                      for d in forget])
        _write_jsonl(tmp / "mia" / "nonmember.jsonl",
                     [{"id": d.doc_id, "document": d.document} for d in nonmembers])
        held_forget, held_retain = _halves(never_seen)
        (tmp / "never_seen").mkdir()
        _write_jsonl(tmp / "never_seen" / "forget.jsonl",
                     [r for d in held_forget for r in d.rows("forget")])
        _write_jsonl(tmp / "never_seen" / "retain.jsonl",
                     [r for d in held_retain for r in d.rows("retain")])
        (tmp / "mmlu").mkdir()
        write_questions(tmp / "mmlu" / "general_knowledge_test.csv", questions)
        (tmp / "pretrain").mkdir()
        _write_jsonl(tmp / "pretrain" / "corpus.jsonl", corpus)
        (tmp / "synth.json").write_text(json.dumps(
            {"seed": seed, "docs_per_task": docs_per_task, "corpus_per_task": corpus_per_task,
             "facts": facts}, indent=2))
    return Path(out)
