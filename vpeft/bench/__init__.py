"""Cost measurement: parameters, delta size, FLOPs, training throughput and memory, latency.

Pure functions of a model that return dataclasses (each with ``to_dict()``); nothing here reads a
config file or chooses paths. ``benchmark`` runs them all for one (backbone, method);
``to_record_cost`` gives the dict a run record stores under ``cost``; ``bench_record`` the JSON of
a bench-only run.

The benchmark suites behind scripts/ (training speed, serving, the GPU check) live in
``vpeft.bench.suites``; they write their JSON and Markdown through ``vpeft.bench.report``.
"""

from vpeft.bench.flops import FlopReport, count_flops, measure_flops
from vpeft.bench.latency import LatencyReport, LatencyStat, Overhead, measure_latency, time_interleaved
from vpeft.bench.params import ParamReport, measure_params
from vpeft.bench.record import (
    BENCH_KIND,
    BENCH_SCHEMA_VERSION,
    BenchRecordError,
    bench_record,
    bench_record_path,
    iter_bench_records,
    read_bench_record,
    validate_bench_record,
    write_bench_record,
)
from vpeft.bench.suite import BenchConfig, BenchReport, benchmark, cost_summary, to_record_cost
from vpeft.bench.training import TrainReport, measure_training

__all__ = [
    "BENCH_KIND",
    "BENCH_SCHEMA_VERSION",
    "BenchConfig",
    "BenchRecordError",
    "BenchReport",
    "FlopReport",
    "LatencyReport",
    "LatencyStat",
    "Overhead",
    "ParamReport",
    "TrainReport",
    "bench_record",
    "bench_record_path",
    "benchmark",
    "cost_summary",
    "count_flops",
    "iter_bench_records",
    "measure_flops",
    "measure_latency",
    "measure_params",
    "measure_training",
    "read_bench_record",
    "time_interleaved",
    "to_record_cost",
    "validate_bench_record",
    "write_bench_record",
]
