"""``python run.py ...``: the config picks a job, the job runner runs it.

``run.py`` at the project root calls ``main(cfg)``. A training run is the default;
``bench.only=true`` measures a (backbone, method) without training; ``job=merge`` merges the
deltas of trained runs (conf/merge/). Everything below the jobs
(backbones, data, methods, engine, bench, results, compose) takes plain objects.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from vpeft.jobs import InputError, Plan, entered, mark_entered, run_job
from vpeft.jobs.train import NOT_HASHED, NOT_HASHED_TRAINER, TrainJob, backbone_id, dataset_id, plan_run

__all__ = [
    "NOT_HASHED", "NOT_HASHED_TRAINER", "InputError", "Plan", "backbone_id", "dataset_id", "entered", "main",
    "mark_entered", "plan_run",
]  # fmt: skip


JOBS = ("train", "merge")


def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Run the job the config asks for and write its record; return the record."""
    kind = str(cfg.get("job", "train"))
    if kind not in JOBS:
        import sys

        mark_entered()
        print(f"error: unknown job={kind}; jobs: {', '.join(JOBS)} (bench.only=true measures without training)",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    if kind == "merge":
        from vpeft.jobs.merge import MergeJob

        return run_job(MergeJob(), cfg)
    if cfg.get("bench", {}).get("only", False):
        from vpeft.jobs.bench import BenchJob

        return run_job(BenchJob(), cfg)
    return run_job(TrainJob(), cfg)
