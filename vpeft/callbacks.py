"""A Hydra callback that sums up a sweep: how many runs finished, were skipped or failed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

STATUS_FILE = "vpeft_status.json"


def summarize(sweep_dir: str | Path) -> dict[str, Any]:
    """Read every job's status file under a sweep folder (works for any launcher on a shared disk)."""
    jobs = []
    for path in sorted(Path(sweep_dir).glob(f"*/{STATUS_FILE}")):
        try:
            jobs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    count = {s: sum(j["status"] == s for j in jobs) for s in ("ok", "failed", "interrupted")}
    return {
        "jobs": len(jobs),
        **count,
        "skipped": sum(bool(j.get("skipped")) for j in jobs),
        "failures": [j for j in jobs if j["status"] != "ok"],
    }


class SweepSummary(Callback):
    """Sums the sweep up at its end; the sweep exits 1 when any job failed or was interrupted."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from vpeft.run import mark_entered

        mark_entered()  # from here on an exit 1 is the sweep's verdict, not a config error

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        s = summarize(config.hydra.sweep.dir)
        print(
            f"sweep: {s['jobs']} runs: {s['ok']} ok ({s['skipped']} skipped as already finished), "
            f"{s['failed']} failed, {s['interrupted']} interrupted"
        )
        for job in s["failures"]:
            print(f"  {job['status']}: {job.get('record') or job.get('overrides')}: {(job.get('error') or '')[:200]}")
        if s["failures"]:
            raise SystemExit(1)
