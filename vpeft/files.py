"""Writing files so that a reader never sees half of one: temp file beside it, fsync, rename.

Every file vpeft writes (records, delta files, hyperparameter files, reports) goes through here.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def slug(text: str) -> str:
    """A name fit for a file or page anchor: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def path_part(text: str) -> str:
    """One folder or file name of a record's path, readable and stable: 'vit_b16+in21k' keeps its dots,
    dashes and underscores; anything else becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "none"


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


def non_finite(obj: Any, where: str = "") -> Iterator[tuple[str, float]]:
    """The dotted key and value of every NaN or infinite float in ``obj``: strict JSON has no literal for them
    (Python writes ``NaN``, which other readers refuse)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        yield where, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from non_finite(value, f"{where}.{key}" if where else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from non_finite(value, f"{where}[{i}]")


def null_non_finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON null)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: null_non_finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [null_non_finite(value) for value in obj]
    return obj


def write_json_atomic(path: str | Path, obj: Any, strict: bool = False) -> Path:
    """``obj`` as indented JSON, written atomically; ``strict``: refuse NaN and Infinity, naming the key."""
    bad = next(non_finite(obj), None) if strict else None
    if bad is not None:
        raise ValueError(f"{path}: {bad[0]} is {bad[1]}, which strict JSON cannot hold; store null (None) instead")
    text = json.dumps(obj, indent=2, sort_keys=False, default=str, allow_nan=not strict)
    return write_text_atomic(path, text + "\n")


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` and a small file in it, then remove both: OSError (EACCES, EROFS, ENOSPC) now, before
    hours of work, rather than when a result is to be written. The folders it made are removed again, so a job
    that then stops on bad input leaves nothing behind (the record's writer makes them when it writes)."""
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-", suffix=".tmp") as f:
            f.write(b"vpeft\n")  # a block to allocate: a full disk refuses it
            f.flush()
            os.fsync(f.fileno())
    finally:
        for p in made:  # deepest first; one another process filled meanwhile stays
            try:
                p.rmdir()
            except OSError:
                break
