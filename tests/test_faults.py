"""Faults around a run, with real processes and real signals: nothing finished is lost or replaced."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_run import QUICK, ROOT, records, run_cli, run_inproc

from vpeft.results import read_record

TINY = ["backbone=vit_tiny_random", "dataset=digits", "protocol=tune", "trainer.progress=false"]


def start_cli(tmp: Path, *overrides: str) -> subprocess.Popen:
    args = [sys.executable, str(ROOT / "run.py"), f"paths.results={tmp / 'runs'}", f"paths.cache={tmp / 'cache'}",
            f"hydra.run.dir={tmp / 'hydra'}", *overrides]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_sweep(tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "run.py"), "-m", f"paths.results={tmp / 'runs'}", f"paths.cache={tmp / 'cache'}",
            *overrides]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def signal_when(proc: subprocess.Popen, needle: str, sig: int, timeout: float = 300) -> str:
    """Send ``sig`` once ``needle`` appears in the run's output; return all of it."""
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            proc.send_signal(sig)
            break
        assert time.monotonic() < deadline, "".join(seen)
    seen.append(proc.communicate(timeout=120)[0])
    return "".join(seen)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_training_records_interrupted(sig, tmp_path):
    proc = start_cli(tmp_path, *TINY, "trainer.epochs=400", "trainer.warmup_epochs=0", "bench.latency=false",
                     "trainer.progress=true")  # fmt: skip
    out = signal_when(proc, "training epoch 1/400", sig)  # the progress line: training has started
    [path] = records(tmp_path)
    record = read_record(path)
    assert record["status"] == "interrupted" and "during training" in record["error"]
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "SIGTERM" in record["error"] and "interrupted" in out
    else:
        assert proc.returncode != 0 and "Ctrl-C" in record["error"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_after_training_keeps_the_metrics(sig, tmp_path):
    """A signal while the costs are measured: the record is interrupted, with the training's metrics in it."""
    proc = start_cli(tmp_path, *TINY, "trainer.epochs=1", "bench.latency=true", "bench.iters=100000", "bench.warmup=0",
                     "bench.batches=[1]")  # fmt: skip
    out = signal_when(proc, "latency 1/1", sig)
    assert proc.returncode == 143 if sig == signal.SIGTERM else proc.returncode != 0, out
    [path] = records(tmp_path)
    record = read_record(path)
    assert record["status"] == "interrupted" and "costs and delta" in record["error"]
    assert record["metrics"]["top1"] is not None and record["cost"]["train_seconds"] > 0


def test_an_error_after_training_is_recorded_failed_with_the_metrics(tmp_path):
    first = run_inproc(tmp_path, *QUICK, "dataset=digits", "save_delta=false")
    path = Path(records(tmp_path)[0])
    # a second configuration whose delta file cannot be written: a folder stands where it would go
    again = run_inproc(tmp_path, *QUICK, "dataset=digits", "save_delta=false", "seed=1")
    target = Path(records(tmp_path)[1]) if records(tmp_path)[0] == path else Path(records(tmp_path)[0])
    target.unlink()
    target.with_suffix(".safetensors").mkdir()
    with pytest.raises(Exception):  # noqa: B017 - whatever the OS error, the record must say failed
        run_inproc(tmp_path, *QUICK, "dataset=digits", "seed=1")
    record = read_record(target)
    assert record["status"] == "failed" and "costs and delta" in record["error"]
    assert record["metrics"]["top1"] == pytest.approx(again["metrics"]["top1"])
    assert read_record(path) == first  # the other run's record is untouched


@pytest.mark.slow
def test_an_overlapping_run_never_replaces_a_finished_record(tmp_path):
    """A second run of one configuration (skip_finished=false), interrupted, leaves the first one's ok record."""
    ok = run_inproc(tmp_path, *TINY, "trainer.epochs=1", "bench.latency=false")
    [path] = records(tmp_path)
    before = path.read_bytes()
    # the same configuration (bench settings are not part of it), stopped while it measures its costs
    proc = start_cli(tmp_path, *TINY, "trainer.epochs=1", "skip_finished=false", "bench.latency=true",
                     "bench.iters=100000", "bench.warmup=0", "bench.batches=[1]")  # fmt: skip
    out = signal_when(proc, "latency 1/1", signal.SIGTERM)
    assert proc.returncode == 143, out
    assert records(tmp_path) == [path] and path.read_bytes() == before and ok["status"] == "ok"
    assert "left it as it is" in out


def test_a_short_run_scales_its_warm_up_and_records_it(tmp_path):
    record = run_inproc(tmp_path, "backbone=vit_tiny_random", "dataset=digits", "trainer.epochs=5",
                        "bench.latency=false", "save_delta=false", "trainer.progress=false")  # fmt: skip
    assert record["status"] == "ok" and record["config"]["trainer"]["warmup_epochs"] == 1
    assert [h["epoch"] for h in record["metrics"]["history"]] == [1, 2, 3, 4, 5]


def test_the_default_recipe_keeps_its_hash():
    """A tenth of 100 epochs is the 10 warm-up epochs the default config used to name: finished runs still match."""
    from hydra import compose, initialize_config_dir

    from vpeft.run import plan_run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        default = plan_run(compose("config", ["backbone=vit_tiny_random"]))
        explicit = plan_run(compose("config", ["backbone=vit_tiny_random", "trainer.warmup_epochs=10"]))
    assert default.identity["config_hash"] == explicit.identity["config_hash"]
    assert default.resolved["trainer"]["warmup_epochs"] == 10


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("backbone.img_size=abc", "backbone.img_size must be a positive integer"),
        ("backbone.img_size=0", "backbone.img_size must be a positive integer"),
        ("backbone.img_size=8", "patch size 16"),
        ("backbone.img_size=30", "use 16 or 32"),
        ("seed=abc", "seed must be an integer"),
        ("method.r=abc", "method.r of lora must be an integer"),
        ("optim.lr=nan", "optim.lr must be a finite number"),
        ("trainer.warmup_epochs=5", "trainer.warmup_epochs must be an integer in [0, epochs=1]"),
    ],
)
def test_bad_values_exit_2_naming_the_key(override, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_inproc(tmp_path, "backbone=vit_tiny_random", "dataset=digits", "trainer.epochs=1", override)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert records(tmp_path) == []


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"kind": "vpeft.hparams/1", "tasks": {"digits": 3}}'])
def test_a_malformed_hparams_file_is_named(content, tmp_path, capsys):
    bad = tmp_path / "hp.json"
    bad.write_text(content)
    with pytest.raises(SystemExit) as e:
        run_inproc(tmp_path, *QUICK, "dataset=digits", f"hparams={bad}")
    assert e.value.code == 2 and str(bad) in capsys.readouterr().err
    assert records(tmp_path) == []


@pytest.mark.parametrize("override", ["trainer.epoch=3", "method=nosuch", "dataset=nosuch"])
def test_hydras_own_errors_exit_2(override, tmp_path):
    res = run_cli(tmp_path, *QUICK, override)
    assert res.returncode == 2, res.stderr
    assert override.split("=")[0].split(".")[-1] in res.stderr
    assert records(tmp_path) == []


def test_offline_is_detected_at_once(tmp_path):
    """No network and no cached weights: the error comes in seconds, not after a minute of retries."""
    start = time.monotonic()
    res = run_cli(tmp_path, "trainer.epochs=1", "backbone=vit_b16_in21k", "dataset=digits",
                  env={"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "https://hub.invalid"})  # fmt: skip
    assert res.returncode == 2
    assert "hub.invalid is not reachable" in res.stderr and "dinov2_s14_offline" in res.stderr
    assert time.monotonic() - start < 30
    assert records(tmp_path) == []


@pytest.mark.slow
def test_a_sweep_with_a_malformed_job_runs_every_job_and_exits_2(tmp_path):
    res = run_sweep(tmp_path, *TINY, "trainer.epochs=1", "bench.latency=false", "seed=abc,0",
                    f"hydra.sweep.dir={tmp_path / 'multirun'}")  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert "sweep: 2 runs: 1 ok (0 skipped as already finished), 0 failed, 0 interrupted, 1 bad input" in res.stdout
    assert "seed must be an integer" in res.stdout
    statuses = [json.loads(p.read_text()) for p in sorted((tmp_path / "multirun").glob("*/vpeft_status.json"))]
    assert sorted(s["status"] for s in statuses) == ["bad_input", "ok"]
    assert [read_record(p)["seed"] for p in records(tmp_path)] == [0]
    # the rerun skips the finished job, the malformed one is bad input again: still exit 2
    res = run_sweep(tmp_path, *TINY, "trainer.epochs=1", "bench.latency=false", "seed=abc,0",
                    f"hydra.sweep.dir={tmp_path / 'multirun2'}")  # fmt: skip
    assert res.returncode == 2 and "1 ok (1 skipped as already finished), 0 failed, 0 interrupted, 1 bad" in res.stdout


def test_a_clean_sweep_exits_0(tmp_path):
    res = run_sweep(tmp_path, *TINY, "trainer.epochs=1", "bench.latency=false", "save_delta=false", "seed=0",
                    f"hydra.sweep.dir={tmp_path / 'multirun'}")  # fmt: skip
    assert res.returncode == 0 and "1 ok" in res.stdout


def test_a_wrong_task_folder_fails_before_the_backbone_is_fetched(tmp_path):
    start = time.monotonic()
    res = run_cli(tmp_path, "backbone=vit_b16_in21k", "dataset=folder", f"dataset.root={tmp_path / 'nowhere'}",
                  env={"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "https://hub.invalid"})  # fmt: skip
    assert res.returncode == 2 and str(tmp_path / "nowhere") in res.stderr
    assert "Loading pretrained weights" not in res.stdout + res.stderr and "hub.invalid" not in res.stderr
    assert time.monotonic() - start < 30


def test_a_full_results_disk_names_the_record(tmp_path):
    """Files past a size limit fail as on a full disk (EFBIG): the cache is skipped, the record's path named."""
    import resource

    def limit():  # Python ignores SIGXFSZ, so an oversized write raises OSError instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    args = [sys.executable, str(ROOT / "run.py"), f"paths.results={tmp_path / 'runs'}", f"paths.cache={tmp_path / 'c'}",
            f"hydra.run.dir={tmp_path / 'hydra'}", "hydra/job_logging=disabled", "hydra.output_subdir=null", *QUICK,
            "dataset=digits",
            "save_delta=false"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert res.returncode != 0
    assert "could not write the record" in res.stderr and str(tmp_path / "runs") in res.stderr
    assert "cannot write the data cache" in res.stderr + res.stdout


def test_vtab1k_answers_a_typo_in_one_line():
    for args in (["lora", "--taks", "cifar100"], ["lora", "trainer.epoch=3", "--dry-run"], ["nosuch"]):
        cmd = [sys.executable, str(ROOT / "scripts" / "vtab1k.py"), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "Traceback" not in res.stderr


def test_runs_go_outside_the_committed_results_by_default():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config")
    tracked = subprocess.run(["git", "ls-files", "outputs"], cwd=ROOT, capture_output=True, text=True).stdout
    assert cfg.paths.results == "outputs/runs" and cfg.paths.bench == "outputs/bench" and tracked == ""
    assert "/outputs/" in (ROOT / ".gitignore").read_text().split()
