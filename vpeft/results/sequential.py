"""The sequential record: task A's top-1 before and after its run was continued on task B.

Written by the sequential job (``python run.py job=sequential ...``). Layout (``kind`` "sequential",
``schema_version`` 1)::

    kind, schema_version, status, error, method, backbone, tasks [A, B], seed, config_hash,
    first {task, record, delta_file, record_top1, top1_before, top1_after, eval_split},
    second {task, top1, train_loss, epochs, eval_split, alone_record, alone_top1},
    metrics {forgetting, a_before, a_after, b_top1, b_alone_top1}, cost {train_seconds, trainable},
    env, config, overrides, started_at, finished_at
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vpeft.results.record import RecordError
from vpeft.results.store import iter_json, load_json_object

SEQUENTIAL_KIND = "sequential"
SEQUENTIAL_SCHEMA_VERSION = 1
_REQUIRED = ("kind", "schema_version", "status", "error", "method", "backbone", "tasks", "seed", "config_hash",
             "first", "second", "metrics", "env", "config")  # fmt: skip


def validate_sequential_record(record: Any) -> dict[str, Any]:
    """Raise RecordError naming the first problem unless ``record`` is a sequential record; return it."""
    if not isinstance(record, dict):
        raise RecordError("a sequential record is a JSON object")
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise RecordError(f"sequential record: missing keys {missing}")
    if record["kind"] != SEQUENTIAL_KIND or record["schema_version"] != SEQUENTIAL_SCHEMA_VERSION:
        raise RecordError(f"sequential record: kind {record['kind']!r} v{record['schema_version']} is not "
                          "sequential v1")  # fmt: skip
    if record["status"] not in ("ok", "failed", "interrupted"):
        raise RecordError(f"sequential record.status: {record['status']!r}")
    if record["status"] != "ok":
        if not record.get("error"):
            raise RecordError(f"sequential record: status {record['status']} needs an error message")
        return record
    for key in ("a_before", "a_after", "b_top1"):
        v = record["metrics"].get(key)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 100):
            raise RecordError(f"sequential record.metrics.{key}: {v!r} is not a top-1 (%)")
    return record


def read_sequential_record(path: str | Path) -> dict[str, Any]:
    return validate_sequential_record(load_json_object(path))


def iter_sequential_records(root: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    return iter_json(root, read_sequential_record)
