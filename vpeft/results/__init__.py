"""Run records, their store, the records as pandas DataFrames, and the leaderboard built from them."""

from vpeft.results.frame import latency_frame, load_bench_records, load_records
from vpeft.results.record import SCHEMA_VERSION, RecordError, config_hash, record_path, validate
from vpeft.results.store import (
    iter_records,
    read_record,
    run_claim,
    write_json_atomic,
    write_record,
    write_record_guarded,
)

__all__ = [
    "SCHEMA_VERSION",
    "RecordError",
    "config_hash",
    "iter_records",
    "latency_frame",
    "load_bench_records",
    "load_records",
    "read_record",
    "record_path",
    "run_claim",
    "validate",
    "write_json_atomic",
    "write_record",
    "write_record_guarded",
]
