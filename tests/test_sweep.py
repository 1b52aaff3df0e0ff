"""Sweeps: every combination runs, failures are recorded, reruns skip finished runs, tune -> final."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_run import odd_images, write_task

from vpeft.results import iter_records
from vpeft.vtab import select_hparams

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["backbone=vit_tiny_random", "trainer.epochs=1", "trainer.warmup_epochs=0", "bench.latency=false"]


def multirun(
    tmp: Path, *args: str, script: str = "run.py", exit_code: int = 0, from_tmp: bool = False
) -> subprocess.CompletedProcess:
    """``run.py -m`` (or a script that launches multiruns) with results, cache and sweep folders under tmp
    (``from_tmp``: started in tmp, with the folders given relative to it, as a user in their own folder)."""
    cmd = [sys.executable, str(ROOT / script), *(["-m"] if script == "run.py" else []), *args]
    where = Path() if from_tmp else tmp
    cmd += [
        f"paths.results={where / 'runs'}",
        f"paths.cache={where / 'cache'}",
        f"hydra.sweep.dir={where / 'sweeps'}/${{now:%H-%M-%S-%f}}",  # a fresh folder per multirun
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, cwd=tmp if from_tmp else ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == exit_code, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def record_files(tmp: Path) -> list[Path]:
    return sorted((tmp / "runs").rglob("*.json"))


def summary_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("sweep:"))


def tiny_tasks(root: Path) -> list[Path]:
    splits = ["train800", "val200", "train800val200", "test"]
    return [
        write_task(root / name, {s: odd_images(12, i + k) for i, s in enumerate(splits)})
        for k, name in enumerate(["task_a", "task_b"])
    ]


def test_sweep_runs_all_skips_finished_and_reruns_missing(tmp_path):
    a, b = tiny_tasks(tmp_path)
    sweep = [*QUICK, "method=linear,bitfit", "seed=0,1", "dataset=folder", f"dataset.root={a},{b}"]
    first = multirun(tmp_path, *sweep)
    assert summary_line(first.stdout) == "sweep: 8 runs: 8 ok (0 skipped as already finished), 0 failed, 0 interrupted"
    files = record_files(tmp_path)
    assert len(files) == 8
    assert {json.loads(p.read_text())["dataset"] for p in files} == {"task_a", "task_b"}
    stamps = {p: p.stat().st_mtime_ns for p in files}

    second = multirun(tmp_path, *sweep)
    assert "8 ok (8 skipped" in summary_line(second.stdout)
    assert {p: p.stat().st_mtime_ns for p in record_files(tmp_path)} == stamps

    files[3].unlink()
    third = multirun(tmp_path, *sweep)
    assert "8 ok (7 skipped" in summary_line(third.stdout)
    now = {p: p.stat().st_mtime_ns for p in record_files(tmp_path)}
    assert set(now) == set(stamps)
    assert [p for p in now if now[p] != stamps[p]] == [files[3]]


def test_a_failing_job_does_not_take_the_sweep_down(tmp_path):
    # the sweep finishes every job, sums up, and exits 1 because one failed
    res = multirun(tmp_path, *QUICK, "dataset=digits", "protocol=tune", "optim.lr=1e-3,1e30,2e-3", exit_code=1)
    assert summary_line(res.stdout) == "sweep: 3 runs: 2 ok (0 skipped as already finished), 1 failed, 0 interrupted"
    records = [r for _, r in iter_records(tmp_path / "runs")]
    by_lr = {r["config"]["optim"]["lr"]: r for r in records}
    assert by_lr[1e30]["status"] == "failed" and "diverged" in by_lr[1e30]["error"]
    assert by_lr[1e-3]["status"] == by_lr[2e-3]["status"] == "ok"
    # a rerun retries the failed run only (it fails again: the lr is still absurd)
    again = multirun(tmp_path, *QUICK, "dataset=digits", "protocol=tune", "optim.lr=1e-3,1e30,2e-3", exit_code=1)
    assert "2 ok (2 skipped" in summary_line(again.stdout) and "1 failed" in summary_line(again.stdout)


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path):
    res = multirun(tmp_path, *QUICK, "hydra/launcher=local", "dataset=digits", "protocol=tune", "method=linear,bitfit")
    assert "2 runs: 2 ok" in summary_line(res.stdout)
    logs = list((tmp_path / "sweeps").rglob(".submitit/*/*_log.out"))
    assert len(logs) == 2, "each run went through submitit as its own job"
    assert len(record_files(tmp_path)) == 2


@pytest.mark.slow
def test_tune_then_final_uses_the_best_val_hparams(tmp_path):
    # started outside the checkout with relative folders: the runs it launches write where select reads
    res = multirun(
        tmp_path, "linear", "--experiment", "smoke", "--tasks", "digits", script="scripts/vtab1k.py", from_tmp=True
    )
    records = [r for _, r in iter_records(tmp_path / "runs")]
    tune = [r for r in records if r["protocol"] == "tune"]
    final = [r for r in records if r["protocol"] == "final"]
    assert len(tune) == 2 and len(final) == 2 and all(r["status"] == "ok" for r in records)
    best = max(tune, key=lambda r: r["metrics"]["top1"])
    chosen_lr = best["config"]["optim"]["lr"]
    hparams = json.loads((tmp_path / "hparams" / "vit_tiny_patch16_224+random" / "linear.json").read_text())
    assert hparams["tasks"]["digits"]["values"] == {"optim.lr": chosen_lr}
    assert hparams["tasks"]["digits"]["val_top1"] == best["metrics"]["top1"]
    assert {r["seed"] for r in final} == {0, 1}
    assert all(r["config"]["optim"]["lr"] == chosen_lr for r in final)
    assert all(r["metrics"]["eval_split"] == "test" for r in final)
    assert "select: wrote" in res.stdout


def _record(dataset, lr, top1, protocol="tune", status="ok", method="lora", seed=0):
    return {
        "dataset": dataset,
        "protocol": protocol,
        "status": status,
        "method": method,
        "backbone": "b",
        "seed": seed,
        "metrics": {"top1": top1},
        "config": {"optim": {"lr": lr, "weight_decay": 0.0}},
    }


def test_select_hparams_picks_best_mean_and_ignores_the_rest():
    records = [
        _record("a", 1e-3, 50.0, seed=0),
        _record("a", 1e-3, 70.0, seed=1),  # mean 60
        _record("a", 1e-2, 65.0),  # 65: best
        _record("a", 1e-1, 99.0, status="failed"),  # failed runs never win
        _record("a", 1e-4, 99.0, protocol="final"),  # test-set numbers never choose
        _record("a", 1e-5, 99.0, method="ssf"),  # another method
        _record("b", 1e-3, 40.0),
        _record("b", 1e-2, 40.0),  # a tie: the first grid point in order wins
        {**_record("b", 1e-1, 90.0), "metrics": {"top1": 90.0, "stopped_at_epoch": 25}},  # halving stopped it
    ]
    chosen = select_hparams(records, ["optim.lr"], method="lora")
    assert chosen["a"]["values"] == {"optim.lr": 1e-2} and chosen["a"]["val_top1"] == 65.0
    assert chosen["a"]["n_candidates"] == 2
    assert chosen["b"]["values"] == {"optim.lr": 1e-3}
    assert chosen["a"]["tuned_by"] == "grid" and "stopped_at_rungs" not in chosen["a"]  # the choice says how
    assert chosen["b"]["tuned_by"] == "halving" and chosen["b"]["stopped_at_rungs"] == {"25": 1}


def test_records_are_written_readable_by_others(tmp_path):
    """An atomic write goes through a private temp file; the record it becomes has the usual mode."""
    import os
    import stat

    from vpeft.results.store import write_json_atomic

    old = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_vtab1k_grid_items_and_overrides_stay_apart(tmp_path):
    """Overrides after --grid go to every stage (the final runs and the select stage's config included), the
    grid to the tune stage only; a swept override outside --grid, which would sweep the final runs, is refused."""
    cmd = [sys.executable, str(ROOT / "scripts" / "vtab1k.py"), "lora", "--tasks", "digits", "--dry-run",
           "--grid", "optim.lr=1e-3,5e-3", "--grid", "optim.weight_decay=0,1e-4",
           "backbone=vit_tiny_random", f"paths.results={tmp_path / 'runs'}"]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    tune, final = [line.split() for line in res.stdout.splitlines() if line.startswith("$ ")]
    assert "protocol=tune" in tune and "optim.lr=1e-3,5e-3" in tune and "optim.weight_decay=0,1e-4" in tune
    assert "protocol=final" in final and not any(a.startswith(("optim.lr", "optim.weight_decay")) for a in final)
    for stage in (tune, final):
        assert "backbone=vit_tiny_random" in stage and f"paths.results={tmp_path / 'runs'}" in stage
    hparams = tmp_path / "hparams" / "vit_tiny_patch16_224+random" / "lora.json"
    assert f"over ['optim.lr', 'optim.weight_decay'] -> {hparams}" in res.stdout
    assert f"hparams={hparams}" in final

    res = subprocess.run([*cmd[:-2], "optim.weight_decay=0,1e-4"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "optim.weight_decay=0,1e-4 would sweep every stage" in res.stderr
    assert "a tune grid takes --grid optim.weight_decay=0,1e-4" in res.stderr
    res = subprocess.run([*cmd[:6], "--grid", "optim.lr"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "--grid takes one KEY=V1,V2 item, got 'optim.lr'" in res.stderr


def test_vtab1k_pack_reaches_both_stages_and_refuses_less_than_one(tmp_path):
    base = [sys.executable, str(ROOT / "scripts" / "vtab1k.py"), "lora", "--tasks", "digits", "--dry-run",
            "backbone=vit_tiny_random", f"paths.results={tmp_path / 'runs'}"]  # fmt: skip
    res = subprocess.run([*base, "--pack", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    stages = [line.split() for line in res.stdout.splitlines() if line.startswith("$ ")]
    assert len(stages) == 2 and all("pack=8" in stage for stage in stages)
    res = subprocess.run([*base, "--pack", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "--pack must be at least 1, got 0" in res.stderr
