"""``unlearn data check``: everything a command would read from a data directory, validated
the way that command reads it."""

from __future__ import annotations

from pathlib import Path

from .lume import beside_data, load_lume, load_mia
from .mmlu import load_mmlu


def check_data(directory: str | Path, split: str | None = None, mia="auto",
               mmlu="auto", never_seen="auto") -> dict:
    """Validate a LUME data directory and what lies beside it (``mia``, ``mmlu``,
    ``never_seen``: "auto" takes ``DIRECTORY/mia``, ``DIRECTORY/mmlu`` and
    ``DIRECTORY/never_seen`` when present, None skips one), raising the :class:`DataError` that
    ``unlearn run``, ``eval`` or ``audit`` would raise. Returns the row counts per split and
    task (:meth:`LumeData.summary`), the MIA set's document counts, the never-seen documents
    per task, the number of MMLU questions, and ``absent``: the terms without rows."""
    data = load_lume(directory, split)
    found: dict = {**data.summary(), "absent": data.absent_terms()}
    mia, mmlu = beside_data(directory, mia, "mia"), beside_data(directory, mmlu, "mmlu")
    if mia:
        sets = load_mia(mia)
        found["mia"] = {"member": len(sets.member), "nonmember": len(sets.nonmember)}
    if mmlu:
        found["mmlu"] = {"questions": len(load_mmlu(mmlu))}
    never_seen = beside_data(directory, never_seen, "never_seen")
    if never_seen:
        documents = {(r.task, r.doc_id) for r in load_lume(never_seen).rows}
        found["never_seen"] = {task: sum(t == task for t, _ in documents)
                               for task in sorted({t for t, _ in documents})}
    return found
