"""What a new user meets in the first hour, through real `python run.py` processes: a sweep without network or
data, a typo Hydra itself suggested, minutes without a word, a finished run skipped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import write_noah
from test_run import ROOT, odd_images

from vpeft.results import load_records

SPLITS = ("train800", "val200", "train800val200", "test")
TINY = ["backbone=vit_tiny_random", "trainer.epochs=1", "trainer.warmup_epochs=0", "bench.latency=false",
        "bench.flops=false", "save_delta=false"]  # fmt: skip


def cli(tmp: Path, *args: str, env: dict | None = None, sweep: bool = False) -> subprocess.CompletedProcess:
    where = [f"hydra.sweep.dir={tmp / 'sweeps'}/${{now:%H-%M-%S-%f}}"] if sweep else [f"hydra.run.dir={tmp / 'run'}"]
    cmd = [sys.executable, str(ROOT / "run.py"), *(["-m"] if sweep else []), *args, *where,
           f"paths.results={tmp / 'runs'}", f"paths.cache={tmp / 'cache'}"]  # fmt: skip
    full_env = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}  # progress: the default interval
    full_env.update({"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf"), **(env or {})})
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def task(tmp_path) -> Path:
    return write_noah(tmp_path / "tasks" / "tiny", {s: odd_images(12, seed=i) for i, s in enumerate(SPLITS)})


def summary_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("sweep:"))


@pytest.mark.parametrize("launcher", ["basic", "gpus"])
def test_a_sweep_without_network_or_data_leaves_no_failed_records(launcher, task, tmp_path):
    """No network for the ViT-B weights, a task folder that is not there: bad input, not failed runs. No record
    for those jobs, the others run, the summary names the fixes and the sweep exits 2; a rerun says the same."""
    nowhere = tmp_path / "nowhere"
    grid = ["backbone=vit_tiny_random,vit_b16_in21k", "dataset=folder", f"dataset.root={task},{nowhere}"]
    if launcher == "gpus":  # joblib: the jobs run in worker processes, two at a time
        grid = ["hydra/launcher=gpus", "hydra.launcher.n_jobs=2", "backbone=vit_tiny_random", "dataset=folder",
                f"dataset.root={nowhere},{task}"]  # fmt: skip
    n_bad = 3 if launcher == "basic" else 1
    n_jobs = n_bad + 1
    for rerun in (False, True):
        res = cli(tmp_path, *TINY[1:], *grid, sweep=True)
        assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
        assert summary_line(res.stdout) == (
            f"sweep: {n_jobs} runs: 1 ok ({int(rerun)} skipped as already finished), 0 failed, 0 interrupted, "
            f"{n_bad} bad input (no record; fix the input and run the sweep again)"
        )
        summary = res.stdout.split("sweep:", 1)[1]
        assert str(nowhere) in summary and "train800.txt" in summary  # the missing folder, and what it needs
        if launcher == "basic":  # the way out without network: a local checkpoint, or the offline backbone
            assert "backbone.checkpoint" in summary and "dinov2_s14_offline" in summary
            assert summary.count("bad input (2 runs)") == 1  # one missing folder, said once for its two runs
        assert "Traceback" not in res.stdout + res.stderr
        frame = load_records(tmp_path / "runs")
        assert list(frame["status"]) == ["ok"] and list(frame["dataset"]) == ["tiny"]


def test_a_single_run_with_missing_data_exits_2_as_before(tmp_path):
    res = cli(tmp_path, *TINY, "dataset=folder", f"dataset.root={tmp_path / 'nowhere'}")
    assert res.returncode == 2 and "train800.txt" in res.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("override", "fix"),
    [
        ("+trainer.epoch=3", "did you mean trainer.epochs=3?"),  # what Hydra suggests for trainer.epoch=3
        ("trainer.epoch=3", "did you mean trainer.epochs=3?"),  # Hydra's own error, then the fix
        ("+bench.iter=5", "did you mean bench.iters=5?"),
        ("+backbone.pretraind=false", "did you mean backbone.pretrained=false?"),
        ("+optim.weight_decy=0.1", "did you mean optim.weight_decay=0.1?"),
        ("+method.alpah=16", "did you mean method.alpha=16?"),
    ],
)
def test_an_unknown_key_names_the_closest_valid_one(override, fix, tmp_path):
    res = cli(tmp_path, *TINY, "dataset=digits", override)
    assert res.returncode == 2, res.stderr[-2000:]
    group, key = override.lstrip("+").split("=")[0].split(".")
    [line] = [li for li in res.stderr.splitlines() if li.startswith("error: unknown key")]
    assert f"unknown key {group}.{key}; {fix}" in line and f"({group} keys: " in line
    assert "Traceback" not in res.stderr and not (tmp_path / "runs").exists()


def test_an_unknown_key_in_a_sweep_is_bad_input(tmp_path):
    res = cli(tmp_path, *TINY, "dataset=digits", "+trainer.epoch=3", "seed=0,1", sweep=True)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "2 bad input" in summary_line(res.stdout) and "did you mean trainer.epochs=3?" in res.stdout
    assert not (tmp_path / "runs").exists()


def progress_lines(text: str, desc: str) -> list[tuple[int, int]]:
    """(done, total) of each progress line that starts with ``desc``."""
    return [(int(m[1]), int(m[2])) for m in re.finditer(rf"^{re.escape(desc)}.*?\| *(\d+)/(\d+) \[", text, re.M)]


def test_training_shows_progress_within_the_epoch_and_a_log_gets_lines_not_a_flood(task, tmp_path):
    args = [*TINY, "trainer.epochs=2", "trainer.batch_size=2", "dataset=folder", f"dataset.root={task}",
            "protocol=tune"]  # fmt: skip
    res = cli(tmp_path, *args, env={"TQDM_MININTERVAL": "0"})  # a line at every batch
    assert res.returncode == 0, res.stderr[-3000:]
    assert "\r" not in res.stderr  # stderr is a pipe: lines, not a bar redrawn in place
    first, second = progress_lines(res.stderr, "training epoch 1/2"), progress_lines(res.stderr, "training epoch 2/2")
    assert {total for _, total in first + second} == {12}  # 6 batches of 2 per epoch, 2 epochs
    assert {done for done, _ in first} >= {1, 2, 3, 4, 5} and {done for done, _ in second} >= {7, 8, 9, 10, 11, 12}
    assert progress_lines(res.stderr, "evaluating")
    # the same run into a log with the default interval: the start and the end of each phase, nothing between
    res = cli(tmp_path, *args, "seed=1")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = progress_lines(res.stderr, "training epoch")
    assert lines[0] == (0, 12) and lines[-1] == (12, 12) and len(lines) <= 3, res.stderr  # one more every 30 s


def test_bench_only_says_what_it_measures(tmp_path):
    res = cli(tmp_path, "backbone=vit_tiny_random", "bench.only=true", f"paths.bench={tmp_path / 'bench'}",
              "bench.iters=2", "bench.warmup=1", "bench.batches=[1]", "bench.train_steps=2", "bench.train_warmup=0",
              "bench.train_isolate=false", env={"TQDM_MININTERVAL": "0"})  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    latency = progress_lines(res.stderr, "measuring latency (bare/unmerged/merged, fp32, batch 1)")
    assert latency and latency[-1] == (9, 9)  # 3 variants x (1 warm-up + 2 timed calls)
    assert 1 in {done for done, _ in latency}  # seen within the phase, not only at its end
    assert progress_lines(res.stderr, "measuring training cost")[-1] == (2, 2)


def test_a_skip_is_said_once_with_the_accuracy_in_percent(task, tmp_path):
    args = [*TINY, "dataset=folder", f"dataset.root={task}", "protocol=tune"]
    assert cli(tmp_path, *args).returncode == 0
    [record] = load_records(tmp_path / "runs").to_dict("records")
    res = cli(tmp_path, *args)
    assert res.returncode == 0
    out = res.stdout + res.stderr
    skips = [line for line in out.splitlines() if "finished" in line]
    assert skips == [f"skipped (finished): {record['path']} (top-1 {record['metrics.top1']:.2f}%)"], out
