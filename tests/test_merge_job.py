"""The merge job end to end (`run.py job=merge`): tune deltas choose, final deltas are tested, records, bad input."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
from data_helpers import write_noah
from test_run import ROOT, odd_images, run_inproc

from vpeft.results.merges import read_merge_record

TINY = ["backbone=vit_tiny_random", "method=lora", "trainer.epochs=1", "bench.latency=false", "bench.flops=false",
        "trainer.progress=false", "trainer.batch_size=8"]  # fmt: skip
SPLITS = ("train800", "val200", "train800val200", "test")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Two small real-image task folders, each task's tune and final LoRA runs done (a pool not in
    alphabetical order: a pool is a set of tasks wherever it is shown)."""
    tmp = tmp_path_factory.mktemp("merge")
    return tmp, trained_pool(tmp)


def trained_pool(tmp) -> list[str]:
    """Task folders beta and alpha under ``tmp``, each with its tune and final LoRA runs; the pool's tasks."""
    tasks = []
    for k, name in enumerate(("beta", "alpha")):
        root = write_noah(tmp / "tasks" / name, {s: odd_images(12, seed=k * 10 + i) for i, s in enumerate(SPLITS)})
        tasks.append(f"folder:{root}")
        for protocol in ("tune", "final"):
            record = run_inproc(tmp, *TINY, "dataset=folder", f"dataset.root={root}", f"protocol={protocol}")
            assert record["status"] == "ok"
    return tasks


def merge(tmp, tasks, *overrides):
    return run_inproc(tmp, *TINY, "job=merge", f"paths.merges={tmp / 'merges'}", f"merge.tasks=[{','.join(tasks)}]",
                      *overrides)  # fmt: skip


def test_a_merge_record_per_task_and_normalized_accuracy(pool):
    tmp, tasks = pool
    record = merge(tmp, tasks, "merge=task_arithmetic", "merge.grid.lam=[0.0,1.0]")
    assert record["status"] == "ok" and record["tasks"] == ["beta", "alpha"]
    assert record["params"]["lam"] in (0.0, 1.0) and len(record["selection"]["grid"]) == 2
    for task in record["per_task"].values():
        assert task["normalized"] == pytest.approx(task["top1"] / task["individual_top1"])
        assert task["eval_split"] == "test" and task["delta_file"].endswith(".safetensors")
    means = record["metrics"]
    assert means["mean_top1"] == pytest.approx(sum(t["top1"] for t in record["per_task"].values()) / 2)
    # the selection is on val200: its grid scores are the chosen point's val top-1
    chosen = next(g for g in record["selection"]["grid"] if g["params"] == record["params"])
    assert {t: s["val_top1"] for t, s in record["per_task"].items()} == chosen["val_top1"]
    [path] = list((tmp / "merges").rglob("task_arithmetic-*.json"))
    assert read_merge_record(path) == json.loads(path.read_text())
    # the same merge again is finished: skipped, not redone
    assert merge(tmp, tasks, "merge=task_arithmetic", "merge.grid.lam=[0.0,1.0]") == read_merge_record(path)


def test_a_pool_in_another_order_is_the_same_merge(pool, capsys):
    """A pool is a set: the merge of [alpha, beta] after [beta, alpha] is finished, with one record."""
    tmp, tasks = pool
    first = merge(tmp, tasks, "merge=task_arithmetic", "merge.grid.lam=[0.0,1.0]")
    [path] = list((tmp / "merges").rglob("task_arithmetic-*.json"))
    before = path.read_bytes()
    capsys.readouterr()
    again = merge(tmp, tasks[::-1], "merge=task_arithmetic", "merge.grid.lam=[0.0,1.0]")
    out = capsys.readouterr().out
    assert f"skipped (finished): {path}" in out and "%)" in out
    assert list((tmp / "merges").rglob("task_arithmetic-*.json")) == [path] and path.read_bytes() == before
    assert again == read_merge_record(path) and again["tasks"] == first["tasks"] == ["beta", "alpha"]
    # negation's [target, control] is an order: the other order is another merge
    negation = merge(tmp, tasks, "merge=negation", "merge.grid.lam=[0.5,1.0]")
    swapped = merge(tmp, tasks[::-1], "merge=negation", "merge.grid.lam=[0.5,1.0]")
    assert negation["config_hash"] != swapped["config_hash"] and swapped["tasks"] == ["alpha", "beta"]


def test_test_labels_never_choose(pool, tmp_path):
    """Rewriting every test label changes the test scores but not the coefficients chosen."""
    tmp, tasks = pool
    before = merge(tmp, tasks, "merge=ties", "merge.grid.lam=[0.5,1.0]", "merge.grid.density=[0.2,1.0]")
    for task in tasks:
        test = tmp / "tasks" / task.split("/")[-1] / "test.txt"
        lines = [line.split() for line in test.read_text().splitlines()]
        test.write_text("".join(f"{p} {(int(y) + 1) % 3}\n" for p, y in lines))
    after = merge(tmp, tasks, "merge=ties", "merge.grid.lam=[0.5,1.0]", "merge.grid.density=[0.2,1.0]",
                  "skip_finished=false")  # fmt: skip
    assert after["params"] == before["params"]
    assert after["selection"]["grid"] == before["selection"]["grid"]


def test_negation_records_the_drop_and_the_control(pool):
    tmp, tasks = pool
    record = merge(tmp, tasks, "merge=negation", "merge.grid.lam=[0.5,1.0]")
    assert record["status"] == "ok" and record["algorithm"] == "negation"
    target = record["per_task"]["beta"]
    assert record["metrics"]["target_drop"] == pytest.approx(target["individual_top1"] - target["top1"])
    assert "control" in record["selection"]["rule"]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["merge.tasks=[digits]"], "at least two distinct tasks"),
        (["merge=ties", "+merge.grid.alpha=[1]"], "has no parameter 'alpha'"),
        (["method=vpt_deep"], "mergeable methods:"),
        (["merge.space=diagonal"], "merge.space must be one of"),
        (["merge.tasks=[digits,nosuch]"], "unknown task 'nosuch'"),
        (["merge.tasks=[digits,fashion_mnist]"], "train it first: python run.py method=lora protocol=tune"),
        (["+merge.spaces=delta"], "unknown key merge.spaces; did you mean merge.space=delta?"),
    ],
)
def test_bad_input_exits_2_without_a_record(overrides, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_inproc(tmp_path, *TINY, "job=merge", f"paths.merges={tmp_path / 'merges'}", "merge.tasks=[digits,x]",
                   *overrides)  # fmt: skip
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "merges").exists()


def test_an_unknown_job_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_inproc(tmp_path, *TINY, "job=nosuch")
    assert e.value.code == 2 and "jobs: train, merge" in capsys.readouterr().err


def test_leaderboard_composition_section_from_merge_records_and_fusion_runs(pool, tmp_path):
    """Method x algorithm from the merge records, AdapterFusion from its runs normalized by each task's own
    adapter, parameters from the deltas' run records: every number against the records it comes from."""
    import pandas as pd

    from vpeft.results.render import write_leaderboard
    from vpeft.results.store import iter_records

    tmp, tasks = pool
    ta = merge(tmp, tasks, "merge=task_arithmetic", "merge.grid.lam=[0.0,1.0]")
    merge(tmp, tasks, "merge=negation", "merge.grid.lam=[0.5,1.0]")
    adapters = {}
    for task in tasks:
        root = task.split(":", 1)[1]
        for protocol in ("tune", "final"):
            rec = run_inproc(tmp, *TINY, "method=adapter_pfeiffer", "dataset=folder", f"dataset.root={root}",
                             f"protocol={protocol}")  # fmt: skip
            assert rec["status"] == "ok"
        adapters[root] = rec
    files = [str(p.with_suffix(".safetensors")) for p, r in iter_records(tmp / "runs")
             if r["method"] == "adapter_pfeiffer" and r["protocol"] == "final"]  # fmt: skip
    assert len(files) == 2
    fused = {}
    for root in adapters:
        fused[root] = run_inproc(tmp, *TINY, "method=adapter_fusion", f"method.adapters=[{','.join(files)}]",
                                 "dataset=folder", f"dataset.root={root}", "protocol=final")  # fmt: skip
        assert fused[root]["status"] == "ok"

    out = tmp_path / "lb"
    written = write_leaderboard(tmp / "runs", out, merges_dir=tmp / "merges")
    comp = pd.read_csv(written["composition.csv"])
    row = comp[(comp["method"] == "lora") & (comp["algorithm"] == "task_arithmetic")].iloc[0]
    assert row["top1"] == pytest.approx(ta["metrics"]["mean_top1"], abs=1e-4)
    assert row["normalized"] == pytest.approx(100 * ta["metrics"]["mean_normalized"], abs=1e-4)
    assert row["individual_top1"] == pytest.approx(ta["metrics"]["mean_individual_top1"], abs=1e-4)
    lora_final = [r for _, r in iter_records(tmp / "runs") if r["method"] == "lora" and r["protocol"] == "final"]
    assert row["params"] == row["delta_params"] == lora_final[0]["params"]["trainable_excl_head"]
    assert "negation" not in set(comp["algorithm"])  # forgetting is its own table
    assert set(comp["tasks"]) == {"alpha+beta"}  # merges and fusion runs of one pool: one table
    fusion = comp[comp["algorithm"] == "AdapterFusion"].iloc[0]
    assert fusion["method"] == "adapter_pfeiffer" and fusion["n_tasks"] == 2
    by_hand = [100 * fused[r]["metrics"]["top1"] / adapters[r]["metrics"]["top1"] for r in adapters]
    assert fusion["normalized"] == pytest.approx(sum(by_hand) / 2, abs=1e-4)
    assert fusion["top1"] == pytest.approx(sum(fused[r]["metrics"]["top1"] for r in adapters) / 2, abs=1e-4)
    adapter = next(iter(adapters.values()))["params"]["trainable_excl_head"]
    fusion_layers = next(iter(fused.values()))["params"]["trainable_excl_head"]
    assert fusion["delta_params"] == adapter  # the table's column: one task's adapter
    assert fusion["params"] == fusion_layers + 2 * adapter  # the plot: the fusion layers and both adapters
    md = written["leaderboard.md"].read_text()
    assert "## Composition (merge records, AdapterFusion runs)" in md and "Negation: forgetting one task" in md
    assert f"{ta['metrics']['mean_top1']:.1f} ({100 * ta['metrics']['mean_normalized']:.0f}%)" in md
    assert any(name.startswith("composition_") and name.endswith(".png") for name in written)  # lora and fusion
    # a missing merges folder is a named error
    with pytest.raises(Exception, match="no merges folder"):
        write_leaderboard(tmp / "runs", out, merges_dir=tmp / "nosuch")


def test_every_missing_run_is_named_with_a_command_that_trains_it(tmp_path):
    """Three tasks, one run done: the merge names the five missing runs, each with its whole command line; the
    one command that trains them all, run as printed, makes the merge go through."""
    roots = [write_noah(tmp_path / "tasks" / n, {s: odd_images(12, seed=k * 10 + i) for i, s in enumerate(SPLITS)})
             for k, n in enumerate(("beta", "alpha", "gamma"))]  # fmt: skip
    paths = [f"paths.results={tmp_path / 'runs'}", f"paths.cache={tmp_path / 'cache'}"]
    assert run_inproc(tmp_path, *TINY, "dataset=folder", f"dataset.root={roots[0]}", "protocol=tune")["status"] == "ok"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def merge_cli() -> subprocess.CompletedProcess:
        cmd = [sys.executable, "run.py", *TINY, *paths, "job=merge", "merge.grid.lam=[1.0]",
               f"paths.merges={tmp_path / 'merges'}", f"hydra.run.dir={tmp_path / 'hydra'}",
               f"merge.tasks=[{','.join(f'folder:{r}' for r in roots)}]"]  # fmt: skip
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    res = merge_cli()
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if "train it first: " in line]
    commands = [shlex.split(line.split("train it first: ", 1)[1]) for line in lines]
    named = {(c[c.index("dataset=folder") + 1], next(a for a in c if a.startswith("protocol="))) for c in commands}
    expected = {(f"dataset.root={r}", f"protocol={p}") for r in roots for p in ("tune", "final")}
    assert named == expected - {(f"dataset.root={roots[0]}", "protocol=tune")}  # every missing run, no other
    for c in commands:  # every override that decides a run's identity, nothing of the merge's own
        assert c[:3] == ["python", "run.py", "method=lora"] and "..." not in c
        assert {*TINY, *paths} <= set(c)
        assert not any(a.startswith(("job=", "merge", "paths.merges", "hydra")) for a in c)
    [sweep] = [line.split("or all at once (finished runs are skipped): ", 1)[1] for line in res.stderr.splitlines()
               if "or all at once" in line]  # fmt: skip
    args = shlex.split(sweep)
    assert args[:3] == ["python", "run.py", "-m"] and "protocol=tune,final" in args
    train = subprocess.run([sys.executable, *args[1:], f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    assert "6 runs: 6 ok (1 skipped as already finished)" in train.stdout
    res = merge_cli()
    assert res.returncode == 0, res.stderr[-3000:]
    assert "task_arithmetic (weights) of lora over beta, alpha, gamma" in res.stdout
