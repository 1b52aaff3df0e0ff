"""Sweeps on a real SLURM cluster (one node, started here): job arrays, time limits, requeues, concurrent sweeps.

Every test goes through ``run.py -m hydra/launcher=slurm`` (submitit) with the tiny CPU configuration
and checks what a user would: the records' statuses, the sweep's summary and exit status, the files
left in the results folder and the data cache. The cluster has accounting disabled, as many small
ones do. Without root or without Debian's SLURM packages (scripts/sysdeps.sh installs them) the
tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import Cluster, why_not
from test_sweep import tiny_tasks

from vpeft.results import read_record

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["backbone=vit_tiny_random", "trainer.epochs=1", "trainer.warmup_epochs=0", "bench.latency=false",
         "trainer.progress=false", "protocol=tune", "dataset=folder"]  # fmt: skip
# the project's SLURM launcher, sized for the test node (no GPU, little memory)
SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=null",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]  # fmt: skip
STALL = ["bench.latency=true", "bench.iters=100000", "bench.warmup=0", "bench.batches=[1]"]  # costs never end

on_cluster = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = why_not()
    if why:
        pytest.skip(why)
    c = Cluster(tmp_path_factory.mktemp("slurm"), cpus=4, kill_wait=10).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return tiny_tasks(tmp_path_factory.mktemp("tasks"))


def start_sweep(cluster: Cluster, tmp: Path, sweep: str, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", *SLURM, *QUICK, *args, f"paths.results={tmp / 'runs'}",
           f"paths.cache={tmp / 'cache'}", f"hydra.sweep.dir={tmp / sweep}"]  # fmt: skip
    env = {**cluster.env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, exit_code: int, timeout: float = 400) -> str:
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == exit_code, out[-5000:]
    assert "Bypassing sacct error" not in out  # accounting disabled: said once, not at every poll
    assert out.count("sacct is not available") <= 1, out[-3000:]
    return out


def sweep(cluster: Cluster, tmp: Path, sweep_dir: str, *args: str, exit_code: int = 0) -> str:
    return finish(start_sweep(cluster, tmp, sweep_dir, *args), exit_code)


def summary(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("sweep:"))


def records(tmp: Path) -> dict[Path, dict]:
    return {p: read_record(p) for p in sorted((tmp / "runs").rglob("*.json"))}


def job_logs(tmp: Path, sweep_dir: str) -> dict[str, str]:
    """SLURM job id (array_task) -> its log (all attempts, appended)."""
    return {p.name.rsplit("_", 2)[0]: p.read_text() for p in (tmp / sweep_dir / ".submitit").glob("*/*_0_log.out")}


def err_logs(tmp: Path, sweep_dir: str) -> dict[str, str]:
    """SLURM job id (array_task) -> its stderr (where the progress lines go)."""
    return {p.name.rsplit("_", 2)[0]: p.read_text() for p in (tmp / sweep_dir / ".submitit").glob("*/*_0_log.err")}


def array_id(tmp: Path, sweep_dir: str, proc: subprocess.Popen) -> str:
    """The sweep's job array id, from its own submitit folder (the cluster lists earlier tests' jobs too)."""
    scripts = wait_for(lambda: list((tmp / sweep_dir / ".submitit").glob("*/*_submission.sh")), "sbatch", proc=proc)
    return scripts[0].name.split("_")[0]


def wait_for(cond, what: str, timeout: float = 240, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended while waiting for {what}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


GRID = ["method=linear,bitfit", "seed=0,1"]  # x 2 task folders = 8 runs


@on_cluster
@pytest.mark.slow
def test_an_array_of_8_runs_with_parallelism_2(cluster, tasks, tmp_path):
    proc = start_sweep(cluster, tmp_path, "sweep", *GRID, f"dataset.root={tasks[0]},{tasks[1]}",
                       "hydra.launcher.array_parallelism=2")  # fmt: skip
    most = 0
    while proc.poll() is None:  # what SLURM runs at once
        states = [s for j, s in cluster.jobs().items() if s == "RUNNING"]
        most = max(most, len(states))
        time.sleep(0.5)
    out = finish(proc, 0)
    assert summary(out) == "sweep: 8 runs: 8 ok (0 skipped as already finished), 0 failed, 0 interrupted"
    assert most == 2, f"{most} jobs ran at once"
    [script] = (tmp_path / "sweep" / ".submitit").glob("*/*_submission.sh")
    assert "#SBATCH --array=0-7%2" in script.read_text()
    logs = job_logs(tmp_path, "sweep")
    assert len(logs) == 8 and len({j.split("_")[0] for j in logs}) == 1, "one job array of 8 tasks"
    recs = records(tmp_path)
    assert len(recs) == 8 and all(r["status"] == "ok" for r in recs.values())
    assert {(r["dataset"], r["method"], r["seed"]) for r in recs.values()} == {
        (t, m, s) for t in ("task_a", "task_b") for m in ("linear", "bitfit") for s in (0, 1)
    }
    assert "sacct is not available (Slurm accounting storage is disabled): job states come from squeue" in out


@on_cluster
@pytest.mark.slow
def test_a_packed_sweep_runs_each_pack_as_one_job(cluster, tasks, tmp_path):
    """pack=4: two tasks x two learning rates are one pack, one SLURM job, four records as runs alone leave."""
    out = sweep(cluster, tmp_path, "sweep", "method=bitfit", "optim.lr=1e-3,1e-2",
                f"dataset.root={tasks[0]},{tasks[1]}", "pack=4")  # fmt: skip
    assert summary(out) == "sweep: 4 runs: 4 ok (0 skipped as already finished), 0 failed, 0 interrupted"
    assert len(list((tmp_path / "sweep" / ".submitit").glob("*/*_submission.sh"))) == 1  # one SLURM job
    assert len(job_logs(tmp_path, "sweep")) == 1
    recs = records(tmp_path)
    assert len(recs) == 4 and {r["cost"]["packed"]["k"] for r in recs.values()} == {4}
    assert {(r["dataset"], r["config"]["optim"]["lr"]) for r in recs.values()} == {
        (t, lr) for t in ("task_a", "task_b") for lr in (1e-3, 1e-2)
    }


_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"


def _times(log: str, pattern: str) -> list[float]:
    import datetime as dt

    return [dt.datetime.strptime(m, "%Y-%m-%d %H:%M:%S,%f").timestamp() for m in re.findall(pattern, log)]


@on_cluster
@pytest.mark.slow
def test_two_identical_sweeps_at_once_share_results_and_a_cold_cache(cluster, tasks, tmp_path):
    args = [*GRID, f"dataset.root={tasks[0]},{tasks[1]}", "hydra.launcher.array_parallelism=2"]
    procs = [start_sweep(cluster, tmp_path, name, *args) for name in ("sweep_a", "sweep_b")]
    outs = [finish(p, 0) for p in procs]
    skipped = [int(re.search(r"8 ok \((\d+) skipped", summary(o)).group(1)) for o in outs]
    recs = records(tmp_path)
    assert len(recs) == 8 and all(r["status"] == "ok" for r in recs.values())
    # nothing half-written: the results hold records, their delta files, lock and claim files; the cache decodes
    from safetensors.torch import load_file

    runs = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert {p.suffix for p in runs} <= {".json", ".safetensors", ".lock", ".claim"}, runs
    assert sum(p.suffix == ".safetensors" for p in runs) == 8
    cache = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.parent.name != "digests"]
    assert cache and all(p.suffix == ".safetensors" for p in cache), cache
    digests = list((tmp_path / "cache").rglob("digests/*"))  # the data digests' memo: whole digests only
    assert digests and all(re.fullmatch(r"[0-9a-f]{64}\n", p.read_text()) for p in digests), digests
    for p in cache:
        assert load_file(p)  # every cached split reads back whole
    # a run trained by both sweeps only where the second job started before the first one's record existed
    trained: dict[str, list[tuple[float, float]]] = {}
    for name in ("sweep_a", "sweep_b"):
        for log in job_logs(tmp_path, name).values():
            [start] = _times(log, _STAMP + r"\) - Starting with JobEnvironment")
            done = re.search(_STAMP + r"\]\[vpeft\]\[INFO\] - record: (\S+) \(ok\)", log)
            if done:
                trained.setdefault(done.group(2), []).append((start, _times(done.group(1), _STAMP)[0]))
            else:
                assert "skipped (finished): " in log, log[-2000:]
    assert set(trained) == {str(p) for p in recs}
    for path, runs_of in trained.items():
        runs_of.sort()
        for (_, first_end), (second_start, _) in zip(runs_of, runs_of[1:]):
            assert second_start < first_end, f"{path} was trained again after it was finished"
    assert sum(skipped) == 16 - sum(len(v) for v in trained.values())


@on_cluster
@pytest.mark.slow
def test_a_run_past_its_time_limit_is_recorded_interrupted_and_a_resubmission_finishes_it(cluster, tasks, tmp_path):
    # SLURM sends SIGTERM at the limit (signal_delay_s=0: no earlier notice), SIGKILL KillWait later
    out = sweep(cluster, tmp_path, "sweep", f"dataset.root={tasks[0]}", *STALL, "hydra.launcher.timeout_min=1",
                "hydra.launcher.signal_delay_s=0", exit_code=1)  # fmt: skip
    assert summary(out) == "sweep: 1 runs: 0 ok (0 skipped as already finished), 0 failed, 1 interrupted"
    [(path, record)] = records(tmp_path).items()
    assert record["status"] == "interrupted", record["error"]
    assert "SIGTERM" in record["error"] and "costs and delta" in record["error"]
    assert record["metrics"]["top1"] is not None  # what was measured before the limit is kept
    [log] = (tmp_path / "sweep" / ".submitit").glob("*/*_0_log.err")
    assert "DUE TO TIME LIMIT" in log.read_text()
    [(job, log_out)] = job_logs(tmp_path, "sweep").items()
    assert cluster.jobs()[job] == "TIMEOUT"
    # the same run again with a longer limit (bench settings are not part of the run's identity)
    out = sweep(cluster, tmp_path, "again", f"dataset.root={tasks[0]}", "hydra.launcher.timeout_min=5")
    assert summary(out) == "sweep: 1 runs: 1 ok (0 skipped as already finished), 0 failed, 0 interrupted"
    [(again, record)] = records(tmp_path).items()
    assert again == path and record["status"] == "ok" and record["error"] is None


@on_cluster
@pytest.mark.slow
def test_a_requeued_array_keeps_its_finished_record_and_reruns_the_interrupted_run(cluster, tasks, tmp_path):
    proc = start_sweep(cluster, tmp_path, "sweep", f"dataset.root={tasks[1]}", "trainer.epochs=1,150",
                       "hydra.launcher.array_parallelism=2", "trainer.progress=true")  # fmt: skip
    # task 0 (1 epoch) finishes while task 1 (150 epochs) trains: then SLURM requeues the whole array
    array = array_id(tmp_path, "sweep", proc)
    [done] = wait_for(lambda: [p for p, r in records(tmp_path).items() if r["status"] == "ok"], "run 0", proc=proc)
    # task 1 past its set-up (on a loaded node it may start later than task 0): its progress line says so
    wait_for(lambda: "training epoch 1/150" in err_logs(tmp_path, "sweep").get(f"{array}_1", ""), "task 1 training",
             proc=proc)  # fmt: skip
    before = done.read_bytes(), done.stat().st_mtime_ns
    assert cluster.jobs()[f"{array}_1"] == "RUNNING" and len(records(tmp_path)) == 1
    cluster.run("scontrol", "requeue", array)
    # a requeued job waits (BeginTime) before it may start again; that wait is not what is tested
    wait_for(lambda: cluster.jobs()[f"{array}_1"] == "PENDING", "the requeue", proc=proc)
    interrupted = wait_for(lambda: [r for r in records(tmp_path).values() if r["status"] == "interrupted"], "SIGTERM")
    assert "terminated by signal SIGTERM during training" in interrupted[0]["error"]
    cluster.run("scontrol", "update", f"JobId={array}", "StartTime=now")
    out = finish(proc, 0)
    assert summary(out) == "sweep: 2 runs: 2 ok (1 skipped as already finished), 0 failed, 0 interrupted"
    recs = records(tmp_path)
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs.values())
    assert (done.read_bytes(), done.stat().st_mtime_ns) == before  # the finished record, untouched
    logs = job_logs(tmp_path, "sweep")
    for task in ("0", "1"):  # each task ran twice under its one job id
        assert logs[f"{array}_{task}"].count("Starting with JobEnvironment") == 2, logs[f"{array}_{task}"][-3000:]
    assert "skipped (finished): " in logs[f"{array}_0"]
    assert "terminated by signal SIGTERM" in logs[f"{array}_1"] and "recording the job as interrupted" in logs[
        f"{array}_1"]  # fmt: skip
    restarts = cluster.run("scontrol", "show", "job", f"{array}_1").stdout
    assert "Restarts=1" in restarts


@on_cluster
@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_rest_of_the_array_finishes(cluster, tasks, tmp_path):
    out = sweep(cluster, tmp_path, "sweep", f"dataset.root={tasks[0]}", "optim.lr=1e-3,1e30,2e-3",
                "trainer.epochs=2",
                exit_code=1)  # fmt: skip
    assert summary(out) == "sweep: 3 runs: 2 ok (0 skipped as already finished), 1 failed, 0 interrupted"
    by_lr = {r["config"]["optim"]["lr"]: r for r in records(tmp_path).values()}
    assert set(by_lr) == {1e-3, 1e30, 2e-3}
    assert by_lr[1e30]["status"] == "failed" and "diverged" in by_lr[1e30]["error"]
    assert by_lr[1e-3]["status"] == by_lr[2e-3]["status"] == "ok"


@on_cluster
@pytest.mark.slow
def test_a_job_killed_before_its_run_records_anything_is_counted(cluster, tasks, tmp_path):
    """A job cancelled before it started (no run, no status file of its own): the summary still counts it."""
    proc = start_sweep(cluster, tmp_path, "sweep", f"dataset.root={tasks[0]}", "seed=0,1",
                       "hydra.launcher.array_parallelism=1")  # fmt: skip
    array = array_id(tmp_path, "sweep", proc)
    cluster.run("scancel", f"{array}_1")  # still pending behind task 0: it never starts
    out = finish(proc, 1)
    # slurmctld either forgets a pending array task it cancels (squeue lists it no more, and it left no
    # log: it never started) or lists it as CANCELLED for a while; both count as interrupted
    assert summary(out) == "sweep: 2 runs: 1 ok (0 skipped as already finished), 0 failed, 1 interrupted"
    assert set(job_logs(tmp_path, "sweep")) == {f"{array}_0"}  # the cancelled task never ran
    said = re.search(rf"SLURM job {array}_1 ended without a result \(state ([^)]*)\)", out)
    assert said and said.group(1) in ("CANCELLED", "ENDED, no longer listed by squeue, never started: no log"), out
    status = json.loads((tmp_path / "sweep" / "1" / "vpeft_status.json").read_text())
    assert status["status"] == "interrupted" and f"{array}_1" in status["error"]
    assert [r["seed"] for r in records(tmp_path).values()] == [0]


@on_cluster
@pytest.mark.slow
def test_the_notice_before_the_time_limit_records_interrupted(cluster, tasks, tmp_path):
    """USR2, what submitit asks SLURM to send signal_delay_s before the limit: the run stops and says so."""
    proc = start_sweep(cluster, tmp_path, "sweep", f"dataset.root={tasks[0]}", *STALL)
    array = array_id(tmp_path, "sweep", proc)
    wait_for(lambda: "latency 1/1" in "".join(job_logs(tmp_path, "sweep").values()), "the costs", proc=proc)
    cluster.run("scancel", "--signal=USR2", array)  # what `submitit.Job._interrupt(timeout=True)` does
    out = finish(proc, 1)
    assert summary(out) == "sweep: 1 runs: 0 ok (0 skipped as already finished), 0 failed, 1 interrupted"
    [record] = records(tmp_path).values()
    assert record["status"] == "interrupted" and "SIGUSR2" in record["error"] and "time limit" in record["error"]
    [log] = job_logs(tmp_path, "sweep").values()
    assert log.count("Starting with JobEnvironment") == 1 and "Requeued" not in log  # it would only time out again


@pytest.mark.slow
def test_a_burst_of_sigterms_still_leaves_the_interrupted_record(tmp_path, tasks):
    """SLURM sends SIGTERM more than once (srun forwards it, slurmstepd sends its own): the record is written."""
    import signal

    cmd = [sys.executable, str(ROOT / "run.py"), *QUICK, f"dataset.root={tasks[0]}", *STALL,
           f"paths.results={tmp_path / 'runs'}", f"paths.cache={tmp_path / 'cache'}",
           f"hydra.run.dir={tmp_path / 'hydra'}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "latency 1/1" in line:
            break
    for _ in range(50):  # while the first one's record is being written
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.002)
    out = proc.communicate(timeout=120)[0]
    # 143 from the run; or a late signal of the burst, after the record, found the default handler
    assert proc.returncode in (143, -signal.SIGTERM), out[-3000:]
    [record] = records(tmp_path).values()
    assert record["status"] == "interrupted" and "SIGTERM" in record["error"]
