"""Reading and writing records: atomic writes, tolerant reads, and a guarded writer that keeps finished runs."""

from __future__ import annotations

import fcntl
import glob
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vpeft.results.record import RecordError, validate

# A temp file older than this is a leftover of a killed writer (a write takes seconds): removed on the next write.
STALE_TMP_SECONDS = 3600.0


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask would, briefly, for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temps(path: str | Path, max_age: float = STALE_TMP_SECONDS) -> list[Path]:
    """Delete ``.<name>.*.tmp`` beside ``path`` older than ``max_age`` seconds: a kill -9 mid-write leaves them."""
    path = Path(path)
    cutoff = time.time() - max_age
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # another writer cleaned it up first
            pass
    return removed


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write; on success it gets the usual mode, is fsynced and renamed
    over ``path``, so readers see the old file or the new one, never a partial one. On error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600: files on a shared disk must stay readable
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON, written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Validate and write ``record`` atomically, whatever is there; runs use ``write_record_guarded``."""
    return write_json_atomic(path, validate(record))


def lock_path(path: str | Path) -> Path:
    """The sibling lock file of a record: hidden, so record readers never see it; kept, so a lock is never lost."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextmanager
def record_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock per record path, across processes (flock; released by the kernel if the holder dies)."""
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def write_record_guarded(path: str | Path, record: dict[str, Any]) -> tuple[Path, bool]:
    """Write ``record`` unless it would replace a finished run with an unfinished one; return (path, written).

    Under the record's lock, the current file is read again: an ``ok`` record is never replaced by a
    ``failed`` or ``interrupted`` one (a late failure, e.g. of a duplicate job, must not erase a result);
    then nothing is written and ``written`` is False. ``ok`` replaces ``ok`` (a deliberate rerun); a
    missing, unreadable or invalid file is replaced.
    """
    path = Path(path)
    validate(record)
    with record_lock(path):
        if record["status"] != "ok":
            try:
                current = read_record(path)
            except (OSError, ValueError):
                current = None
            if current is not None and current["status"] == "ok":
                return path, False
        write_json_atomic(path, record)
    return path, True


def _kind(obj: Any) -> str:
    return "null" if obj is None else {list: "an array", str: "a string", bool: "a boolean"}.get(type(obj), "a number")


def load_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path``; RecordError when the file holds another JSON value (null, a number, a list)."""
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    if not isinstance(obj, dict):
        raise RecordError(f"{path} holds {_kind(obj)}, not a JSON object")
    return obj


def read_record(path: str | Path) -> dict[str, Any]:
    """The valid record in ``path``; OSError, JSONDecodeError or RecordError (both ValueErrors) otherwise."""
    return validate(load_json_object(path))


def iter_json(root: str | Path, read: Callable[[Path], dict[str, Any]]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``read`` of every JSON file under ``root``, sorted by path; files it refuses are skipped with a warning."""
    for path in sorted(Path(root).rglob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            obj = read(path)
            if not isinstance(obj, dict):  # a reader that does not check: the callers index it as an object
                raise RecordError(f"{path} holds {_kind(obj)}, not a JSON object")
        except (OSError, ValueError) as e:  # JSONDecodeError and the schema errors are ValueErrors
            why = str(e) if str(path) in str(e) else f"{path}: {e}"
            warnings.warn(f"skipping {why}", stacklevel=2)
            continue
        yield path, obj


def iter_records(root: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every valid run record under ``root``."""
    return iter_json(root, read_record)
