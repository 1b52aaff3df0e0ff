"""Reading and writing records: tolerant reads, and a guarded writer that keeps finished runs (atomic, as
every file vpeft writes: ``vpeft.files``)."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from vpeft.files import STALE_TMP_SECONDS, atomic_path, remove_stale_temps, write_json_atomic, write_text_atomic
from vpeft.results.record import LEGACY_COMPUTE, RecordError, validate

log = logging.getLogger("vpeft")

__all__ = [  # the atomic writers live in vpeft.files; records are written with them
    "STALE_TMP_SECONDS", "atomic_path", "claim_path", "iter_json", "iter_records", "load_json_object", "lock_path",
    "read_record", "record_lock", "remove_stale_temps", "run_claim", "write_json_atomic", "write_record",
    "write_record_guarded", "write_text_atomic",
]  # fmt: skip


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Validate and write ``record`` atomically (strict JSON), whatever is there; runs use ``write_record_guarded``."""
    return write_json_atomic(path, validate(record), strict=True)


def lock_path(path: str | Path) -> Path:
    """The sibling lock file of a record: hidden, so record readers never see it; kept, so a lock is never lost."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextmanager
def _flock(lock: Path, waiting: str) -> Iterator[None]:
    """An exclusive flock on ``lock`` (released by the kernel if the holder dies), saying ``waiting`` if it must."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            log.info("%s", waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def record_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock per record path, across processes, held while the record is read and written."""
    with _flock(lock_path(path), f"waiting for the lock of {path}: another process is writing it"):
        yield


def claim_path(path: str | Path) -> Path:
    """The sibling claim file of a run's record (hidden, kept): held while the run is run."""
    path = Path(path)
    return path.with_name(f".{path.name}.claim")


@contextmanager
def run_claim(path: str | Path) -> Iterator[None]:
    """Held from the check for a finished record to the record written: a second process of the same run (two
    sweeps over one grid, two halving stages, a requeued array task) waits here, then finds the record and skips
    the run, so no run trains twice at once. A run that ends without a record (bad input found while it set up)
    leaves no claim and no folder behind. A folder that cannot hold the claim is left to the writability check
    that follows (its error names the fix)."""
    path = Path(path)
    claim = claim_path(path)
    made, folder = [], claim.parent  # the folders the claim creates, deepest first
    while not folder.exists() and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    held = ExitStack()
    with suppress(OSError):
        held.enter_context(_flock(claim, f"waiting: another process is running {path} (skipped if it ends ok)"))
    with held:
        try:
            yield
        finally:
            if not path.exists():
                with suppress(OSError):
                    claim.unlink()
                    for d in made:
                        d.rmdir()


def write_record_guarded(
    path: str | Path, record: dict[str, Any], check: Callable[[Any], dict[str, Any]] = validate
) -> tuple[Path, bool]:
    """Write ``record`` unless it would replace a finished run with an unfinished one; return (path, written).

    Under the record's lock, the current file is read again: an ``ok`` record is never replaced by a
    ``failed`` or ``interrupted`` one (a late failure, e.g. of a duplicate job, must not erase a result);
    then nothing is written and ``written`` is False. ``ok`` replaces ``ok`` (a deliberate rerun); a
    missing, unreadable or invalid file is replaced. ``check`` validates a record of the kind (a run record by
    default; merge, retention and sequential records have their own).
    """
    path = Path(path)
    check(record)
    with record_lock(path):
        if record["status"] != "ok":
            try:
                current = check(load_json_object(path))
            except (OSError, ValueError):
                current = None
            if current is not None and current["status"] == "ok":
                return path, False
        write_json_atomic(path, record, strict=True)
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
    """The valid record in ``path``; OSError, JSONDecodeError or RecordError (both ValueErrors) otherwise.
    A record from before records named their compute says the one it was made on (``LEGACY_COMPUTE``)."""
    record = validate(load_json_object(path))
    record.setdefault("compute", LEGACY_COMPUTE)
    return record


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
