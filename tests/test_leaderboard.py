"""The leaderboard on synthetic records: averages by hand, Pareto fronts, what ranks and what doesn't."""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from vpeft.bench.record import BENCH_KIND, BENCH_SCHEMA_VERSION, validate_bench_record, write_bench_record
from vpeft.errors import DataError
from vpeft.results import SCHEMA_VERSION, config_hash, record_path, validate, write_record
from vpeft.results.leaderboard import (
    PPT_C,
    aggregate,
    build_leaderboard,
    load_reference,
    methods_table,
    pareto_front,
    ppt_score,
    vtab_summary,
)
from vpeft.results.render import (
    build_page,
    leaderboard_csv,
    page_markdown,
    plot_tradeoff,
    write_leaderboard,
)
from vpeft.vtab import GROUPS, TASKS

ROOT = Path(__file__).resolve().parents[1]


def make_record(
    method: str = "lora",
    dataset: str = "cifar100",
    backbone: str = "vit_test",
    seed: int = 0,
    top1: float | None = 50.0,
    protocol: str = "final",
    status: str = "ok",
    error: str | None = None,
    trainable_excl_head: int = 1000,
    method_config: dict | None = None,
    latency: float | None = None,
    images_per_s: float | None = None,
    peak_mem: float | None = None,
    mem_kind: str = "cuda_max_allocated",
    device: str = "cuda",
    lr: float = 1e-3,
    finished_at: str = "2025-01-01T00:00:00+00:00",
) -> dict:
    """A run record as run.py writes it, valid per vpeft.results.validate."""
    method_config = method_config or {}
    config = {
        "seed": seed,
        "protocol": protocol,
        "method": {"name": method, **method_config},
        "dataset": {"name": dataset},
        "backbone": {"name": backbone},
        "optim": {"lr": lr, "weight_decay": 1e-4},
        "trainer": {"epochs": 100, "progress": False},
        "paths": {"results": "results/runs"},
    }
    ok = status == "ok"
    record = {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "error": error,
        "method": method,
        "method_config": method_config,
        "dataset": dataset,
        "data_source": "vtab1k-folder",
        "backbone": backbone,
        "protocol": protocol,
        "seed": seed,
        "config_hash": config_hash(config),
        "metrics": {
            "train_loss": 0.1 if ok else None,
            "top1": top1 if ok else None,
            "eval_split": "test" if protocol == "final" else "val200",
        },
        "params": {
            "trainable": trainable_excl_head + 770 if ok else None,
            "trainable_excl_head": trainable_excl_head if ok else None,
            "total": 86_000_000 if ok else None,
        },
        "cost": {
            "train_seconds": 100.0 if ok else None,
            "train_images_per_s": images_per_s,
            "peak_mem_mb": peak_mem,
            "peak_mem_kind": mem_kind,
            "latency_overhead": latency,
            "latency_overhead_at": {"variant": "merged", "dtype": "fp32", "batch": 1} if latency else None,
        },
        "env": {
            "device": device,
            "device_name": "NVIDIA H100 80GB HBM3" if device == "cuda" else "AMD EPYC",
            "torch": "2.14.1",
            "timm": "1.0.31",
            "vpeft": "0.1.0",
            "git_sha": None,
            "git_dirty": None,
        },
        "config": config,
        "overrides": [],
        "finished_at": finished_at,
    }
    return validate(record)


def full_vtab(method: str, value_of, seeds=(0,), **kwargs) -> list[dict]:
    return [make_record(method=method, dataset=t, seed=s, top1=value_of(t, s), **kwargs) for t in TASKS for s in seeds]


def make_bench(method: str, trainable: int, images_per_s: float, mem: float, ratios: dict, mergeable: bool) -> dict:
    overhead = [{"variant": v, "dtype": d, "batch": b, "ratio": r} for (v, d, b), r in sorted(ratios.items())]
    return validate_bench_record(
        {
            "kind": BENCH_KIND,
            "schema_version": BENCH_SCHEMA_VERSION,
            "method": method,
            "method_config": {},
            "mergeable": mergeable,
            "backbone": "vit_test",
            "input_size": [3, 224, 224],
            "env": {"device": "cuda", "device_name": "NVIDIA H100", "torch": "2.14.1", "timm": "1.0.31"},
            "params": {
                "trainable": trainable + 770,
                "trainable_excl_head": trainable,
                "total": 86_000_000 + trainable,
                "delta_bytes": 4 * (trainable + 770) + 200,
                "backbone_total": 86_000_000,
            },
            "flops": None,
            "latency": {
                "overhead": overhead,
                "results": [],
                "headline_variant": "merged" if mergeable else "unmerged",
                "batches": [1, 64],
                "dtypes": ["fp32", "bf16"],
            },
            "latency_overhead": ratios[("merged" if mergeable else "unmerged", "fp32", 1)],
            "training": {"images_per_s": images_per_s, "peak_mem_mb": mem, "peak_mem_kind": "cuda_max_allocated"},
            "config": {},
        }
    )


# -- pure pieces -----------------------------------------------------------------------------------


def test_mean_and_sample_std():
    cell = aggregate([70.0, 72.0, 77.0])
    assert cell.mean == pytest.approx(73.0)
    assert cell.std == pytest.approx(math.sqrt((9 + 1 + 16) / 2))  # ddof=1
    assert cell.n == 3
    one = aggregate([70.0])
    assert one.std is None and one.n == 1


def test_both_vtab_averaging_conventions_by_hand():
    means = {t: {"natural": 80.0, "specialized": 90.0, "structured": 40.0}[g] for g, ts in GROUPS.items() for t in ts}
    s = vtab_summary(means)
    assert s.groups == {"natural": 80.0, "specialized": 90.0, "structured": 40.0}
    assert s.mean19 == pytest.approx((7 * 80 + 4 * 90 + 8 * 40) / 19)  # 65.263...
    assert s.mean_of_groups == pytest.approx(70.0)
    del means["dtd"]
    partial = vtab_summary(means)
    assert partial.groups["natural"] is None and partial.groups["specialized"] == 90.0
    assert partial.mean19 is None and partial.mean_of_groups is None
    assert partial.missing == ("dtd",) and partial.present == 18


def test_published_per_task_numbers_give_the_papers_means():
    """The docs' table of published group means / means (computed by the papers) from our averaging code."""
    published = {  # natural, specialized, structured, mean of 19, mean of groups (docs/protocol.md)
        "full": (75.89, 83.38, 47.64, 65.57, 68.97),
        "linear": (68.93, 77.15, 26.85, 52.94, 57.64),
        "vpt_shallow": (76.81, 79.67, 46.98, 64.85, 67.82),
        "vpt_deep": (78.49, 82.42, 55.00, 69.43, 71.97),
        "bitfit": (73.30, 78.25, 44.10, 62.05, 65.22),
        "lora": (79.49, 84.55, 59.78, 72.25, 74.60),
        "adaptformer": (80.56, 84.88, 58.83, 72.32, 74.75),
        "ssf": (81.57, 86.55, 58.96, 73.10, 75.69),
    }
    ref = {r.method: r for r in load_reference()}
    assert set(ref) == set(published)
    for method, (nat, spe, stru, m19, mg) in published.items():
        s = ref[method].vtab
        got = (s.groups["natural"], s.groups["specialized"], s.groups["structured"], s.mean19, s.mean_of_groups)
        assert got == pytest.approx((nat, spe, stru, m19, mg), abs=0.006), method
        assert ref[method].source


def test_pareto_front_with_ties_and_dominated_points():
    points = [(1, 70), (1, 70), (2, 75), (3, 74), (0.5, 60), (2, 70), (None, 80), (3, 75)]
    assert pareto_front(points) == [True, True, True, False, True, False, False, False]
    assert pareto_front([(0, 50), (0, 60)]) == [False, True]  # same cost: the better accuracy wins
    assert pareto_front([]) == []


def test_ppt_score():
    assert ppt_score(70.0, 0) == 70.0
    assert ppt_score(70.0, PPT_C) == pytest.approx(70.0 * math.exp(-math.log10(2)))
    assert ppt_score(70.0, 0.29e6) == pytest.approx(70.0 * math.exp(-math.log10(0.029 + 1)))
    assert ppt_score(None, 1.0) is None
    assert ppt_score(70.0, 1e6) > ppt_score(70.0, 1e7) > ppt_score(70.0, 1e8)


# -- rows from records -----------------------------------------------------------------------------


def test_cells_failed_and_tune_runs():
    records = [
        make_record(seed=0, top1=70.0),
        make_record(seed=1, top1=72.0),
        make_record(seed=2, status="failed", error="DivergedError: loss is nan at epoch 3\ntraceback..."),
        make_record(seed=3, status="interrupted", error="interrupted by the user (Ctrl-C)"),
        make_record(seed=0, top1=99.0, protocol="tune"),
    ]
    lb = build_leaderboard(records)
    (row,) = lb.rows
    cell = row.cells["cifar100"]
    assert (cell.mean, cell.n) == (71.0, 2)
    assert cell.std == pytest.approx(math.sqrt(2))
    assert lb.tune_ignored == 1
    assert [(f.seed, f.status, f.error) for f in lb.failures] == [
        (2, "failed", "DivergedError: loss is nan at epoch 3"),
        (3, "interrupted", "interrupted by the user (Ctrl-C)"),
    ]
    md = page_markdown(build_page(lb, [], len(records), None))
    assert "71.0 ± 1.4 (2)" in md
    failed = md.split("\n## Failed and interrupted runs\n")[1].split("\n## Reference")[0]
    assert "DivergedError: loss is nan at epoch 3" in failed and "interrupted by the user" in failed
    assert "99.0" not in md


def test_one_seed_shows_no_std():
    md = page_markdown(build_page(build_leaderboard([make_record(top1=70.0)]), [], 1, None))
    per_task = md.split("### VTAB-1k per task")[1].split("\n## ")[0]
    assert "70.0 (1)" in per_task and "±" not in per_task.split("\n\n", 1)[1]


def test_vtab_rows_means_and_missing_tasks():
    def value(t: str, s: int) -> float:
        g = next(g for g, ts in GROUPS.items() if t in ts)
        return {"natural": 80.0, "specialized": 90.0, "structured": 40.0}[g] + (1.0 if s else -1.0)

    complete = full_vtab("lora", value, seeds=(0, 1), trainable_excl_head=290_000)
    partial = [r for r in full_vtab("bitfit", value) if r["dataset"] != "svhn"]
    lb = build_leaderboard(complete + partial)
    lora, bitfit = lb.vtab_rows("vit_test")
    assert lora.method == "lora" and bitfit.method == "bitfit"  # complete rows rank first
    assert lora.vtab.mean19 == pytest.approx(1240 / 19)
    assert lora.vtab.mean_of_groups == pytest.approx(70.0)
    assert lora.ppt == pytest.approx(ppt_score(1240 / 19, 290_000))
    assert bitfit.vtab.mean19 is None and bitfit.vtab.groups["structured"] == pytest.approx(39.0)
    md = page_markdown(build_page(lb, [], len(complete + partial), None))
    summary = md.split("### VTAB-1k summary")[1].split("###")[0]
    assert "| 1 | lora | 80.00 | 90.00 | 40.00 | 65.26 | 70.00 | 0.290 |" in summary
    assert "– (6/7)" in summary and "– (18/19)" in summary and "– (2/3)" in summary
    assert "bitfit: missing svhn" in summary


def test_rows_never_mix_backbones_and_other_datasets_get_columns_only():
    records = [
        make_record(backbone="vit_a", dataset="digits", top1=90.0),
        make_record(backbone="vit_b", dataset="digits", top1=80.0),
        make_record(backbone="vit_b", dataset="fashion_mnist", top1=85.0),
    ]
    lb = build_leaderboard(records)
    assert [(r.backbone, r.method) for r in lb.rows] == [("vit_a", "lora"), ("vit_b", "lora")]
    assert lb.vtab_rows("vit_a") == [] and lb.other_datasets("vit_b") == ["digits", "fashion_mnist"]
    md = page_markdown(build_page(lb, [], 3, None))
    assert "## vit_a" in md and "## vit_b" in md and "VTAB-1k summary" not in md
    assert "| method | digits | fashion_mnist | params (M) |" in md
    section_a = md.split("## vit_a")[1].split("## vit_b")[0]
    assert "90.0 (1)" in section_a and "80.0" not in section_a


def test_config_variants_split_rows_but_per_task_configs_do_not():
    records = [
        make_record(method_config={"r": 8}, top1=70.0),
        make_record(method_config={"r": 16}, top1=72.0),
        make_record(method="vpt_deep", dataset="cifar100", method_config={"num_tokens": 10}),
        make_record(method="vpt_deep", dataset="svhn", method_config={"num_tokens": 50}),
    ]
    lb = build_leaderboard(records)
    assert sorted(r.label for r in lb.rows) == ["lora (r=16)", "lora (r=8)", "vpt_deep"]


def test_mixed_settings_and_duplicate_seeds_are_flagged():
    records = [
        make_record(seed=0, top1=70.0, lr=1e-3),
        make_record(seed=1, top1=72.0, lr=5e-3),
        make_record(dataset="dtd", seed=0, top1=60.0, finished_at="2025-01-01T00:00:00+00:00"),
        make_record(dataset="dtd", seed=0, top1=64.0, finished_at="2025-02-01T00:00:00+00:00"),
    ]
    lb = build_leaderboard(records)
    (row,) = lb.rows
    assert row.cells["cifar100"].mixed and not row.cells["dtd"].mixed
    assert row.cells["dtd"].mean == 64.0 and row.cells["dtd"].n == 1  # the latest rerun of seed 0
    assert any("different settings" in w for w in lb.warnings)
    assert any("seed 0 has more than one final record" in w for w in lb.warnings)


def test_costs_in_rows():
    records = [
        make_record(seed=0, latency=1.2, images_per_s=800.0, peak_mem=4000.0, trainable_excl_head=100_000),
        make_record(seed=1, latency=1.4, images_per_s=600.0, peak_mem=5000.0, trainable_excl_head=300_000),
    ]
    (row,) = build_leaderboard(records).rows
    assert row.latency_overhead == pytest.approx(1.3) and row.latency_source == "run"
    assert (row.latency_variant, row.latency_at) == ("merged", "fp32, batch 1, NVIDIA H100 80GB HBM3")
    assert (row.train_images_per_s, row.peak_mem_mb, row.peak_mem_kind) == (700.0, 4500.0, "cuda_max_allocated")
    assert row.params_m == pytest.approx(0.2) and row.params_range_m == pytest.approx((0.1, 0.3))


def test_bench_latency_fills_rows_without_it():
    bench = [
        make_bench(
            "lora",
            1000,
            700.0,
            4000.0,
            {(v, d, b): 1.1 for v in ("unmerged", "merged") for d in ("fp32", "bf16") for b in (1, 64)},
            True,
        )
    ]  # noqa: E501
    (row,) = build_leaderboard([make_record()], bench).rows
    assert row.latency_overhead == pytest.approx(1.1) and row.latency_source == "bench"


# -- the reference block ---------------------------------------------------------------------------


def test_reference_block_is_separate():
    records = full_vtab("lora", lambda t, s: 61.5 + s, seeds=(0, 1))
    lb = build_leaderboard(records)
    md = page_markdown(build_page(lb, [], len(records), None))
    ours, ref = md.split("## Reference: published (not measured here)")
    published = load_reference()
    lora = next(r for r in published if r.method == "lora")
    assert f"{lora.vtab.mean19:.2f}" in ref and f"{lora.vtab.mean19:.2f}" not in ours
    assert "NOAH" not in ours and "published" not in ours.lower()
    assert "62.0 ± 0.7 (2)" in ours and "62.0 ± 0.7 (2)" not in ref and "62.00" not in ref
    assert len(leaderboard_csv(lb).strip().splitlines()) == 1 + len(lb.rows)  # no published rows in our CSV
    assert "## Reference: published (not measured here)" in md.split("## Definitions")[0]


# -- files -----------------------------------------------------------------------------------------


def demo_records(root: Path) -> list[dict]:
    rng = random.Random(0)
    base = {"linear": (0, 52.0), "bitfit": (100_000, 62.0), "lora": (294_912, 68.0), "vpt_deep": (560_000, 66.0)}
    base["full"] = (85_800_000, 64.0)
    lat = {"linear": 1.0, "bitfit": 1.0, "lora": 1.0, "vpt_deep": 1.3, "full": 1.0}
    records = []
    for method, (params, acc) in base.items():
        records += full_vtab(
            method,
            lambda t, s, acc=acc: acc + rng.gauss(0, 1),
            seeds=(0, 1),
            trainable_excl_head=params,
            latency=lat[method],
            images_per_s=500.0,
            peak_mem=3000.0,
        )
    records.append(make_record(method="lora", dataset="dmlab", seed=5, status="failed", error="boom"))
    records.append(make_record(method="lora", dataset="digits", seed=0, top1=95.0, latency=1.02))
    records.append(make_record(method="linear", dataset="digits", seed=0, top1=90.0, trainable_excl_head=0))
    for r in records:
        write_record(record_path(root, r), r)
    return records


def test_write_leaderboard_is_deterministic(tmp_path):
    demo_records(tmp_path / "runs")
    bench = tmp_path / "bench"
    write_bench_record(
        bench / "a.json",
        make_bench(
            "linear",
            0,
            1000.0,
            3000.0,
            {
                ("unmerged", "fp32", 1): 1.0,
                ("merged", "fp32", 1): 1.0,
                ("unmerged", "fp32", 64): 1.0,
                ("merged", "fp32", 64): 1.0,
            },
            True,
        ),
    )  # noqa: E501
    write_bench_record(
        bench / "b.json",
        make_bench(
            "vpt_deep", 560_000, 400.0, 6000.0, {("unmerged", "fp32", 1): 1.3, ("unmerged", "fp32", 64): 1.5}, False
        ),
    )  # noqa: E501
    first = write_leaderboard(tmp_path / "runs", tmp_path / "out1", bench)
    second = write_leaderboard(tmp_path / "runs", tmp_path / "out2", bench)
    assert set(first) == set(second)
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.tex", "leaderboard.html", "methods.md"):
        assert name in first
    assert any(n.endswith("_params.png") for n in first) and any(n.endswith("_latency.svg") for n in first)
    for name in first:
        assert first[name].read_bytes() == second[name].read_bytes(), name
    methods = (tmp_path / "out1" / "methods.md").read_text()
    assert "| vpt_deep | 0.651% |" in methods and "| 0.40× |" in methods and "| 2.00× |" in methods
    assert "1.30× |" in methods and "| no |" in methods
    tex = (tmp_path / "out1" / "leaderboard.tex").read_text()
    assert r"\toprule" in tex and r"$\pm$" in tex and "vpt\\_deep" in tex


def test_record_order_does_not_matter(tmp_path):
    records = demo_records(tmp_path)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    a = build_leaderboard(records)
    b = build_leaderboard(shuffled)
    assert page_markdown(build_page(a, [], 1, None)) == page_markdown(build_page(b, [], 1, None))
    assert leaderboard_csv(a) == leaderboard_csv(b)


def test_methods_table_relative_to_linear():
    ratios = {("unmerged", "fp32", 1): 1.5, ("merged", "fp32", 1): 1.0}
    rows = methods_table(
        [
            make_bench("lora", 294_912, 600.0, 4500.0, ratios, True),
            make_bench("linear", 0, 1000.0, 3000.0, {("unmerged", "fp32", 1): 1.0, ("merged", "fp32", 1): 1.0}, True),
        ]  # noqa: E501
    )
    lora = next(r for r in rows if r.method == "lora")
    assert lora.train_rel == pytest.approx(0.6) and lora.mem_rel == pytest.approx(1.5)
    assert lora.params_pct == pytest.approx(100 * 294_912 / 86_000_000)
    assert lora.overhead[("unmerged", "fp32", 1)] == 1.5 and lora.mergeable


def test_plot_with_zero_parameters(tmp_path):
    plot = plot_tradeoff(
        [("linear", 0.0, 52.0), ("lora", 0.29, 72.0), ("full", 85.8, 65.0), ("bitfit", 0.1, 62.0)],
        "trainable parameters (M, log scale)",
        "top-1 (%)",
        "test",
        True,
        tmp_path,
        "zero",
    )
    assert plot.png.stat().st_size > 10_000 and plot.svg.read_text().lstrip().startswith("<?xml")


def test_script(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("leaderboard_script", ROOT / "scripts" / "leaderboard.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for r in (make_record(dataset="digits", top1=95.0), make_record(method="linear", dataset="digits", top1=90.0)):
        write_record(record_path(tmp_path / "runs", r), r)
    assert script.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "leaderboard.html").is_file()
    assert "leaderboard.md" in capsys.readouterr().out
    assert script.main([str(tmp_path / "nope")]) == 2
    assert "error: no records folder at" in capsys.readouterr().err
    with pytest.raises(DataError, match="no records folder"):
        write_leaderboard(tmp_path / "nope", tmp_path / "out")


# -- the HTML page in a real browser ---------------------------------------------------------------


def chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        pytest.fail("chromium is not installed; install it with `apt-get install chromium` (Debian)")
    return path


def run_chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
            + ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
            + [f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.mark.slow
def test_html_page_renders_in_chromium(tmp_path):
    import numpy as np
    from PIL import Image

    demo_records(tmp_path / "runs")
    page = write_leaderboard(tmp_path / "runs", tmp_path / "out")["leaderboard.html"]
    assert "<script src" not in page.read_text() and "<link" not in page.read_text()  # self-contained
    shot = tmp_path / "page.png"
    done = run_chromium(f"--screenshot={shot}", "--window-size=1400,1000", page.as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    assert shot.stat().st_size > 30_000
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (1000, 1400)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text and lines, not a blank page
    dom = run_chromium("--dump-dom", page.as_uri()).stdout
    table = dom.split('id="table-vtab-summary-vit-test"')[1].split("</table>")[0]
    body = table.split("<tbody>")[1]
    assert body.count("<tr>") == 5
    for method in ("linear", "bitfit", "lora", "vpt_deep", "full"):
        assert f">{method}</td>" in body
    assert 'class="sortable"' in dom and "addEventListener('click'" in dom
    assert dom.count('src="data:image/svg+xml;base64,') >= 4

    def order(dom: str) -> list[str]:
        body = dom.split('id="table-vtab-summary-vit-test"')[1].split("<tbody>")[1].split("</tbody>")[0]
        return [row.split("</td><td")[1].split(">")[1].split("<")[0] for row in body.split("<tr>")[1:]]

    # the page sorts itself from the link (clicking the header): by parameters, then reversed
    by_params = order(run_chromium("--dump-dom", page.as_uri() + "#sort=table-vtab-summary-vit-test:7").stdout)
    assert by_params == ["linear", "bitfit", "lora", "vpt_deep", "full"]
    desc = order(run_chromium("--dump-dom", page.as_uri() + "#sort=table-vtab-summary-vit-test:7:desc").stdout)
    assert desc == by_params[::-1]


# -- one dataset name, several task folders --------------------------------------------------------


def folder_record(root: str, top1: float, seed: int = 0, name: str = "folder", **kwargs) -> dict:
    """A run on a task folder: the dataset is named after the folder, the config keeps the root."""
    r = make_record(dataset=Path(root).name, seed=seed, top1=top1, **kwargs)
    r["config"]["dataset"] = {"name": name, "root": root, "id": None}
    r["config_hash"] = config_hash({k: v for k, v in r["config"].items() if k != "paths"})
    return validate(r)


def test_task_folders_with_one_name_stay_apart():
    records = [
        folder_record("/a/cifar10", 70.0, seed=0),
        folder_record("/a/cifar10/", 72.0, seed=1),  # the same folder: merges
        folder_record("/b/cifar10", 30.0, seed=0),
        folder_record("/x/data/pets", 50.0, name="imagefolder"),
        folder_record("/y/data/pets", 60.0, name="imagefolder"),
        folder_record("/b/cifar10", 0.0, seed=2, status="failed", error="boom"),
    ]
    lb = build_leaderboard(records)
    (row,) = lb.rows
    assert sorted(row.cells) == ["cifar10 (a)", "cifar10 (b)", "pets (x/data)", "pets (y/data)"]
    assert (row.cells["cifar10 (a)"].mean, row.cells["cifar10 (a)"].n) == (71.0, 2)
    assert (row.cells["cifar10 (b)"].mean, row.cells["cifar10 (b)"].n) == (30.0, 1)
    assert row.cells["pets (x/data)"].mean == 50.0 and row.cells["pets (y/data)"].mean == 60.0
    assert [f.dataset for f in lb.failures] == ["cifar10 (b)"]
    assert any("dataset cifar10 stands for 2 different sources (/a/cifar10, /b/cifar10)" in w for w in lb.warnings)
    md = page_markdown(build_page(lb, [], len(records), None))
    assert "| method | cifar10 (a) | cifar10 (b) | pets (x/data) | pets (y/data) |" in md
    assert "cifar10 (a)_mean" in leaderboard_csv(lb)


def test_one_folder_or_named_tasks_keep_their_name():
    records = [
        folder_record("/a/flowers", 70.0),
        folder_record("/a/flowers", 74.0, seed=1),
        make_record(dataset="cifar100", top1=60.0),  # a named task: roots on other machines are the same task
        make_record(dataset="cifar100", seed=1, top1=62.0),
    ]
    records[3]["config"]["dataset"] = {"name": "cifar100", "root": "/elsewhere/vtab/cifar100"}
    (row,) = build_leaderboard(records).rows
    assert sorted(row.cells) == ["cifar100", "flowers"]
    assert row.cells["flowers"].n == 2 and row.cells["cifar100"].n == 2
    both = build_leaderboard([*records, folder_record("/data/mine/cifar100", 10.0)])
    (row,) = both.rows
    assert sorted(row.cells) == ["cifar100", "cifar100 (mine)", "flowers"]  # the named task keeps its name


def test_task_folders_with_one_name_in_the_files(tmp_path):
    runs = tmp_path / "runs"
    for r in (folder_record("/a/cifar10", 70.0), folder_record("/b/cifar10", 30.0)):
        write_record(record_path(runs, r), r)
    written = write_leaderboard(runs, tmp_path / "out")
    md = written["leaderboard.md"].read_text()
    assert "70.0 (1)" in md and "30.0 (1)" in md and "cifar10 (a)" in md and "cifar10 (b)" in md
    assert "vit-test_cifar10-a_params.png" in written and "vit-test_cifar10-b_params.png" in written
