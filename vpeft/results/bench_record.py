"""The bench record: one JSON per (device, backbone, method, config) with every cost measured.

Its schema, path, reading and writing; ``vpeft.bench.bench_record`` builds one from a measurement.

Layout (``kind`` "bench", ``schema_version`` 1)::

    kind, schema_version, created_at, method, method_config, mergeable, backbone, input_size,
    env {device, device_name, torch, timm, ...},
    params {trainable, trainable_excl_head, total, delta_bytes, backbone_total},
    flops {flops, macs, input_size, by_op, baseline_flops, ratio} | null,
    latency {results[], overhead[], headline_variant, batches, dtypes, warmup, iters, ...} | null,
    latency_overhead (headline variant, first dtype and batch) | null,
    training {images_per_s, peak_mem_mb, peak_mem_kind, batch_size, steps, dtype, ...} | null,
    config (the resolved BenchConfig)

Bench records live in their own folder: run-record readers skip them and vice versa.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vpeft.errors import VpeftError
from vpeft.files import path_part, write_json_atomic
from vpeft.results.store import iter_json

BENCH_KIND = "bench"
BENCH_SCHEMA_VERSION = 1
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "kind": str,
    "schema_version": int,
    "method": str,
    "method_config": dict,
    "mergeable": bool,
    "backbone": str,
    "input_size": list,
    "env": dict,
    "params": dict,
    "flops": (dict, type(None)),
    "latency": (dict, type(None)),
    "latency_overhead": (float, int, type(None)),
    "training": (dict, type(None)),
    "config": dict,
}
_PARAMS = ("trainable", "trainable_excl_head", "total", "delta_bytes", "backbone_total")
_ENV = ("device", "device_name", "torch", "timm")


class BenchRecordError(VpeftError, ValueError):
    """A bench record that does not follow the schema."""


def validate_bench_record(record: dict[str, Any]) -> dict[str, Any]:
    """Raise BenchRecordError naming the first problem unless ``record`` is a bench record; return it."""
    if not isinstance(record, dict):
        raise BenchRecordError("a bench record is a JSON object")
    for key, kind in _REQUIRED.items():
        if key not in record:
            raise BenchRecordError(f"bench record: missing key {key!r}")
        if not isinstance(record[key], kind) or (kind is int and isinstance(record[key], bool)):
            raise BenchRecordError(f"bench record.{key}: {record[key]!r} has the wrong type")
    if record["kind"] != BENCH_KIND:
        raise BenchRecordError(f"bench record: kind {record['kind']!r} is not {BENCH_KIND!r}")
    if record["schema_version"] != BENCH_SCHEMA_VERSION:
        raise BenchRecordError(f"bench record: schema_version {record['schema_version']} is not {BENCH_SCHEMA_VERSION}")
    for group, keys in (("params", _PARAMS), ("env", _ENV)):
        missing = [k for k in keys if k not in record[group]]
        if missing:
            raise BenchRecordError(f"bench record.{group}: missing {missing}")
    return record


def bench_record_path(root: str | Path, record: dict[str, Any]) -> Path:
    """``<root>/<device>-<device name>/<backbone>/<method>-<config hash>.json``."""
    key = json.dumps({"method_config": record["method_config"], "input_size": record["input_size"]}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    env = record["env"]
    device = path_part(f"{env['device']}-{env['device_name']}")
    return Path(root) / device / path_part(record["backbone"]) / f"{path_part(record['method'])}-{digest}.json"


def write_bench_record(path: str | Path, record: dict[str, Any]) -> Path:
    return write_json_atomic(path, validate_bench_record(record))


def read_bench_record(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        return validate_bench_record(json.load(f))


def iter_bench_records(root: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every valid bench record under ``root``, sorted by path; others are skipped with a warning."""
    return iter_json(root, read_bench_record)
