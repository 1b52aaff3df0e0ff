"""Reading and writing records: atomic writes, tolerant reads."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vpeft.results.record import validate


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: records on a shared disk must stay readable
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON, written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    return write_json_atomic(path, validate(record))


def read_record(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        return validate(json.load(f))


def iter_json(root: str | Path, read: Callable[[Path], dict[str, Any]]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``read`` of every JSON file under ``root``, sorted by path; files it refuses are skipped with a warning."""
    for path in sorted(Path(root).rglob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            yield path, read(path)
        except (OSError, ValueError) as e:  # JSONDecodeError and the schema errors are ValueErrors
            warnings.warn(f"skipping {path}: {e}", stacklevel=2)


def iter_records(root: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every valid run record under ``root``."""
    return iter_json(root, read_record)
