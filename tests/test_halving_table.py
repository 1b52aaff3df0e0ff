"""The halving validation table on records built by hand: picks, regret, spread, cost, and its refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from vpeft.errors import ConfigError
from vpeft.results import iter_records
from vpeft.results.halving import halving_table, summary, untested_picks

ROOT = Path(__file__).resolve().parents[1]


def record(protocol: str, task: str, lr: float, seed: int, top1: float, at: dict[int, float] | None = None) -> dict:
    history = [{"epoch": e, "train_loss": 1.0, "lr": lr, "eval_top1": (at or {}).get(e)} for e in range(1, 9)]
    return {
        "status": "ok", "method": "lora", "backbone": "vit", "dataset": task, "protocol": protocol, "seed": seed,
        "config": {"optim": {"lr": lr}, "trainer": {"epochs": 8}, "seed": seed, "method": {"name": "lora"}},
        "metrics": {"top1": top1, "history": history},
    }  # fmt: skip


# val top-1 at the rungs 2 and 4 (8 is the run's top-1) of four learning rates on two tasks
TUNE = {
    "digits": {1e-3: (50, 60, 70), 2e-3: (55, 58, 90), 3e-3: (40, 80, 95), 4e-3: (56, 65, 66)},
    "dtd": {1e-3: (10, 20, 30), 2e-3: (50, 60, 70), 3e-3: (5, 6, 7), 4e-3: (1, 2, 3)},
}
# test top-1 of final runs (three seeds) of some grid points
FINAL = {("digits", 3e-3): (80, 82, 84), ("digits", 4e-3): (70, 71, 72), ("dtd", 2e-3): (60, 61, 62)}


def records() -> list[dict]:
    out = [record("tune", t, lr, 0, v[2], {2: v[0], 4: v[1]}) for t, grid in TUNE.items() for lr, v in grid.items()]
    out += [record("final", t, lr, s, v) for (t, lr), vs in FINAL.items() for s, v in enumerate(vs)]
    return out


def test_halving_against_the_full_grid():
    """digits: the full grid picks 3e-3 (95), halving drops it at rung 2 (40, last) and keeps 2e-3 and 4e-3, of
    which 4e-3 goes on past rung 4 (65 > 58): the regret is 82 - 71 = 11 points; dtd: both pick 2e-3."""
    table = halving_table(records(), eta=2)
    digits, dtd = table.iloc[0].to_dict(), table.iloc[1].to_dict()
    assert digits["task"] == "digits" and digits["rungs"] == "2/4/8" and digits["points"] == 4
    assert digits["full_pick"] == "lr=0.003" and digits["halving_pick"] == "lr=0.004" and not digits["same"]
    assert (digits["full_val"], digits["halving_val"]) == (95, 66)
    assert (digits["full_test"], digits["halving_test"], digits["regret"]) == (82, 71, 11)
    assert digits["seed_spread"] == pytest.approx(2.0) and digits["final_seeds"] == 3
    assert digits["cost"] == pytest.approx((4 * 2 + 2 * 2 + 1 * 4) / 32)
    assert dtd["same"] and dtd["regret"] == 0 and dtd["halving_pick"] == "lr=0.002"
    s = summary(table)
    assert s["agreement"] == 0.5 and s["mean_regret"] == 5.5 and s["worst_regret"] == 11 and s["regret_rows"] == 2


def test_without_final_runs_of_a_pick_the_regret_is_unknown():
    table = halving_table([r for r in records() if not (r["protocol"] == "final" and r["dataset"] == "digits"
                                                        and r["config"]["optim"]["lr"] == 4e-3)])  # fmt: skip
    assert table.iloc[0]["regret"] is None or table.iloc[0]["regret"] != table.iloc[0]["regret"]  # None or NaN
    assert summary(table)["regret_rows"] == 1
    # the final runs that would give it: halving's pick on digits, as a hyperparameter file's entry
    assert untested_picks(table) == {("vit", "lora"): {"digits": {"values": {"optim.lr": 4e-3}, "val_top1": 66,
                                                                  "tuned_by": "halving"}}}  # fmt: skip
    assert untested_picks(halving_table(records())) == {}  # every differing pick has its final runs


def test_runs_that_did_not_evaluate_at_a_rung_are_refused_with_the_fix():
    recs = records()
    recs[0]["metrics"]["history"][1]["eval_top1"] = None  # digits 1e-3 has no val top-1 after epoch 2
    with pytest.raises(ConfigError, match=r"no val top-1 after epoch 2, a halving rung; .*trainer.eval_every=2"):
        halving_table(recs)


@pytest.mark.slow
def test_the_script_on_a_real_grid(tmp_path):
    """Two learning rates tuned for 4 epochs with val200 after every epoch, then final runs of both at two seeds
    (real runs): the script replays halving at rungs 2 and 4 and its table says what the records say."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["backbone=vit_tiny_random", "dataset=digits", "trainer.epochs=4", "trainer.warmup_epochs=0",
              "trainer.eval_every=1", "bench.latency=false", "save_delta=false", f"paths.results={tmp_path / 'runs'}",
              f"paths.cache={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    for stage in (["protocol=tune", "seed=0"], ["protocol=final", "seed=0,1"]):
        done = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", *stage, "optim.lr=1e-3,3e-2", *common],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    recs = [r for _, r in iter_records(tmp_path / "runs")]
    tune = sorted((r for r in recs if r["protocol"] == "tune"), key=lambda r: r["config"]["optim"]["lr"])
    val = {r["config"]["optim"]["lr"]: r["metrics"]["top1"] for r in tune}
    at2 = {r["config"]["optim"]["lr"]: r["metrics"]["history"][1]["eval_top1"] for r in tune}
    full = max(sorted(val), key=lambda lr: val[lr])  # the first of equals in grid order
    halved = max(sorted(at2), key=lambda lr: at2[lr])  # one of two goes on at rung 2
    test = {lr: [r["metrics"]["top1"] for r in recs if r["protocol"] == "final" and r["config"]["optim"]["lr"] == lr]
            for lr in val}  # fmt: skip

    base = [sys.executable, str(ROOT / "scripts" / "halving_sim.py"), str(tmp_path / "runs"), "--out",
            str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run([*base, "--rungs", "2,4"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(tmp_path / "out" / "halving.csv")
    row = table.iloc[0]
    assert len(table) == 1 and row["points"] == 2 and row["rungs"] == "2/4"
    assert row["full_pick"] == f"lr={full}" and row["halving_pick"] == f"lr={halved}"
    assert row["same"] == (full == halved)
    assert row["cost"] == pytest.approx((2 * 2 + 1 * 2) / 8)
    regret = sum(test[full]) / 2 - sum(test[halved]) / 2
    assert row["regret"] == pytest.approx(regret, abs=1e-3)
    assert f"1 grids: halving (eta 2) picks the full grid's point in {100 * (full == halved):.0f}%" in done.stdout

    bad = subprocess.run([*base, "--rungs", "2,x"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--rungs takes epochs separated by commas" in bad.stderr
    short = subprocess.run([*base, "--rungs", "2,3"], capture_output=True, text=True, timeout=120)
    assert short.returncode == 2 and "the last halving rung is the schedule's end" in short.stderr
    late = subprocess.run([*base, "--rungs", "1,4", "--eta", "1"], capture_output=True, text=True, timeout=120)
    assert late.returncode == 2 and "eta must be a whole number >= 2" in late.stderr
