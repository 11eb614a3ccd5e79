"""Writing outputs completely or not at all, and never over what this package did not make.

Every command writes one output directory, OUT. Before any work it calls :func:`claim_output`,
which refuses an OUT that is, holds or lies inside one of the command's inputs, and an existing
OUT that is not a finished output of the same command (told apart by its record file:
``run.json`` for ``unlearn run``, ...). Work happens beside OUT, in a staging directory this
package marks as its own; the finished directory replaces OUT in one rename. While a command
writes OUT it holds a lock beside it (``.OUT.lock``), so a second command on the same OUT is
refused at once rather than sharing the staging directory.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_MARKER = ".unlearn-job"  # inside a staging directory: which command's work it holds
_LOCK_TEXT = "unlearn pid"  # how a lock file beside OUT begins: ``unlearn pid N``
# the lock files this process holds: their descriptor, and how many blocks writing OUT
# (atomic_directory, in_place) are open; the lock goes when the last one closes
_LOCKS: dict[Path, list[int]] = {}
# a failed write with less free space than this is taken for a full disk
_NEARLY_FULL = 64 * 2**20


class OutputError(ValueError):
    """An output path the command may not write to; the message says why and what to do."""


@dataclass(frozen=True)
class Output:
    """What a command writes: its name, for messages, and the record file a finished output
    of it always holds."""

    command: str
    record: str


SYNTH = Output("unlearn data synth", "synth.json")
TARGET = Output("unlearn target", "target.json")
RUN = Output("unlearn run", "run.json")
EVAL = Output("unlearn eval", "eval.json")
LOCATE = Output("unlearn locate", "trace.json")
BENCH = Output("unlearn bench", "bench.json")
AUDIT = Output("unlearn audit", "receipt.json")
IMPORT = Output("unlearn data import", "import.json")


def fingerprint(*parts: object) -> str:
    """A short stable hash of JSON-able parts (data contents, settings)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def path_text(path: str | Path | None) -> str | None:
    """A path as recorded in a JSON record: its text, or None when there is none."""
    return str(path) if path else None


def staging_path(out: str | Path) -> Path:
    """Where a job builds ``out``; it survives a crash so a resumable job can pick it up."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def lock_path(out: str | Path) -> Path:
    """The file whose lock says a command is writing ``out`` (and its staging directory)."""
    out = Path(out)
    return out.parent / f".{out.name}.lock"


def is_output(path: str | Path, kind: Output) -> bool:
    """Whether ``path`` is a finished output of ``kind`` (its record file is there)."""
    return (Path(path) / kind.record).is_file()


def _overlap(out: Path, name: str, given: Path, in_place: bool) -> str | None:
    """Why writing ``out`` would touch the input ``given`` (named ``name``), if it would."""
    here, there = out.resolve(), given.resolve()
    if here == there:
        return f"{out}: is also the input {name}; inputs are only read: choose a new --out"
    if there in here.parents:
        return (f"{out}: lies inside the input {name} ({given}); inputs are only read: "
                f"choose an --out outside it")
    if here in there.parents and not in_place:
        return (f"{out}: holds the input {name} ({given}); replacing it would delete that "
                f"input: choose another --out")
    return None


def claim_output(out: str | Path, kind: Output,
                 inputs: Mapping[str, str | Path | None] | None = None,
                 in_place: bool = False, lock: bool = True) -> Path:
    """Refuse, before any work, an ``out`` this command may not (re)place.

    ``inputs`` maps a name (``--model``) to each path the command reads. ``out`` may be new, an
    empty directory, or a finished output of ``kind``; its staging directory may be absent or
    an earlier job of the same kind. An ``in_place`` output (``unlearn bench``) is extended,
    never replaced, so it may hold an input. Raises :class:`OutputError` naming the path
    otherwise. ``lock=False`` checks only, writing nothing (a command that may still refuse
    for another reason claims again, locking, once it will go on).
    """
    out = Path(out)
    for name, given in (inputs or {}).items():
        if given is not None and str(given) != "":
            problem = _overlap(out, name, Path(given), in_place)
            if problem:
                raise OutputError(problem)
    if out.is_symlink():
        raise OutputError(f"{out}: is a symbolic link (to {os.readlink(out)}); --out names a "
                          f"directory to create, not a link: give the real path or a new one")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory; --out names a directory to "
                          f"create: choose a new path")
    if out.is_dir() and any(out.iterdir()) and not is_output(out, kind):
        raise OutputError(f"{out}: exists and is not an output of `{kind.command}` (it has no "
                          f"{kind.record}); choose a new --out, or move it away yourself")
    _check_staging(staging_path(out), kind)
    if lock and out.parent.is_dir():  # else nothing can be writing it yet: atomic_directory
        lock_output(out)  # locks it
    return out


def lock_output(out: str | Path) -> None:
    """Hold the lock on writing ``out`` until :func:`release_output`, or refuse at once when
    another process holds it. The lock is the kernel's (``flock``): a command killed at any
    moment leaves a lock file that the next command simply takes over. In a distributed run
    the first process holds it for all (they share one staging directory)."""
    path = lock_path(out).absolute()
    if path in _LOCKS or int(os.environ.get("RANK", "0")) != 0:
        return
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OutputError(f"{path}: exists and was not made by unlearn; move it away and rerun")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        holder = os.read(fd, 200).decode(errors="replace").strip()
        if holder and not holder.startswith(_LOCK_TEXT):
            os.close(fd)
            raise OutputError(f"{path}: exists and was not made by unlearn; move it away and "
                              f"rerun")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = holder.removeprefix(_LOCK_TEXT).strip() or "unknown"
            raise OutputError(f"{out}: is being written by another unlearn command (pid {pid}); "
                              f"wait for it to finish, or choose another --out") from None
        try:  # the holder before us may have released (and removed) the file meanwhile
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{_LOCK_TEXT} {os.getpid()}\n".encode(), 0)
    _LOCKS[path] = [fd, 0]


@contextmanager
def _holding(out: Path) -> Iterator[None]:
    """Hold the lock on ``out`` while the block runs (a block inside another one that writes
    ``out``, as ``unlearn demo``'s bench, leaves it to the outer one to let go)."""
    lock_output(out)
    held = _LOCKS.get(lock_path(out).absolute())
    if held is not None:
        held[1] += 1
    try:
        yield
    finally:
        if held is not None:
            held[1] -= 1
            if not held[1]:
                release_output(out)


def release_output(out: str | Path) -> None:
    """Let go of the lock :func:`lock_output` took on ``out`` (the lock file goes too)."""
    _release(lock_path(out).absolute())


def release_all() -> None:
    """Let go of every output lock this process holds (a command has ended)."""
    for path in list(_LOCKS):
        _release(path)


def _release(path: Path) -> None:
    held = _LOCKS.pop(path, None)
    if held is not None:
        path.unlink(missing_ok=True)  # while still locked: a waiter then sees it gone
        os.close(held[0])


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Report a failed write by a library as the OSError it stands for: torch says
    ``[enforce fail at inline_container.cc]``, safetensors ``os error 28``; a full disk then
    reads ``[Errno 28] No space left on device: PATH``, as a write of Python's own would."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        text = str(e)
        if not any(sign in text for sign in ("os error", "No space left", "inline_container",
                                             "file write failed")):
            raise
        where = Path(path)
        while not where.exists() and where != where.parent:
            where = where.parent
        if "os error 28" in text or "No space left" in text or (
                shutil.disk_usage(where).free < _NEARLY_FULL):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise OSError(errno.EIO, f"writing failed ({text.splitlines()[0][:120]})",
                      str(path)) from None


def _check_staging(staging: Path, kind: Output) -> None:
    if not staging.exists() and not staging.is_symlink():
        return
    marker = staging / _MARKER
    owner = marker.read_text().strip() if marker.is_file() and not staging.is_symlink() else None
    if owner is None:
        raise OutputError(f"{staging}: exists and was not made by unlearn; move it away and rerun")
    if owner != kind.command:
        raise OutputError(f"{staging}: holds the unfinished work of `{owner}`; finish it by "
                          f"rerunning that command, or delete {staging} yourself")


@contextmanager
def in_place(out: Path, kind: Output, record: dict) -> Iterator[Path]:
    """Start (or continue) an output that is filled in place, held (:func:`lock_output`)
    while the block runs: OUT with its record file, which marks it as ``kind``'s from the first
    moment (see :func:`claim_output`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with _holding(out):
        out.mkdir(exist_ok=True)
        write_json(out / kind.record, record)
        yield out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_staging(out: Path, kind: Output, resumable: bool) -> Path:
    """The staging directory, with the permissions the umask gives (not mkdtemp's 0700). It
    appears with its marker already inside: the other processes of a distributed run, checking
    it meanwhile, never see it unmarked."""
    staging = staging_path(out)
    if resumable and staging.is_dir():
        return staging  # an earlier run of this job (claim_output checked its marker)
    fresh = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(fresh, 0o777 & ~_umask())
    (fresh / _MARKER).write_text(kind.command + "\n")
    if not resumable:
        return fresh
    os.rename(fresh, staging)
    return staging


def reset_staging(staging: Path) -> None:
    """Empty a staging directory of an earlier, different job (it stays marked as ours)."""
    for child in staging.iterdir():
        if child.name == _MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _publish(staging: Path, out: Path, kind: Output) -> None:
    """Move a finished directory into place. An existing ``out`` is replaced only when it is
    an output of the same kind (checked again: something may have appeared since the claim)."""
    (staging / _MARKER).unlink(missing_ok=True)
    if out.is_dir() and any(out.iterdir()):
        if not is_output(out, kind):
            raise OutputError(f"{out}: appeared while this command ran and is not an output of "
                              f"`{kind.command}`; the result is kept in {staging}")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "replaced")
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.is_dir():
            out.rmdir()  # an empty directory the user made for us
        os.replace(staging, out)


@contextmanager
def atomic_directory(out: str | Path, kind: Output, resumable: bool = False,
                     publish: bool = True) -> Iterator[Path]:
    """Yield a directory to fill; it becomes ``out`` only when the block finishes.

    Call :func:`claim_output` first. A failed block leaves nothing at ``out``. With
    ``resumable`` the work directory is :func:`staging_path` and is kept after a failure, so a
    rerun can continue from its contents. ``publish=False`` (the other processes of a
    distributed run) shares the staging directory but leaves moving it into place to the main
    process.
    """
    out = Path(out)
    if not publish:
        if not resumable:
            raise ValueError("only a resumable (shared) staging directory can be left unpublished")
        yield staging_path(out)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with _holding(out):
        staging = _make_staging(out, kind, resumable)
        try:
            yield staging
        except BaseException:
            if not resumable:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        _publish(staging, out, kind)


def read_utf8(path: Path) -> str:
    """A text file's contents as UTF-8 (a byte-order mark is skipped); raises ValueError
    naming the line of the first bytes that are not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {e.start}); save the file as "
                         f"UTF-8") from None


def write_json(path: str | Path, data: object) -> None:
    """Write strict JSON atomically (a temporary file renamed over the target). Non-finite
    floats become ``null``: bare ``NaN`` is not JSON, and other tools refuse it."""
    path = Path(path)
    text = json.dumps(_finite(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
