"""A Hydra callback that sums up a sweep: how many runs finished, were skipped, failed or had bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vpeft.jobs.runner import STATUS_FILE, mark_entered

__all__ = ["STATUS_FILE", "SweepSummary", "summarize"]


def summarize(sweep_dir: str | Path) -> dict[str, Any]:
    """Read every job's status file under a sweep folder (works for any launcher on a shared disk)."""
    jobs = []
    for path in sorted(Path(sweep_dir).glob(f"*/{STATUS_FILE}")):
        try:
            jobs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    count = {s: sum(j["status"] == s for j in jobs) for s in ("ok", "failed", "interrupted", "bad_input")}
    return {
        "jobs": len(jobs),
        **count,
        "skipped": sum(bool(j.get("skipped")) for j in jobs),
        "failures": [j for j in jobs if j["status"] not in ("ok", "bad_input")],
        "bad_input": [j for j in jobs if j["status"] == "bad_input"],
    }


class SweepSummary(Callback):
    """Sums the sweep up at its end; the sweep exits 2 when any job had bad input (no network, missing data, a
    config error: no record, fix the input and run the sweep again), else 1 when any failed or was interrupted."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        mark_entered()  # from here on an exit 1 is the sweep's verdict, not a config error

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        s = summarize(config.hydra.sweep.dir)
        bad = s["bad_input"]
        print(
            f"sweep: {s['jobs']} runs: {s['ok']} ok ({s['skipped']} skipped as already finished), "
            f"{s['failed']} failed, {s['interrupted']} interrupted"
            + (f", {len(bad)} bad input (no record; fix the input and run the sweep again)" if bad else "")
        )
        for job in s["failures"]:
            print(f"  {job['status']}: {job.get('record') or job.get('overrides')}: {(job.get('error') or '')[:200]}")
        by_error: dict[str, list[str]] = {}
        for job in bad:  # one error (no network, say) often stops many jobs: it is said once, with its jobs
            by_error.setdefault(job.get("error") or "", []).append(" ".join(job.get("overrides") or []))
        for error, jobs in by_error.items():
            print(f"  bad input ({len(jobs)} {'run' if len(jobs) == 1 else 'runs'}): {error}")
            for overrides in jobs:
                print(f"    {overrides}")
        if bad or s["failures"]:
            raise SystemExit(2 if bad else 1)
