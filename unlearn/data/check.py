"""``unlearn data check``: everything a command would read from a data directory, validated
the way that command reads it."""

from __future__ import annotations

from pathlib import Path

from .lume import beside_data, load_lume, load_mia
from .mmlu import load_mmlu


def check_data(directory: str | Path, split: str | None = None, mia="auto",
               mmlu="auto") -> dict:
    """Validate a LUME data directory and what lies beside it (``mia``, ``mmlu``: "auto" takes
    ``DIRECTORY/mia`` and ``DIRECTORY/mmlu`` when present, None skips one), raising the
    :class:`DataError` that ``unlearn run`` or ``eval`` would raise. Returns the row counts per
    split and task (:meth:`LumeData.summary`), the MIA set's document counts and the number of
    MMLU questions, and ``absent``: the terms without rows."""
    data = load_lume(directory, split)
    found: dict = {**data.summary(), "absent": data.absent_terms()}
    mia, mmlu = beside_data(directory, mia, "mia"), beside_data(directory, mmlu, "mmlu")
    if mia:
        sets = load_mia(mia)
        found["mia"] = {"member": len(sets.member), "nonmember": len(sets.nonmember)}
    if mmlu:
        found["mmlu"] = {"questions": len(load_mmlu(mmlu))}
    return found
