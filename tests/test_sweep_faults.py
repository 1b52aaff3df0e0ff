"""A sweep under faults, with real processes and real signals: a stopped sweep stops (its workers too), one bad value
does not take it down, and two sweeps started at the same moment never share a folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vpeft.results import read_record

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["backbone=vit_tiny_random", "dataset=digits", "protocol=tune", "trainer.warmup_epochs=0",
         "bench.latency=false", "save_delta=false"]  # fmt: skip
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
# the sweep as `python run.py -m ...` starts it, under a clock frozen at one instant: every sweep (and run) started
# with it starts "in the same second", and in the same microsecond too
FROZEN_CLOCK = f"""
import datetime, runpy, sys
import hydra.core.utils
class Frozen(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 1, 2, 3, 4, 5, 678901)
hydra.core.utils.datetime = Frozen  # what Hydra's ${{now:...}} reads
sys.path.insert(0, {str(ROOT)!r})
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start(tmp: Path, *args: str, sweep: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "run.py"), *(["-m", f"hydra.sweep.dir={tmp / 'sweep'}"] if sweep else []),
           f"paths.results={tmp / 'runs'}", f"paths.cache={tmp / 'cache'}", *args]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def signal_when(proc: subprocess.Popen, needle: str, sig: int, timeout: float = 300) -> str:
    """Send ``sig`` to the sweep's process (not its group) once ``needle`` appears in the output; return all of it."""
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            proc.send_signal(sig)
            break
        assert time.monotonic() < deadline, "".join(seen)
    seen.append(proc.communicate(timeout=300)[0])
    return "".join(seen)


def files_and_times(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def statuses(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/vpeft_status.json"))]


def summary_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("sweep:"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_stopped_sweep_stops_its_jobs_and_says_what_ran(launcher, sig, tmp_path):
    """kill (or a scheduler) and Ctrl-C: the running jobs record interrupted, no other job starts, the summary names
    each job, the sweep exits 128 + the signal and nothing is written after it exits (joblib's workers stop too)."""
    workers = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    proc = start(tmp_path, *QUICK, *workers, "trainer.epochs=400", "trainer.progress=true", "method=linear,bitfit",
                 "seed=0,1")  # fmt: skip
    out = signal_when(proc, "training epoch 1/400", sig)
    assert proc.returncode == 128 + sig, out[-3000:]
    after_exit = files_and_times(tmp_path)
    time.sleep(6)  # a worker left running would write its record (or its status file) now
    assert files_and_times(tmp_path) == after_exit, "files were written after the sweep had exited"
    assert "Traceback" not in out, out[-3000:]

    records = [read_record(p) for p in sorted((tmp_path / "runs").rglob("*.json"))]
    assert 1 <= len(records) <= (1 if launcher == "basic" else 2), out[-3000:]
    why = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    for record in records:
        assert record["status"] == "interrupted" and why in record["error"], record["error"]
    jobs = statuses(tmp_path / "sweep")
    assert sorted(j["status"] for j in jobs) == ["interrupted"] * len(records)
    n = len(records)
    name = signal.Signals(sig).name
    assert summary_line(out) == (f"sweep: 4 runs: 0 ok (0 skipped as already finished), 0 failed, {n} interrupted, "
                                 f"{4 - n} not run (stopped by {name})")  # fmt: skip
    listed = out[out.index("sweep: 4 runs") :]
    for job in jobs:  # named by the values the sweep varies
        assert "interrupted: " + " ".join(o for o in job["overrides"] if o.startswith(("method=", "seed="))) in listed
    assert listed.count("\n    method=") == 4 - n, listed  # the jobs that never ran, one line each
    if launcher == "basic":  # the jobs run in the sweep's process: the last one was never even set up
        assert not (tmp_path / "sweep" / "3").exists()


@pytest.mark.slow
def test_a_typo_in_one_sweep_value_leaves_the_others_running(tmp_path):
    """A config-group option that does not exist is found before any job starts; the valid jobs run, the bad ones
    are named with the fix, and the sweep exits 2 at the end."""
    proc = start(tmp_path, *QUICK, "trainer.epochs=1", "method=linear,bitfti,nonexistent")
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert summary_line(out) == ("sweep: 3 runs: 1 ok (0 skipped as already finished), 0 failed, 0 interrupted, "
                                 "2 bad input (no record; fix the input and run the sweep again)")  # fmt: skip
    assert "unknown method=bitfti; did you mean method=bitfit?" in out
    assert "unknown method=nonexistent (method options: " in out and "lora" in out.split("nonexistent (method")[1]
    # said before the first job started, and again in the summary
    assert out.index("unknown method=bitfti") < out.index("training") < out.rindex("unknown method=bitfti")
    [record] = [read_record(p) for p in (tmp_path / "runs").rglob("*.json")]
    assert record["method"] == "linear" and record["status"] == "ok"
    assert [j["status"] for j in statuses(tmp_path / "sweep")] == ["ok"]


@pytest.mark.slow
def test_sweeps_and_runs_started_at_once_never_share_a_folder(tmp_path):
    """Two sweeps and two single runs started in the same second (the same microsecond): each has its own folder,
    its own status files and its own summary."""
    common = [*QUICK, "trainer.epochs=1", "method=linear", f"paths.results={tmp_path / 'runs'}",
              f"paths.cache={tmp_path / 'cache'}"]  # fmt: skip
    cmds = {
        "sweep_a": ["-m", *common, "seed=0,1"],
        "sweep_b": ["-m", *common, "seed=2,3"],
        "run_a": [*common, "seed=4"],
        "run_b": [*common, "seed=5"],
    }
    frozen = [sys.executable, "-c", FROZEN_CLOCK, str(ROOT / "run.py")]
    out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    procs = {name: subprocess.Popen([*frozen, *args], cwd=tmp_path, env=ENV, **out) for name, args in cmds.items()}
    outs = {name: p.communicate(timeout=600)[0] for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, name + ": " + outs[name][-3000:]
    clean = "sweep: 2 runs: 2 ok (0 skipped as already finished), 0 failed, 0 interrupted"
    assert summary_line(outs["sweep_a"]) == summary_line(outs["sweep_b"]) == clean

    sweeps = sorted(p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir())
    assert len(sweeps) == 2, sweeps
    assert all(p.parent.name == "2026-01-02" and p.name.startswith("03-04-05") for p in sweeps), sweeps
    seeds = sorted(sorted(o for j in statuses(p) for o in j["overrides"] if o.startswith("seed=")) for p in sweeps)
    assert seeds == [["seed=0", "seed=1"], ["seed=2", "seed=3"]]
    runs = sorted(p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir())
    assert len(runs) == 2 and all(p.name.startswith("03-04-05") for p in runs), runs
    assert len(list((tmp_path / "runs").rglob("*.json"))) == 6
