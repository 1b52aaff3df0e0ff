"""The retention record: what adapting a backbone to one task kept of its features on other tasks.

Written by the retention job (``python run.py job=retention ...``), read by the leaderboard. Layout
(``kind`` "retention", ``schema_version`` 1)::

    kind, schema_version, status, error, method, backbone, dataset, protocol, seed, config_hash,
    run {record, delta_file, config_hash, top1}, probe {tasks [names], k, temperature, left_out [own task]},
    per_task {task: {bare_top1, adapted_top1, retention, n_train, n_test, train_split, eval_split}},
    metrics {mean_retention, target_top1}, cost {feature_seconds, bare_cache_hits}, env, config, overrides,
    started_at, finished_at
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vpeft.results.record import RecordError
from vpeft.results.store import iter_json, load_json_object

RETENTION_KIND = "retention"
RETENTION_SCHEMA_VERSION = 1
_REQUIRED = ("kind", "schema_version", "status", "error", "method", "backbone", "dataset", "protocol", "seed",
             "config_hash", "run", "probe", "per_task", "metrics", "env", "config")  # fmt: skip
_STATUSES = ("ok", "failed", "interrupted")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_retention_record(record: Any) -> dict[str, Any]:
    """Raise RecordError naming the first problem unless ``record`` is a retention record; return it."""
    if not isinstance(record, dict):
        raise RecordError("a retention record is a JSON object")
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise RecordError(f"retention record: missing keys {missing}")
    if record["kind"] != RETENTION_KIND or record["schema_version"] != RETENTION_SCHEMA_VERSION:
        raise RecordError(f"retention record: kind {record['kind']!r} v{record['schema_version']} is not retention v1")
    if record["status"] not in _STATUSES:
        raise RecordError(f"retention record.status: {record['status']!r} is not one of {_STATUSES}")
    if record["status"] != "ok":
        if not record.get("error"):
            raise RecordError(f"retention record: status {record['status']} needs an error message")
        return record
    if not _finite(record["metrics"].get("mean_retention")):
        raise RecordError("retention record: status ok without a finite metrics.mean_retention")
    for task, p in record["per_task"].items():
        for key in ("bare_top1", "adapted_top1"):
            if not (_finite(p.get(key)) and 0 <= p[key] <= 100):
                raise RecordError(f"retention record.per_task.{task}.{key}: {p.get(key)!r} is not a top-1 (%)")
    return record


def read_retention_record(path: str | Path) -> dict[str, Any]:
    return validate_retention_record(load_json_object(path))


def iter_retention_records(root: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every valid retention record under ``root``; others are skipped with a warning."""
    return iter_json(root, read_retention_record)
