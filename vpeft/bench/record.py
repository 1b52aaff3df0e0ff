"""A bench record from a measurement: ``bench_record(report, backbone, env)``.

The record's layout, schema check, path and store are ``vpeft.results.bench_record``'s, below the
suites, so that the results read bench records without importing the suites that measure them.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from vpeft.bench.suite import BenchReport
from vpeft.errors import VpeftError
from vpeft.results.bench_record import (
    BENCH_KIND,
    BENCH_SCHEMA_VERSION,
    BenchRecordError,
    bench_record_path,
    iter_bench_records,
    read_bench_record,
    validate_bench_record,
    write_bench_record,
)

__all__ = [  # the record's schema, path and store live in vpeft.results.bench_record, below the suites
    "BENCH_KIND", "BENCH_SCHEMA_VERSION", "BenchRecordError", "bench_record", "bench_record_path",
    "iter_bench_records", "read_bench_record", "validate_bench_record", "write_bench_record",
]  # fmt: skip


def bench_record(report: BenchReport, backbone: str, env: dict[str, Any]) -> dict[str, Any]:
    """The JSON a bench run writes: ``report`` plus the backbone id and the environment (vpeft.env)."""
    if report.method is None:
        raise VpeftError("a bench record describes a method: benchmark a model with vpeft.apply_method applied")
    d = report.to_dict()
    record = {
        "kind": BENCH_KIND,
        "schema_version": BENCH_SCHEMA_VERSION,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "method": report.method,
        "method_config": report.method_config or {},
        "mergeable": report.mergeable,
        "backbone": backbone,
        "input_size": d["input_size"],
        "env": {**env, "device": report.device, "device_name": report.device_name},
        "params": d["params"],
        "flops": d["flops"],
        "latency": d["latency"],
        "latency_overhead": d["latency_overhead"],
        "training": d["training"],
        "config": d["config"],
    }
    return validate_bench_record(json.loads(json.dumps(record, default=str)))
