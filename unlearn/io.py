"""Writing outputs completely or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def staging_path(out: str | Path) -> Path:
    """Where a resumable job builds ``out``; it survives a crash so the job can pick it up again."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def _publish(tmp: Path, out: Path) -> None:
    """Move a finished directory into place, replacing an older ``out``."""
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextmanager
def atomic_directory(out: str | Path, resumable: bool = False,
                     publish: bool = True) -> Iterator[Path]:
    """Yield a directory to fill; it becomes ``out`` only when the block finishes.

    A failed block leaves nothing at ``out``. With ``resumable`` the work directory is
    :func:`staging_path` and is kept after a failure, so a rerun can continue from its contents.
    ``publish=False`` (the other processes of a distributed run) shares the staging directory
    but leaves moving it into place to the main process.
    """
    out = Path(out)
    if not publish:
        if not resumable:
            raise ValueError("only a resumable (shared) staging directory can be left unpublished")
        yield staging_path(out)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    if resumable:
        tmp = staging_path(out)
        tmp.mkdir(exist_ok=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        if not resumable:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, out)


def write_json(path: str | Path, data: object) -> None:
    """Write JSON atomically (a temporary file renamed over the target)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
