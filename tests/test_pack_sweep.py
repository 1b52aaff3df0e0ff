"""``run.py -m ... pack=K``: packed runs through the real sweep, with real processes and signals.

A packed run leaves the record a run alone leaves (identity, config hash, path, top-1), a rerun skips what
finished and trains only what is missing, a bad value refuses its run and not its pack, and SIGTERM during
the pack's training records every run of the pack ``interrupted``.
"""

from __future__ import annotations

import json
import signal

import pytest
from test_sweep_faults import QUICK, signal_when, start, summary_line

from vpeft.results import read_record

# one backbone (seed 0), two learning rates x two LoRA alphas: one pack
GRID = ["method=lora", "optim.lr=1e-3,1e-2", "method.alpha=8,16"]


def sweep(tmp, *args: str, timeout: float = 600) -> tuple[int, str]:
    proc = start(tmp, *QUICK, *args)
    out = proc.communicate(timeout=timeout)[0]
    return proc.returncode, out


def records(tmp) -> dict[str, dict]:
    return {p.name: read_record(p) for p in sorted((tmp / "runs").rglob("*.json"))}


@pytest.mark.slow
def test_packed_records_are_the_records_of_runs_alone(tmp_path):
    code, out = sweep(tmp_path / "packed", *GRID, "trainer.epochs=2", "pack=4")
    assert code == 0, out[-3000:]
    assert "4 runs in 1 packs of at most 4" in out
    assert summary_line(out).startswith("sweep: 4 runs: 4 ok")
    code, alone_out = sweep(tmp_path / "alone", *GRID, "trainer.epochs=2")
    assert code == 0, alone_out[-3000:]
    packed, alone = records(tmp_path / "packed"), records(tmp_path / "alone")
    assert sorted(packed) == sorted(alone)  # the same identities, hashes and so record names
    for name, rec in packed.items():
        other = alone[name]
        for key in ("method", "dataset", "backbone", "protocol", "seed", "compute", "config_hash"):
            assert rec[key] == other[key]
        assert rec["metrics"]["top1"] == other["metrics"]["top1"]
        assert rec["metrics"]["train_loss"] == pytest.approx(other["metrics"]["train_loss"], rel=1e-5)
        assert rec["cost"]["packed"]["k"] == 4 and "packed" not in other["cost"]
    assert sorted(r["config"]["method"]["alpha"] for r in packed.values()) == [8, 8, 16, 16]
    statuses = sorted((tmp_path / "packed" / "sweep").glob("0/vpeft_status.*.json"))
    assert [json.loads(p.read_text())["num"] for p in statuses] == [0, 1, 2, 3]

    first = sorted((tmp_path / "packed" / "runs").rglob("*.json"))[0]
    first.unlink()  # a rerun trains only the missing run and skips the others
    code, out = sweep(tmp_path / "packed", *GRID, "trainer.epochs=2", "pack=4")
    assert code == 0, out[-3000:]
    assert out.count("skipped (finished)") == 3 and out.count("| record:") == 1
    assert first.exists()


@pytest.mark.slow
def test_runs_that_differ_in_more_than_task_seed_lr_and_wd_go_to_other_packs(tmp_path):
    """LoRA and SSF never share a pack; a bad dataset refuses its own runs and the others finish."""
    code, out = sweep(tmp_path, "method=lora,ssf", "optim.lr=1e-3,1e-2", "dataset=digits,folder", "trainer.epochs=1",
                      "pack=8")  # fmt: skip
    assert code == 2, out[-3000:]  # bad input in the sweep: exit 2, the summary names the fix
    assert "8 runs in 2 packs of at most 8" in out  # dataset may differ within a pack, the method not
    line = summary_line(out)
    assert line.startswith("sweep: 8 runs: 4 ok") and "4 bad input" in line, line
    methods = sorted(r["method"] for r in records(tmp_path).values())
    assert methods == ["lora", "lora", "ssf", "ssf"]
    assert "dataset.root must be set" in out and out.count("    dataset=folder method=") == 4, out[-2000:]
    assert "pack_job" not in out.split("sweep: 8 runs")[1]  # each run named by its own overrides


@pytest.mark.slow
def test_sigterm_during_a_packs_training_records_every_run_interrupted(tmp_path):
    proc = start(tmp_path, *QUICK, *GRID, "trainer.epochs=400", "trainer.progress=true", "pack=4")
    out = signal_when(proc, "training 4 packed runs, epoch 1/400", signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    recs = records(tmp_path)
    assert len(recs) == 4 and {r["status"] for r in recs.values()} == {"interrupted"}, recs
    assert "4 interrupted" in summary_line(out)


def test_a_merge_job_in_a_packed_sweep_is_refused_with_the_fix(tmp_path):
    code, out = sweep(tmp_path, "job=merge", "merge.tasks=[a,b]", "pack=2")
    assert code == 2, out[-3000:]
    assert "pack=2 trains runs together, and a job=merge job is not a training run: run it without pack=" in out


@pytest.mark.parametrize("manifest", [None, "{not json", '{"packs": [[{"num": 0, "overrides": []}]]}'])
def test_a_pack_job_without_its_pack_says_how_to_run_it(tmp_path, manifest):
    """pack_job set by hand, with the sweep's manifest missing, corrupt or without that pack: exit 2, no record."""
    if manifest is not None:
        (tmp_path / "sweep").mkdir()
        (tmp_path / "sweep" / "vpeft_packs.json").write_text(manifest)
    proc = start(tmp_path, *QUICK, "pack_job=3", f"hydra.sweep.dir={tmp_path / 'sweep'}", sweep=False)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, out[-3000:]
    assert f"error: pack_job=3: no such pack in {tmp_path / 'sweep' / 'vpeft_packs.json'}" in out, out[-3000:]
    assert "run the sweep with pack=K instead of setting pack_job" in out
    assert not (tmp_path / "runs").exists()
