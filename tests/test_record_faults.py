"""A finished run is never lost and its record says what ran: stop signals while the record is written, a
results folder that cannot be written (early and late), strict JSON, the compute in the identity, and
record paths that stay inside paths.results. Real processes, signals, locks and files."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_faults import TINY
from test_leaderboard import make_record
from test_run import QUICK, ROOT, records, run_inproc

from vpeft.files import non_finite
from vpeft.jobs.runner import Plan, finish
from vpeft.jobs.train import TrainJob
from vpeft.results import RecordError, config_hash, read_record, record_path, validate, write_record_guarded
from vpeft.results.record import hashed_config
from vpeft.results.store import lock_path

FAST = [*TINY, "trainer.epochs=1", "trainer.warmup_epochs=0", "bench.latency=false", "bench.flops=false",
        "save_delta=false"]  # fmt: skip


def plan_of(tmp: Path, *overrides: str) -> Plan:
    """The plan a run with these overrides makes (its identity and record path), composed as run.py would."""
    from hydra import compose, initialize_config_dir

    from vpeft.jobs.train import plan_run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return plan_run(compose("config", [f"paths.results={tmp / 'runs'}", *overrides]))


def start(tmp: Path, *overrides: str) -> tuple[subprocess.Popen, Path]:
    """``python run.py`` in the background, its output in a file (a blocked child never fills a pipe)."""
    out = tmp / "out.txt"
    args = [sys.executable, str(ROOT / "run.py"), f"paths.results={tmp / 'runs'}", f"paths.cache={tmp / 'cache'}",
            f"hydra.run.dir={tmp / 'hydra'}", *overrides]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(out, "w") as f:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    return proc, out


def waits_on(proc: subprocess.Popen, lock: Path) -> bool:
    """Whether ``proc`` is blocked on the flock of ``lock`` (the kernel lists waiters with '->' in /proc/locks)."""
    inode = f":{os.stat(lock).st_ino}"
    waiting = [line.split()[1:] for line in Path("/proc/locks").read_text().splitlines() if " -> " in line]
    return any(fields[4] == str(proc.pid) and fields[5].endswith(inode) for fields in waiting)


# -- 1. a stop signal while the record is written -------------------------------------------------


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks to see the blocked writer")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_the_record_waits_for_its_lock_keeps_the_run(sig, tmp_path):
    """Another process holds the record's lock; the run, trained, waits on it; SIGTERM (or Ctrl-C) comes;
    the lock is released: the ok record is written, then the run stops (143 for SIGTERM)."""
    path = plan_of(tmp_path, *FAST).record_path
    lock = lock_path(path)
    lock.parent.mkdir(parents=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        proc, out = start(tmp_path, *FAST)
        deadline = time.monotonic() + 400
        while not waits_on(proc, lock):
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.2)
        proc.send_signal(sig)
        time.sleep(1.0)  # the signal arrives while the writer is blocked on the lock
        assert proc.poll() is None, out.read_text()
    finally:
        os.close(fd)  # releases the lock
    proc.wait(timeout=120)
    text = out.read_text()
    record = read_record(path)  # on disk and valid
    assert record["status"] == "ok" and record["error"] is None and record["metrics"]["top1"] is not None, text
    assert records(tmp_path) == [path]
    assert "the record is on disk" in text and "stopping now" in text
    assert proc.returncode == (143 if sig == signal.SIGTERM else proc.returncode) and proc.returncode != 0, text


# -- 2. a results folder that cannot be written ---------------------------------------------------


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes")
def test_a_read_only_results_folder_exits_2_before_training(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as e:
            run_inproc(tmp_path, *FAST)
    finally:
        runs.chmod(0o755)
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(runs) in err and "paths.results" in err and "Permission denied" in err, err
    assert not (tmp_path / "cache").exists()  # stopped before the data was decoded, let alone trained on
    assert records(tmp_path) == []


def test_a_results_folder_that_cannot_exist_exits_2_before_training(tmp_path):
    """A file where the results folder should go (the same check a read-only disk fails), in a real process."""
    (tmp_path / "taken").write_text("a file, not a folder\n")
    args = [sys.executable, str(ROOT / "run.py"), f"paths.results={tmp_path / 'taken' / 'runs'}",
            f"paths.cache={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'hydra'}", *FAST]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    [line] = res.stderr.strip().splitlines()  # one line, no traceback
    assert str(tmp_path / "taken" / "runs") in line and "paths.results" in line and "Not a directory" in line
    assert not (tmp_path / "cache").exists() and "top-1" not in res.stdout


def test_a_disk_that_fills_at_record_time_prints_the_run(tmp_path, monkeypatch, capsys):
    """The record's write fails with ENOSPC after training: exit 1, the top-1 and the whole record printed."""
    import vpeft.results.store

    def full(path, obj, strict=False):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(vpeft.results.store, "write_json_atomic", full)
    with pytest.raises(SystemExit) as e:
        run_inproc(tmp_path, *FAST)
    err = capsys.readouterr().err
    assert e.value.code == 1, err
    assert "No space left on device" in err and str(tmp_path / "runs") in err and "Traceback" not in err
    printed = validate(json.loads(err.strip().splitlines()[-1]))  # the record, whole, on the last line
    assert printed["status"] == "ok" and f"top-1 {printed['metrics']['top1']:.2f}%" in err
    assert records(tmp_path) == []


def test_a_file_size_limit_at_record_time_exits_1_with_the_top1(tmp_path):
    """A real write failure (EFBIG past RLIMIT_FSIZE, as a full disk) in a real process."""
    import resource

    def limit():  # Python ignores SIGXFSZ, so an oversized write raises OSError instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    args = [sys.executable, str(ROOT / "run.py"), f"paths.results={tmp_path / 'runs'}", f"paths.cache={tmp_path / 'c'}",
            f"hydra.run.dir={tmp_path / 'hydra'}", "hydra/job_logging=disabled", "hydra.output_subdir=null",
            *FAST]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "File too large" in res.stderr
    printed = validate(json.loads(res.stderr.strip().splitlines()[-1]))
    assert printed["status"] == "ok" and f"top-1 {printed['metrics']['top1']:.2f}%" in res.stderr
    assert records(tmp_path) == []


# -- 3. strict JSON -------------------------------------------------------------------------------


def strict_loads(text: str) -> dict:
    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_record_with_nan_is_refused_naming_the_key(tmp_path):
    record = make_record(top1=70.0)
    record["cost"]["eval_seconds"] = float("inf")
    path = tmp_path / "r.json"
    with pytest.raises(ValueError, match=r"cost\.eval_seconds is inf"):
        write_record_guarded(path, record)
    assert not path.exists()


def test_a_failed_runs_non_finite_metric_is_stored_as_null(tmp_path):
    record = make_record(status="failed", error="training diverged")
    record["metrics"]["train_loss"] = float("nan")
    record["metrics"]["history"] = [{"epoch": 1, "train_loss": float("inf")}]
    plan = Plan(cfg=None, resolved={}, overrides=[], identity={}, record_path=tmp_path / "r.json")
    finish(TrainJob(), plan, record, "failed", "training diverged")
    on_disk = strict_loads(plan.record_path.read_text())
    assert on_disk["metrics"]["train_loss"] is None and on_disk["metrics"]["history"][0]["train_loss"] is None
    assert "metrics.train_loss=nan" in on_disk["error"] and "metrics.history[0].train_loss=inf" in on_disk["error"]
    assert on_disk["error"].startswith("training diverged") and list(non_finite(on_disk)) == []
    validate(on_disk)


def test_a_run_writes_strict_json(tmp_path):
    run_inproc(tmp_path, *FAST)
    [path] = records(tmp_path)
    strict_loads(path.read_text())


# -- 4. the compute is part of the identity -------------------------------------------------------


def test_the_compute_names_the_run(tmp_path, monkeypatch):
    cpu = plan_of(tmp_path, *FAST)
    assert cpu.identity["compute"] == "cpu-fp32"
    # the CPU fp32 hash is the one every record had before the field: unchanged
    assert cpu.identity["config_hash"] == config_hash(hashed_config(cpu.resolved))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the plan a GPU machine makes
    gpu = plan_of(tmp_path, *FAST)
    gpu_fp32 = plan_of(tmp_path, *FAST, "trainer.amp=none")
    cpu_bf16 = plan_of(tmp_path, *FAST, "device=cpu", "trainer.amp=bf16")
    assert (gpu.identity["compute"], gpu_fp32.identity["compute"]) == ("cuda-bf16", "cuda-fp32")
    assert cpu_bf16.identity["compute"] == "cpu-bf16"
    paths = {p.record_path for p in (cpu, gpu, gpu_fp32, cpu_bf16)}
    assert len(paths) == 4  # a CPU fp32 record never makes a GPU bf16 run "skipped (finished)"
    assert plan_of(tmp_path, *FAST, "device=cpu").record_path == cpu.record_path  # the device type, not its name


def test_a_run_records_its_compute(tmp_path):
    record = run_inproc(tmp_path, *FAST)
    [path] = records(tmp_path)
    assert record["compute"] == read_record(path)["compute"] == "cpu-fp32" and record["cost"]["amp"] == "none"


def test_committed_records_keep_their_names_and_hashes():
    root = ROOT / "results" / "runs"
    found = sorted(root.rglob("*.json"))
    assert len(found) >= 100
    for path in found[:: max(1, len(found) // 25)]:
        raw = json.loads(path.read_text())
        assert "compute" not in raw  # made before the field: on a CPU in fp32
        record = read_record(path)
        assert record["compute"] == "cpu-fp32"
        assert config_hash(hashed_config(raw["config"], record["compute"])) == raw["config_hash"], path
        assert record_path(root, record) == path


# -- 5. a record path stays inside paths.results ---------------------------------------------------


@pytest.mark.parametrize("bad", ["..", ".", "../x", "/abs", "a/../../b"])
def test_a_dataset_id_that_is_a_path_exits_2_naming_the_key(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_inproc(tmp_path, *QUICK, "dataset=digits", f"+dataset.id='{bad}'")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "dataset.id" in err, err
    assert list(tmp_path.rglob("*.json")) == []


@pytest.mark.parametrize(
    ("key", "value"), [("dataset", ".."), ("backbone", "."), ("method", ".."), ("protocol", "../../../../x")]
)
def test_record_path_never_leaves_its_root(key, value, tmp_path):
    record = {**make_record(), key: value}
    with pytest.raises(RecordError, match="outside|not inside"):
        record_path(tmp_path / "runs", record)
    assert record_path(tmp_path / "runs", {**make_record(), "dataset": "../x"}).is_relative_to(tmp_path / "runs")
