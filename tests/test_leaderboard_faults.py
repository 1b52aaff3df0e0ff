"""The leaderboard script's output folder, impossible records, and pages with little or nothing to rank."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
from test_leaderboard import make_record
from test_run import ROOT

from vpeft.results import record_path, validate
from vpeft.results.record import RecordError
from vpeft.results.render import write_leaderboard
from vpeft.results.store import write_record

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
}


# -- the leaderboard script writes user output to outputs/, and says where -----------------------


def _script(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "leaderboard.py"), *args], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_leaderboard_script_without_out_leaves_the_committed_leaderboard_alone(tmp_path):
    runs = tmp_path / "outputs" / "runs"
    r = make_record(dataset="digits", top1=95.0)
    write_record(record_path(runs, r), r)
    committed = tmp_path / "results" / "leaderboard" / "leaderboard.md"
    committed.parent.mkdir(parents=True)
    committed.write_text("the committed page\n")
    res = _script(tmp_path, "outputs/runs")
    assert res.returncode == 0, res.stderr[-3000:]
    assert committed.read_text() == "the committed page\n"
    assert (tmp_path / "outputs" / "leaderboard" / "leaderboard.md").read_text().startswith("# vpeft leaderboard")
    assert f"to {tmp_path / 'outputs' / 'leaderboard'}" in res.stdout.splitlines()[-1]
    # named, results/ is written
    res = _script(tmp_path, "outputs/runs", "--out", "results/leaderboard")
    assert res.returncode == 0 and committed.read_text().startswith("# vpeft leaderboard")


# -- impossible values are not records --------------------------------------------------------------


@pytest.mark.parametrize("top1", [150.0, -20.0, math.nan, math.inf])
def test_impossible_top1_is_not_a_record(top1):
    record = make_record(dataset="digits", top1=50.0)
    record["metrics"]["top1"] = top1
    with pytest.raises(RecordError, match=r"metrics\.top1: .* is not a top-1 accuracy"):
        validate(record)
    for fine in (0.0, 100.0, 0, 100):
        record["metrics"]["top1"] = fine
        validate(record)


def test_leaderboard_skips_impossible_records_with_one_warning_each(tmp_path):
    runs = tmp_path / "runs"
    good = make_record(dataset="digits", top1=90.0)
    write_record(record_path(runs, good), good)
    bad = {}
    for seed, top1 in ((1, 150.0), (2, -20.0), (3, math.nan)):
        r = make_record(dataset="digits", seed=seed, top1=50.0)
        r["metrics"]["top1"] = top1
        path = record_path(runs, r)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))  # as an edit or another tool leaves it (json writes NaN)
        bad[path] = top1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = write_leaderboard(runs, tmp_path / "out")
    messages = [str(w.message) for w in caught]
    for path in bad:
        assert sum(str(path) in m and "metrics.top1" in m for m in messages) == 1, (path, messages)
    [row] = pd.read_csv(written["leaderboard.csv"]).to_dict("records")
    assert row["digits_mean"] == 90.0 and row["digits_n"] == 1


# -- little or nothing to rank: a page, never a traceback ---------------------------------------


@pytest.mark.parametrize(
    "records",
    [
        [make_record(dataset="digits", protocol="tune")],  # right after a tune stage
        [make_record(dataset="digits", status="failed", error="diverged")],
        [],  # an empty folder
    ],
    ids=["tune-only", "failed-only", "empty"],
)
def test_leaderboard_with_nothing_ranked_says_so(records, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for r in records:
        write_record(record_path(runs, r), r)
    res = _script(tmp_path, "runs", "--out", "out")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    for page in ("leaderboard.md", "leaderboard.html", "leaderboard.tex"):
        assert "Nothing is ranked yet" in (tmp_path / "out" / page).read_text()
    csv = (tmp_path / "out" / "leaderboard.csv").read_text().splitlines()
    assert len(csv) == 1 and csv[0].startswith("backbone,method")


def test_leaderboard_with_an_empty_bench_folder_and_a_bad_date(tmp_path):
    runs = tmp_path / "runs"
    for r in (make_record(dataset="digits", finished_at="not a date"), make_record(method="linear", dataset="digits")):
        write_record(record_path(runs, r), r)
    (tmp_path / "bench").mkdir()
    res = _script(tmp_path, "runs", "--out", "out", "--bench", "bench")
    assert res.returncode == 0, res.stderr[-3000:]
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "Nothing is ranked yet" not in md and "| lora" in md and "| linear" in md
    assert (tmp_path / "out" / "methods.csv").read_text().startswith("device_label,")
