"""vpeft.bench.report: the committed benchmark results re-render through it, and a stopped suite keeps its numbers."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from vpeft.bench.report import (
    Report,
    Stopped,
    markdown_table,
    run_sections,
    stop_on_signals,
    unfinished,
    write_result,
)
from vpeft.bench.suites import gpu_check, serving
from vpeft.files import slug

BENCHMARKS = Path(__file__).resolve().parents[1] / "results" / "benchmarks"
COMMITTED = {
    "gpu_check_nvidia-h200": gpu_check,
    "serve_cpu": serving,
    "serve_cpu_lora-vpt-7iters": serving,
}
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip()[1:-1].split("|")]


def normalized(md: str) -> list[str]:
    """The page's lines with table cells stripped of padding and separator rows without alignment marks:
    what the committed files (written by hand-joined tables) and the pandas tables must agree on."""
    lines = []
    for line in md.rstrip("\n").split("\n"):
        if line.startswith("|"):
            row = cells(line)
            line = "|" + "|".join("---" if re.fullmatch(r":?-+:?", c) else f" {c} " for c in row) + "|"
        lines.append(line)
    return lines


def table(md: str, header: str) -> list[list[str]]:
    """The rows of the table whose header row starts with ``header``."""
    lines = md.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and cells(line)[0] == header)
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return rows


# targets whose definition changed since a committed check ran: old row -> the row that replaces it
RESTATED = {
    "gpu_check_nvidia-h200": {
        "slowest method's training step, batch 256 eager (images/s)":
            "slowest method's training step over the frozen floor, batch 256 eager",
    },
}  # fmt: skip


@pytest.mark.parametrize("stem", sorted(COMMITTED))
def test_committed_results_re_render_through_the_report_writer(stem):
    suite = COMMITTED[stem]
    result = json.loads((BENCHMARKS / f"{stem}.json").read_text())
    committed = (BENCHMARKS / f"{stem}.md").read_text()
    now = {t["target"]: t for t in suite.targets(result)}  # the current definitions, applied to the old numbers
    stored = {t["target"]: t for t in result["targets"]}
    restated = RESTATED.get(stem, {})
    assert set(stored) - set(now) == set(restated) and set(now) - set(stored) == set(restated.values())
    assert all(now[name] == row for name, row in stored.items() if name not in restated)
    page = suite.markdown(result)

    # every number and every target verdict of the committed page is in the new one
    assert not Counter(NUMBER.findall(committed)) - Counter(NUMBER.findall(page))
    verdicts = {row[0]: row[3] for row in table(committed, "target")}
    assert verdicts and {row[0]: row[3] for row in table(page, "target")} == verdicts
    assert "**no**" in verdicts.values() or suite is serving  # the GPU check's misses stand out in both

    # line for line the same page, but for the table padding and the known changes of the layout
    expected = normalized(committed)
    if suite is serving:  # one targets table for every suite: its second column is "wanted"
        expected = [line.replace("| target | goal |", "| target | wanted |") for line in expected]
    got = normalized(page)
    if suite is gpu_check:  # steps added since this check ran are listed as not reached
        added = [n for n in gpu_check.STEP_NAMES if f"| {n} |" not in committed]
        assert added == ["pack", "pack_parity", "serve"] and not set(added) & set(result["steps"])
        got = [line for line in got if not any(line.startswith(f"| {n} | not reached |") for n in added)]
    assert got == expected


def test_tables_align_numbers_right_and_words_left():
    df = pd.DataFrame([["lora", "1,234", "–"], ["vpt_deep", "5.5", "x|y"]], columns=["method", "images/s", "note"])
    lines = markdown_table(df).split("\n")
    assert re.fullmatch(r"\|:-+\|-+:\|:-+\|", lines[1])
    assert lines[2].startswith("| lora     |") and "|      1,234 |" in lines[2]
    assert "x\\|y" in lines[3]  # a pipe inside a cell does not split it


def test_a_report_has_the_header_targets_and_sections(tmp_path):
    report = Report("Speed on CPU", "python x.py --quick", "torch 2, timm 1.")
    report.targets(
        [
            {"target": "fast", "wanted": ">= 2", "measured": 3.14159, "met": True},
            {"target": "small", "wanted": "<= 1", "measured": "2 MB", "met": False},
            {"target": "new", "wanted": "< 5 ms", "measured": None, "met": None},
        ]
    )
    report.heading("Steps", 3).table([{"n": 1, "s": 0.5}, {"n": 2, "s": None}], [("n", "n", ""), ("s", "s", ".2f")])
    report.bullets(unfinished({"a": {"error": "Boom\nValueError: bad"}, "b": {"skipped": "no peft"}, "c": []}))
    md = report.markdown()
    assert md.startswith("# Speed on CPU\n\n`python x.py --quick`  \ntorch 2, timm 1.\n\n## Targets\n\n")
    assert table(md, "target") == [
        ["fast", ">= 2", "3.142", "yes"],
        ["small", "<= 1", "2 MB", "**no**"],
        ["new", "< 5 ms", "–", "–"],
    ]
    assert "### Steps" in md and table(md, "n") == [["1", "0.50"], ["2", "–"]]
    assert md.endswith("- a: failed (ValueError: bad)\n- b: skipped (no peft)\n")
    write_result(tmp_path / "out", "speed_cpu", {"x": 1}, md)
    assert json.loads((tmp_path / "out" / "speed_cpu.json").read_text()) == {"x": 1}
    assert (tmp_path / "out" / "speed_cpu.md").read_text() == md


def test_slug():
    assert slug("NVIDIA H200") == "nvidia-h200" and slug(" lora+vpt, 7 iters ") == "lora-vpt-7-iters"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_block_and_the_handlers_come_back(sig):
    before = signal.getsignal(sig)
    with pytest.raises(Stopped, match=signal.Signals(sig).name), stop_on_signals():
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler raises at once
    assert signal.getsignal(sig) is before


def test_run_sections_keeps_what_was_measured_when_a_section_fails_or_is_stopped():
    result = {"sections": {}}
    written = []
    handler = signal.getsignal(signal.SIGTERM)

    def write():
        written.append(json.loads(json.dumps(result)))

    def fills_then_fails():
        rows = result["sections"].setdefault("rows", [])
        rows.append({"method": "lora"})
        raise ValueError("out of memory")

    def fills_then_stopped():
        table = result["sections"].setdefault("table", {"rows": [1]})
        table["rows"].append(2)
        os.kill(os.getpid(), signal.SIGTERM)

    def never():
        raise AssertionError("a stopped run goes on")

    sections = [("ok", lambda: {"value": 1}), ("broken", lambda: 1 / 0), ("rows", fills_then_fails),
                ("table", fills_then_stopped), ("after", never)]  # fmt: skip
    assert run_sections(result, sections, write) == 1
    s = result["sections"]
    assert s["ok"] == {"value": 1} and s["broken"]["error"].startswith("ZeroDivisionError")
    assert s["rows"] == [{"method": "lora"}] and result["partial"]["rows"] == "ValueError: out of memory"
    assert s["table"]["rows"] == [1, 2] and s["table"]["error"].startswith("Stopped: signal 15")
    assert "after" not in s and written[-1] == result and len(written) == 4
    assert signal.getsignal(signal.SIGTERM) is handler
    assert run_sections({"sections": {}}, [("ok", lambda: [1])], lambda: None) == 0
