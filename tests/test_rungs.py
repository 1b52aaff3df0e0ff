"""A run stopped at a halving rung and continued by a later command, through run.py (real processes)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vpeft.results import iter_records

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def command(tmp: Path, results: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), "backbone=vit_tiny_random", "dataset=digits", "protocol=tune",
            "trainer.epochs=4", "trainer.warmup_epochs=1", "trainer.eval_every=1", "bench.latency=false",
            "bench.flops=false", f"paths.results={tmp / results}", f"paths.cache={tmp / 'cache'}", *args]  # fmt: skip


def run(tmp: Path, results: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(tmp, results, *args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def only_record(folder: Path) -> tuple[Path, dict]:
    [(path, record)] = list(iter_records(folder))
    return path, record


@pytest.mark.slow
def test_a_run_stopped_at_a_rung_continues_to_the_end_as_if_it_never_stopped(tmp_path):
    done = run(tmp_path, "straight")
    assert done.returncode == 0, done.stderr[-3000:]
    _, straight = only_record(tmp_path / "straight")

    done = run(tmp_path, "halved", "stop_after=2")
    assert done.returncode == 0, done.stderr[-3000:]
    path, rung = only_record(tmp_path / "halved")
    assert rung["status"] == "ok" and rung["metrics"]["stopped_at_epoch"] == 2 and rung["metrics"]["epochs"] == 2
    assert rung["config_hash"] == straight["config_hash"]  # a rung is the same run, not another one
    assert rung["metrics"]["top1"] == straight["metrics"]["history"][1]["eval_top1"]
    state = path.with_suffix(".rung.pt")
    assert state.is_file()

    again = run(tmp_path, "halved", "stop_after=2")  # the same rung again: nothing to do
    assert again.returncode == 0 and "skipped (finished)" in again.stdout, again.stdout[-2000:]

    done = run(tmp_path, "halved")  # the rest of the schedule, from the rung's state
    assert done.returncode == 0, done.stderr[-3000:]
    assert "it stopped at epoch 2, a rung, and goes on to epoch the last" in done.stdout
    assert "resuming from" in done.stdout + done.stderr and "training epoch 3/4" in done.stderr
    _, whole = only_record(tmp_path / "halved")
    assert whole["metrics"]["stopped_at_epoch"] is None and whole["metrics"]["epochs"] == 4
    assert whole["metrics"]["top1"] == straight["metrics"]["top1"]
    for a, b in zip(whole["metrics"]["history"], straight["metrics"]["history"], strict=True):
        assert (a["epoch"], a["train_loss"], a["lr"], a["eval_top1"]) == (b["epoch"], b["train_loss"], b["lr"],
                                                                          b["eval_top1"])  # fmt: skip
    assert not state.exists()  # the whole schedule is on record: the rung's state is dropped


@pytest.mark.slow
def test_a_broken_rung_state_retrains_from_the_start(tmp_path):
    done = run(tmp_path, "runs", "stop_after=2")
    assert done.returncode == 0, done.stderr[-3000:]
    path, _ = only_record(tmp_path / "runs")
    path.with_suffix(".rung.pt").write_bytes(b"not a state")
    done = run(tmp_path, "runs", "stop_after=3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the run trains from the start" in done.stdout + done.stderr
    _, record = only_record(tmp_path / "runs")
    assert record["metrics"]["stopped_at_epoch"] == 3
    assert [h["epoch"] for h in record["metrics"]["history"]] == [1, 2, 3]


@pytest.mark.parametrize("value", ["0", "5", "1.5", "true"])
def test_a_stop_outside_the_schedule_is_bad_input(tmp_path, value):
    done = run(tmp_path, "runs", f"stop_after={value}")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "stop_after must be an epoch of the schedule, 1..4 (trainer.epochs), or null" in done.stderr
    assert not (tmp_path / "runs").exists() or not list(iter_records(tmp_path / "runs"))


def _claim_held(folder: Path) -> bool:
    """Whether some process holds a run's claim under ``folder`` (an flock taken there would block)."""
    for claim in folder.rglob(".*.claim") if folder.exists() else ():
        fd = os.open(claim, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    return False


def _start(tmp: Path, results: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(command(tmp, results, *args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.slow
def test_two_processes_of_one_rung_train_it_once(tmp_path):
    """Two commands for the same rung at once (two halving stages, a requeued array task): the second waits for the
    first's claim on the run, then finds its record and skips it."""
    first = _start(tmp_path, "runs", "stop_after=2")
    deadline = time.monotonic() + 300
    while not _claim_held(tmp_path / "runs"):
        assert first.poll() is None and time.monotonic() < deadline, "the first run never claimed its run"
        time.sleep(0.05)
    # the first held still (SIGSTOP) while the second starts, however slow its start on a loaded machine
    first.send_signal(signal.SIGSTOP)
    log = tmp_path / "second.log"
    try:
        with open(log, "w") as sink:
            second = subprocess.Popen(command(tmp_path, "runs", "stop_after=2"), cwd=ROOT, env=ENV, stdout=sink,
                                      stderr=subprocess.STDOUT, text=True)  # fmt: skip
        while "waiting: another process is running" not in log.read_text():
            assert second.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGCONT)
    out_first, err_first = first.communicate(timeout=600)
    assert second.wait(timeout=600) == 0 and first.returncode == 0, err_first[-2000:] + log.read_text()[-2000:]
    out_second = log.read_text()
    assert "| record:" in out_first and "skipped (finished)" not in out_first
    assert "skipped (finished)" in out_second and "| record:" not in out_second  # it waited, then skipped
    assert "training epoch" not in out_second
    path, record = only_record(tmp_path / "runs")
    assert record["metrics"]["stopped_at_epoch"] == 2 and path.with_suffix(".rung.pt").is_file()


@pytest.mark.slow
def test_sigterm_mid_rung_keeps_the_last_rung_and_a_rerun_goes_on_from_it(tmp_path):
    """Stopped at epoch 1 (a rung), continued, and SIGTERM'd during epoch 2: the rung's ok record and its state
    stay; the next command continues from epoch 1 and ends where an unbroken run does."""
    done = run(tmp_path, "straight")
    assert done.returncode == 0, done.stderr[-3000:]
    _, straight = only_record(tmp_path / "straight")
    done = run(tmp_path, "halved", "stop_after=1")
    assert done.returncode == 0, done.stderr[-3000:]
    path, rung = only_record(tmp_path / "halved")
    state = path.with_suffix(".rung.pt")
    before = (path.read_bytes(), state.read_bytes())

    going = _start(tmp_path, "halved")
    err = ""
    deadline = time.monotonic() + 300
    while "training epoch 2/4" not in err:  # the progress bar of the first epoch after the rung
        assert going.poll() is None and time.monotonic() < deadline, err[-2000:]
        err += going.stderr.read(1) if going.stderr else ""
    going.send_signal(signal.SIGTERM)
    out, rest = going.communicate(timeout=120)
    assert going.returncode == 143, (out + err + rest)[-2000:]
    assert (path.read_bytes(), state.read_bytes()) == before  # the ok rung record is never replaced by a worse one

    done = run(tmp_path, "halved")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout + done.stderr and "after epoch 1" in done.stdout + done.stderr
    _, whole = only_record(tmp_path / "halved")
    assert whole["metrics"]["top1"] == straight["metrics"]["top1"] and whole["metrics"]["stopped_at_epoch"] is None
    assert [h["train_loss"] for h in whole["metrics"]["history"]] == [
        h["train_loss"] for h in straight["metrics"]["history"]
    ]
