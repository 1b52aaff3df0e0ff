"""The merge record: one JSON per (backbone, method, algorithm, space, task pool, config).

Written by the merge job (``python run.py job=merge ...``), read by the leaderboard's composition
section. Layout (``kind`` "merge", ``schema_version`` 1)::

    kind, schema_version, status, error, method, backbone, algorithm, space, tasks [names],
    seed, config_hash, params {chosen values}, selection {rule, grid [{params, val_top1 {task: top1}, mean}]},
    per_task {task: {top1, individual_top1, normalized, val_top1, eval_split, delta_file, record}},
    metrics {mean_top1, mean_individual_top1, mean_normalized}, cost {merge_seconds, eval_seconds},
    env, config, overrides, started_at, finished_at
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vpeft.results.record import RecordError
from vpeft.results.store import iter_json, load_json_object

MERGE_KIND = "merge"
MERGE_SCHEMA_VERSION = 1
_REQUIRED = ("kind", "schema_version", "status", "method", "backbone", "algorithm", "space", "tasks", "seed",
             "config_hash", "params", "per_task", "metrics", "env", "config")  # fmt: skip
_STATUSES = ("ok", "failed", "interrupted")


def validate_merge_record(record: Any) -> dict[str, Any]:
    """Raise RecordError naming the first problem unless ``record`` is a merge record; return it."""
    if not isinstance(record, dict):
        raise RecordError("a merge record is a JSON object")
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise RecordError(f"merge record: missing keys {missing}")
    if record["kind"] != MERGE_KIND or record["schema_version"] != MERGE_SCHEMA_VERSION:
        raise RecordError(f"merge record: kind {record['kind']!r} v{record['schema_version']} is not merge v1")
    if record["status"] not in _STATUSES:
        raise RecordError(f"merge record.status: {record['status']!r} is not one of {_STATUSES}")
    if not isinstance(record["tasks"], list) or not all(isinstance(t, str) for t in record["tasks"]):
        raise RecordError("merge record.tasks: a list of task names")
    if record["status"] == "ok":
        for key in ("mean_top1", "mean_normalized"):
            if not isinstance(record["metrics"].get(key), (int, float)):
                raise RecordError(f"merge record: status ok without metrics.{key}")
    elif not record.get("error"):
        raise RecordError(f"merge record: status {record['status']} needs an error message")
    return record


def read_merge_record(path: str | Path) -> dict[str, Any]:
    return validate_merge_record(load_json_object(path))


def iter_merge_records(root: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every valid merge record under ``root``; others are skipped with a warning."""
    return iter_json(root, read_merge_record)
