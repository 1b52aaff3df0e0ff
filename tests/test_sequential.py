"""Sequential fine-tuning (job=sequential): task A's run continued on task B, A tested again with its own head."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_retention import TINY, color_task
from test_run import ROOT, run_inproc

from vpeft.results.sequential import read_sequential_record


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sequential")
    roots = {name: color_task(tmp / "tasks" / name, seed) for seed, name in enumerate(("a", "b"))}
    for method in ("linear", "lora", "full"):
        rec = run_inproc(tmp, *TINY, f"method={method}", "dataset=folder", f"dataset.root={roots['a']}")
        assert rec["status"] == "ok"
    return tmp, roots


def sequential(tmp, roots, method, *extra):
    return run_inproc(tmp, *TINY, f"method={method}", "job=sequential", f"paths.sequential={tmp / 'seq'}",
                      f"sequential.tasks=[folder:{roots['a']},folder:{roots['b']}]", *extra)  # fmt: skip


def _a_record(rec) -> dict:
    return json.loads(Path(rec["first"]["record"]).read_text())


def test_linear_probing_forgets_nothing_and_a_before_is_as_recorded(pair):
    """Only heads train: the backbone B sees is A's, A's head comes back untouched: A's top-1 after equals before,
    which equals A's own final record."""
    tmp, roots = pair
    rec = sequential(tmp, roots, "linear")
    assert rec["status"] == "ok" and rec["tasks"] == ["a", "b"]
    m = rec["metrics"]
    assert m["a_before"] == _a_record(rec)["metrics"]["top1"] == m["a_after"] and m["forgetting"] == 0.0
    [path] = list((tmp / "seq").rglob("a+b-seed0-*.json"))
    assert read_sequential_record(path) == json.loads(path.read_text())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_continued_run_is_measured_against_its_own_record(pair, method):
    tmp, roots = pair
    rec = sequential(tmp, roots, method)  # B trains with the settings A's run had (the same command)
    m = rec["metrics"]
    assert rec["status"] == "ok" and m["a_before"] == _a_record(rec)["metrics"]["top1"]
    assert m["forgetting"] == pytest.approx(m["a_before"] - m["a_after"])
    assert m["b_alone_top1"] is None  # B's own run was not trained here: nothing to stand beside it
    assert rec["second"]["epochs"] == 1 and rec["cost"]["trainable"] > 0


def test_a_missing_first_run_names_the_command_that_trains_it(pair):
    tmp, roots = pair
    base = [*TINY, "method=ssf", f"paths.results={tmp / 'runs'}", f"paths.cache={tmp / 'cache'}"]
    cmd = [sys.executable, "run.py", *base, "job=sequential", f"paths.sequential={tmp / 'seq'}",
           f"sequential.tasks=[folder:{roots['a']},folder:{roots['b']}]"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and not list((tmp / "seq").rglob("*ssf*")), out.stderr
    hint = shlex.split(out.stderr.split("train it first: ", 1)[1])
    assert hint == ["python", "run.py", *base, "dataset=folder", f"dataset.root={roots['a']}"]


@pytest.mark.parametrize(
    "bad, says",
    [("sequential.tasks=[digits]", "must be two tasks"), ("sequential.tasks=[digits,digits]", "names one task twice"),
     ("method=adalora", "does not continue adalora")],
)  # fmt: skip
def test_bad_input_exits_2_before_anything_runs(pair, bad, says, capsys):
    tmp, roots = pair
    with pytest.raises(SystemExit) as e:
        sequential(tmp, roots, "lora", bad)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_the_page_puts_forgetting_beside_top1(pair, tmp_path):
    """The leaderboard's forgetting section: each probed run's target top-1 beside its retention, the sequential
    drops, their CSVs and the trade-off plot, all from the records."""
    from vpeft.results.render import write_leaderboard

    tmp, roots = pair
    for method in ("linear", "lora"):
        job = ["job=retention", f"paths.retention={tmp / 'ret'}", f"probe.tasks=[folder:{roots['b']}]"]
        rec = run_inproc(tmp, *TINY, f"method={method}", "dataset=folder", f"dataset.root={roots['a']}", *job)
        assert rec["status"] == "ok"
        sequential(tmp, roots, method)
    out = tmp_path / "lb"
    written = write_leaderboard(tmp / "runs", out, retention_dir=tmp / "ret", sequential_dir=tmp / "seq")
    md = written["leaderboard.md"].read_text()
    assert "## Forgetting (retention and sequential records)" in md
    ret = [ln for ln in md.splitlines() if ln.startswith("| linear") and "100.0" in ln]
    assert ret, "linear probing keeps 100% of the features"
    csv = written["retention.csv"].read_text().splitlines()
    assert csv[0].startswith("backbone,method,dataset,seed,target_top1,retention") and len(csv) == 3
    seq = pd.read_csv(written["sequential.csv"]).set_index("method")
    assert {"linear", "lora"} <= set(seq.index) and seq.loc["linear", "forgetting"] == 0.0
    assert (out / "forgetting_vit-tiny-patch16-224-random.svg").is_file()
    # beside top-1 in the run tables: each row's mean retention over its probed runs
    lines = md.splitlines()
    header = next(ln for ln in lines if ln.startswith("| method") and "retention (%)" in ln and "peak mem" in ln)
    cols = [c.strip() for c in header.strip("|").split("|")]
    cells = [[x.strip() for x in ln.strip("|").split("|")] for ln in lines if ln.startswith(("| linear", "| lora"))]
    rows = {c[0]: dict(zip(cols, c)) for c in cells if len(c) == len(cols)}
    assert rows["linear"]["retention (%)"] == "100.0" and rows["lora"]["retention (%)"] != "–"
    with pytest.raises(Exception, match="no retention folder"):
        write_leaderboard(tmp / "runs", out, retention_dir=tmp / "nowhere")
