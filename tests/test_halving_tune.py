"""``scripts/vtab1k.py --tune halving``: successive halving as the tune stage, with real runs (tiny ViT, digits)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_sweep import ROOT, multirun

from vpeft.results import iter_records, load_records
from vpeft.results.leaderboard import build_leaderboard

GRID = ["--grid", "optim.lr=1e-3,3e-3,1e-2,3e-2", "trainer.epochs=4"]


@pytest.mark.slow
def test_halving_trains_each_point_only_as_far_as_it_survives(tmp_path):
    """Four points, rungs 1, 2, 4 of 4 epochs, eta 2: all four train one epoch, the best two a second, the best of
    those to the end; the stopped ones keep their rung's record and the select stage picks the finisher."""
    res = multirun(tmp_path, "linear", "--experiment", "smoke", "--tasks", "digits", "--tune", "halving",
                   "--stage", "tune", "select", *GRID, script="scripts/vtab1k.py", from_tmp=True)  # fmt: skip
    tune = {r["config"]["optim"]["lr"]: r for _, r in iter_records(tmp_path / "runs") if r["protocol"] == "tune"}
    assert len(tune) == 4 and all(r["status"] == "ok" for r in tune.values())
    stops = {lr: r["metrics"]["stopped_at_epoch"] for lr, r in tune.items()}
    assert sorted(stops.values(), key=lambda s: s or 9) == [1, 1, 2, None]
    # who went on is who was best at the rung: the hand-checked rule on the records' own numbers
    first = {lr: r["metrics"]["history"][0]["eval_top1"] for lr, r in tune.items()}
    survivors = sorted(tune, key=lambda lr: (-first[lr], lr))[:2]
    assert {lr for lr, s in stops.items() if s != 1} == set(survivors)
    second = {lr: tune[lr]["metrics"]["history"][1]["eval_top1"] for lr in survivors}
    finisher = sorted(survivors, key=lambda lr: (-second[lr], lr))[0]
    assert stops[finisher] is None and tune[finisher]["metrics"]["epochs"] == 4
    hparams = json.loads((tmp_path / "hparams" / "vit_tiny_patch16_224+random" / "linear.json").read_text())
    assert hparams["tasks"]["digits"]["values"] == {"optim.lr": finisher}
    assert hparams["tasks"]["digits"]["n_candidates"] == 1
    halving = json.loads((tmp_path / "hparams" / "vit_tiny_patch16_224+random" / "linear.halving.json").read_text())
    assert halving["rungs"] == [1, 2, 4] and len(halving["stopped"]["digits"]) == 3
    assert "digits: 2 of 4 points go on past epoch 1" in res.stdout
    assert "digits: 1 of 2 points go on past epoch 2" in res.stdout
    assert len(list((tmp_path / "runs").rglob("*.rung.pt"))) == 3  # stopped points keep their rung's state

    again = multirun(tmp_path, "linear", "--experiment", "smoke", "--tasks", "digits", "--tune", "halving",
                     "--stage", "tune", *GRID, script="scripts/vtab1k.py", from_tmp=True)  # fmt: skip
    assert "| record:" not in again.stdout and again.stdout.count("skipped (finished)") == 12  # it trains nothing

    # a lost or broken halving file is rebuilt from the records (each point's evaluation at each rung): the same
    # decisions, nothing trained again
    file = tmp_path / "hparams" / "vit_tiny_patch16_224+random" / "linear.halving.json"
    file.write_text('{"kind": "vpeft.halving/1", "stopped": ')
    again = multirun(tmp_path, "linear", "--experiment", "smoke", "--tasks", "digits", "--tune", "halving",
                     "--stage", "tune", *GRID, script="scripts/vtab1k.py", from_tmp=True)  # fmt: skip
    assert "| record:" not in again.stdout and again.stdout.count("skipped (finished)") == 12
    assert json.loads(file.read_text()) == halving

    # the choice is labelled: in the hyperparameter file, the final run's config and the leaderboard's recipe table
    assert hparams["tasks"]["digits"]["tuned_by"] == "halving"
    assert hparams["tasks"]["digits"]["stopped_at_rungs"] == {"1": 2, "2": 1}
    multirun(tmp_path, "linear", "--experiment", "smoke", "--tasks", "digits", "--stage", "final", "--seeds", "0",
             "trainer.epochs=4", script="scripts/vtab1k.py", from_tmp=True)  # fmt: skip
    [final] = [r for _, r in iter_records(tmp_path / "runs") if r["protocol"] == "final"]
    assert final["status"] == "ok" and final["config"]["tuned_by"] == "halving"
    assert final["config"]["optim"]["lr"] == finisher
    rows = build_leaderboard(load_records(tmp_path / "runs")).rows
    assert rows["tuned_by"].tolist() == ["halving"]


@pytest.mark.slow
def test_with_pack_the_survivors_of_a_rung_train_together(tmp_path):
    """--pack 2: the four points train a first epoch in two packs; the two that go on continue from their rung in
    one pack (the stopped points, listed first and third, take no place in it); the finisher trains alone."""
    grid = ["--grid", "optim.lr=3e-2,1e-3,1e-2,3e-3", "trainer.epochs=4"]  # the best two sit in different halves
    multirun(tmp_path, "linear", "--experiment", "smoke", "--tasks", "digits", "--tune", "halving", "--pack", "2",
             "--stage", "tune", *grid, script="scripts/vtab1k.py", from_tmp=True)  # fmt: skip
    tune = {r["config"]["optim"]["lr"]: r for _, r in iter_records(tmp_path / "runs") if r["protocol"] == "tune"}
    stops = {lr: r["metrics"]["stopped_at_epoch"] for lr, r in tune.items()}
    assert sorted(stops.values(), key=lambda s: s or 9) == [1, 1, 2, None]
    first = {lr: r["metrics"]["history"][0]["eval_top1"] for lr, r in tune.items()}
    survivors = sorted(tune, key=lambda lr: (-first[lr], lr))[:2]
    assert {lr for lr, s in stops.items() if s != 1} == set(survivors)
    assert {(tune[lr]["cost"].get("packed") or {}).get("k") for lr in stops if stops[lr] == 1} == {2}
    [second] = [lr for lr in stops if stops[lr] == 2]
    packed = tune[second]["cost"]["packed"]
    assert packed["k"] == 2 and packed["pack_id"] not in {tune[lr]["cost"]["packed"]["pack_id"] for lr in stops
                                                          if stops[lr] == 1}  # fmt: skip
    # the rung's numbers are the history's: the continued run keeps its first epoch's evaluation
    [finisher] = [lr for lr in stops if stops[lr] is None]
    assert tune[finisher]["metrics"]["history"][0]["eval_top1"] == first[finisher]
    assert tune[finisher]["metrics"]["history"][1]["eval_top1"] is not None


def test_a_broken_halving_file_given_to_a_run_is_bad_input(tmp_path):
    broken = tmp_path / "linear.halving.json"
    broken.write_text("not json")
    cmd = [sys.executable, str(ROOT / "run.py"), "backbone=vit_tiny_random", "dataset=digits", "protocol=tune",
           "trainer.epochs=2", "bench.latency=false", f"halving={broken}", "stop_after=1",
           f"paths.results={tmp_path / 'runs'}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"halving={broken}: Expecting value" in done.stderr and "scripts/vtab1k.py --tune halving" in done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--eta", "1"], "eta must be a whole number >= 2"),
    (["--rungs", "1,3"], "the last halving rung is the schedule's end"),
    (["--rungs", "x"], "--rungs / --eta"),
])  # fmt: skip
def test_bad_halving_options_exit_2_with_the_reason(args, message):
    cmd = [sys.executable, str(ROOT / "scripts" / "vtab1k.py"), "linear", "--experiment", "smoke", "--tasks",
           "digits", "--tune", "halving", "--dry-run", *args, "trainer.epochs=4"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
