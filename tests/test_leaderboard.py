"""The leaderboard against hand computation: the records' frame, averages, like-for-like costs, noise, provenance."""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from pandas.api import types as pdt

from vpeft.bench.record import BENCH_KIND, BENCH_SCHEMA_VERSION, validate_bench_record, write_bench_record
from vpeft.errors import DataError
from vpeft.results import (
    SCHEMA_VERSION,
    config_hash,
    latency_frame,
    load_bench_records,
    load_records,
    record_path,
    validate,
    write_record,
)
from vpeft.results.frame import BENCH_COLUMNS, NOISE_SPREAD, RUN_COLUMNS, records_frame
from vpeft.results.leaderboard import (
    PPT_C,
    build_leaderboard,
    load_reference,
    methods_table,
    pareto_front,
    ppt_score,
    search_edge,
    vtab_means,
)
from vpeft.results.plots import plot_tradeoff
from vpeft.results.render import (
    build_page,
    fmt,
    leaderboard_csv,
    page_html,
    page_markdown,
    write_leaderboard,
)
from vpeft.vtab import GROUPS, TASKS

ROOT = Path(__file__).resolve().parents[1]


def latency(ratio: float, spread: float = 1.02, variant: str = "merged", batches=(1,), dtypes=("fp32",)) -> dict:
    """A latency report as vpeft.bench writes it: the bare backbone (10 ms per image) and one variant per
    (dtype, batch), with p90 = spread x median for both."""
    results, overhead = [], []
    for d in dtypes:
        for b in batches:
            for name, median in (("bare", 10.0 * b), (variant, 10.0 * b * ratio)):
                results.append(dict(variant=name, dtype=d, batch=b, median_ms=median, p90_ms=median * spread,
                                    mean_ms=median, min_ms=median, n=15))  # fmt: skip
            overhead.append({"variant": variant, "dtype": d, "batch": b, "ratio": ratio})
    return {"results": results, "overhead": overhead, "headline_variant": variant, "batches": list(batches),
            "dtypes": list(dtypes), "warmup": 3, "iters": 15, "threads": 2}  # fmt: skip


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
    latency_ratio: float | None = None,
    images_per_s: float | None = None,
    peak_mem: float | None = None,
    mem_kind: str = "cuda_max_allocated",
    device: str = "cuda",
    lr: float = 1e-3,
    img_size: int = 224,
    finished_at: str = "2025-01-01T00:00:00+00:00",
    git_sha: str | None = "abcdef1234567890",
    git_dirty: bool | None = False,
) -> dict:
    """A run record as run.py writes it, valid per vpeft.results.validate."""
    method_config = method_config or {}
    config = {
        "seed": seed,
        "protocol": protocol,
        "method": {"name": method, **method_config},
        "dataset": {"name": dataset},
        "backbone": {"name": backbone, "img_size": img_size},
        "optim": {"_target_": "torch.optim.AdamW", "lr": lr, "weight_decay": 1e-4},
        "trainer": {"epochs": 100, "batch_size": 64, "amp": "auto", "progress": False},
        "paths": {"results": "results/runs"},
    }
    ok = status == "ok"
    dtypes = ("fp32", "bf16") if device == "cuda" else ("fp32",)
    lat = latency(latency_ratio, dtypes=dtypes) if latency_ratio is not None else None
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
            "amp": "bf16" if device == "cuda" else "none",
            "latency": lat,
            "latency_overhead": latency_ratio,
            "latency_overhead_at": {"variant": "merged", "dtype": "fp32", "batch": 1} if lat else None,
        },
        "env": {
            "device": device,
            "device_name": "NVIDIA H100 80GB HBM3" if device == "cuda" else "AMD EPYC",
            "torch": "2.14.1",
            "timm": "1.0.31",
            "vpeft": "0.1.0",
            "git_sha": git_sha,
            "git_dirty": git_dirty,
        },
        "config": config,
        "overrides": [f"method={method}", f"backbone.img_size={img_size}"],
        "data": {"input_size": [3, img_size, img_size]},
        "finished_at": finished_at,
    }
    return validate(record)


def full_vtab(method: str, value_of, seeds=(0,), **kwargs) -> list[dict]:
    return [make_record(method=method, dataset=t, seed=s, top1=value_of(t, s), **kwargs) for t in TASKS for s in seeds]


def make_bench(
    method: str,
    trainable: int = 1000,
    images_per_s: float = 500.0,
    mem: float = 3000.0,
    ratio: float = 1.1,
    spread: float = 1.02,
    mergeable: bool = True,
    img_size: int = 224,
    device: str = "cuda",
    backbone: str = "vit_test",
    mem_kind: str = "cuda_max_allocated",
    batches=(1, 64),
    method_config: dict | None = None,
) -> dict:
    """A bench record as run.py bench.only=true writes it (one dtype, headline merged where mergeable)."""
    variant = "merged" if mergeable else "unmerged"
    return validate_bench_record(
        {
            "kind": BENCH_KIND,
            "schema_version": BENCH_SCHEMA_VERSION,
            "created_at": "2025-01-02T00:00:00+00:00",
            "method": method,
            "method_config": method_config or {},
            "mergeable": mergeable,
            "backbone": backbone,
            "input_size": [3, img_size, img_size],
            "env": {
                "device": device,
                "device_name": "NVIDIA H100 80GB HBM3" if device == "cuda" else "AMD EPYC",
                "torch": "2.14.1",
                "timm": "1.0.31",
                "git_sha": "fedcba9876543210",
                "git_dirty": True,
            },
            "params": {
                "trainable": trainable + 770,
                "trainable_excl_head": trainable,
                "total": 86_000_000 + trainable,
                "delta_bytes": 4 * (trainable + 770) + 200,
                "backbone_total": 86_000_000,
            },
            "flops": None,
            "latency": latency(ratio, spread, variant, batches, ("fp32", "bf16") if device == "cuda" else ("fp32",)),
            "latency_overhead": ratio,
            "training": {
                "images_per_s": images_per_s,
                "peak_mem_mb": mem,
                "peak_mem_kind": mem_kind,
                "batch_size": 8,
                "steps": 3,
                "dtype": "fp32",
            },  # fmt: skip
            "config": {},
        }
    )


def run(records: list[dict], bench: list[dict] = ()):
    return build_leaderboard(records_frame(records), methods_table(list(bench)) if bench else None)


def md_cells(md: str, title: str, method: str) -> dict[str, str]:
    """The cells of one row of a Markdown table (found by its title's start), by header."""
    lines = md.split(f"### {title}")[1].split("\n\n")[1].splitlines()
    split = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    col = split(lines[0]).index("method")
    row = next(split(li) for li in lines[2:] if split(li)[col] == method)
    return dict(zip(split(lines[0]), row))


def row_of(lb, method: str = "lora") -> pd.Series:
    (row,) = [r for _, r in lb.rows.iterrows() if r["method"] == method]
    return row


# -- the records as a frame ------------------------------------------------------------------------


def test_frame_of_the_committed_records_has_stable_columns_and_dtypes():
    runs = load_records(ROOT / "results" / "runs")
    files = sorted((ROOT / "results" / "runs").rglob("*.json"))
    assert len(runs) == len(files) > 0  # every committed record, one row each
    for name, dtype in RUN_COLUMNS.items():
        assert name in runs.columns, name
        check = {"float64": pdt.is_float_dtype, "Int64": pdt.is_integer_dtype, "boolean": pdt.is_bool_dtype,
                 "string": pdt.is_string_dtype}.get(dtype, pdt.is_datetime64_any_dtype)  # fmt: skip
        assert check(runs[name]), (name, runs[name].dtype)
    assert (runs["kind"] == "run").all() and set(runs["img_size"]) == {56} and set(runs["dtype"]) == {"fp32"}
    # one row, field by field, against its JSON file
    path = sorted((ROOT / "results" / "runs").glob("*/*/lora/final-seed0-*.json"))[0]
    record = json.loads(path.read_text())
    row = runs.set_index("path").loc[str(path)]
    assert row["metrics.top1"] == record["metrics"]["top1"] and row["seed"] == 0
    assert row["cost.peak_mem_mb"] == record["cost"]["peak_mem_mb"]
    assert row["config.optim.lr"] == record["config"]["optim"]["lr"]
    assert row["env.git_sha"] == record["env"]["git_sha"] and row["env.git_dirty"] == record["env"]["git_dirty"]
    assert row["finished_at"] == pd.Timestamp(record["finished_at"])
    assert row["method_config.targets"] == ["q", "v"] and row["dataset_label"] == record["dataset"]

    bench = load_bench_records(ROOT / "results" / "bench")
    assert len(bench) == len(list((ROOT / "results" / "bench").rglob("*.json"))) > 0
    for name in BENCH_COLUMNS:
        assert name in bench.columns, name
    assert (bench["kind"] == "bench").all() and pdt.is_float_dtype(bench["training.peak_mem_mb"])
    assert pdt.is_datetime64_any_dtype(bench["created_at"])


def test_an_empty_folder_gives_an_empty_frame_with_the_stable_columns(tmp_path):
    runs = load_records(tmp_path)
    assert runs.empty and set(RUN_COLUMNS) <= set(runs.columns)
    assert pdt.is_float_dtype(runs["metrics.top1"])


# -- pure pieces -----------------------------------------------------------------------------------


def test_mean_and_sample_std_by_hand():
    records = [make_record(seed=s, top1=v) for s, v in enumerate([70.0, 72.0, 77.0])]
    records.append(make_record(dataset="dtd", top1=61.0))
    cells = run(records).cells.set_index("dataset")
    assert cells.at["cifar100", "mean"] == pytest.approx(73.0)
    assert cells.at["cifar100", "std"] == pytest.approx(math.sqrt((9 + 1 + 16) / 2))  # ddof=1
    assert cells.at["cifar100", "n"] == 3 and cells.at["cifar100", "values"] == (70.0, 72.0, 77.0)
    assert cells.at["dtd", "n"] == 1 and math.isnan(cells.at["dtd", "std"])


def test_both_vtab_averaging_conventions_by_hand():
    value = {g: v for g, v in zip(GROUPS, (80.0, 90.0, 40.0))}
    means = {t: value[g] for g, ts in GROUPS.items() for t in ts}
    s = vtab_means(pd.DataFrame([means]))
    assert (s.at[0, "natural"], s.at[0, "specialized"], s.at[0, "structured"]) == (80.0, 90.0, 40.0)
    assert s.at[0, "mean19"] == pytest.approx((7 * 80 + 4 * 90 + 8 * 40) / 19)  # 65.263...
    assert s.at[0, "mean_of_groups"] == pytest.approx(70.0)
    del means["dtd"]
    p = vtab_means(pd.DataFrame([means]))
    assert math.isnan(p.at[0, "natural"]) and p.at[0, "specialized"] == 90.0
    assert math.isnan(p.at[0, "mean19"]) and math.isnan(p.at[0, "mean_of_groups"])
    assert p.at[0, "vtab_missing"] == ("dtd",) and p.at[0, "vtab_tasks"] == 18


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
    ref = load_reference().set_index("method")
    assert set(published) <= set(ref.index)  # later rows: tests/test_reference.py
    for method, expected in published.items():
        got = tuple(ref.loc[method, ["natural", "specialized", "structured", "mean19", "mean_of_groups"]])
        assert got == pytest.approx(expected, abs=0.006), method
        assert ref.loc[method, "source"]


def test_reference_block_shows_each_rows_data_copy_epoch_and_stated_average():
    text = page_markdown(build_page(run(full_vtab("lora", lambda t, s: 61.5 + s)), []))
    ref = text.split("## Reference: published (not measured here)")[1]
    assert "NOAH JPEG copy" in ref and "TFDS (VPT's TensorFlow Datasets pipeline)" in ref
    assert "best test epoch" in ref and "last epoch" in ref
    assert "75.6 (mean of group means)" in ref  # FacT-TK<=32 as FacT's Table 1 prints it
    assert "lora [PETL_Vision]" in ref and "fused qkv" in ref


def test_pareto_front_with_ties_and_dominated_points():
    points = [(1, 70), (1, 70), (2, 75), (3, 74), (0.5, 60), (2, 70), (None, 80), (3, 75)]
    assert pareto_front(points) == [True, True, True, False, True, False, False, False]
    assert pareto_front([(0, 50), (0, 60)]) == [False, True]  # same cost: the better accuracy wins
    assert pareto_front([]) == []


def test_ppt_score():
    assert ppt_score(70.0, 0) == 70.0
    assert ppt_score(70.0, PPT_C) == pytest.approx(70.0 * math.exp(-math.log10(2)))
    assert ppt_score(70.0, 0.29e6) == pytest.approx(70.0 * math.exp(-math.log10(0.029 + 1)))
    assert ppt_score(70.0, 1e6) > ppt_score(70.0, 1e7) > ppt_score(70.0, 1e8)
    with pytest.raises(ValueError, match="params must be >= 0"):
        ppt_score(70.0, -1)


# -- rows from records -----------------------------------------------------------------------------


def test_cells_failed_and_tune_runs():
    records = [
        make_record(seed=0, top1=70.0),
        make_record(seed=1, top1=72.0),
        make_record(seed=2, status="failed", error="DivergedError: loss is nan at epoch 3\ntraceback..."),
        make_record(seed=3, status="interrupted", error="interrupted by the user (Ctrl-C)"),
        make_record(seed=0, top1=99.0, protocol="tune"),
    ]
    lb = run(records)
    (cell,) = lb.cells.itertuples()
    assert (cell.mean, cell.n) == (71.0, 2) and cell.std == pytest.approx(math.sqrt(2))
    assert lb.tune_ignored == 1
    assert list(zip(lb.failures["seed"], lb.failures["status"], lb.failures["error"])) == [
        (2, "failed", "DivergedError: loss is nan at epoch 3"),
        (3, "interrupted", "interrupted by the user (Ctrl-C)"),
    ]
    md = page_markdown(build_page(lb, []))
    assert "71.0 ± 1.4 (2)" in md
    failed = md.split("\n## Failed and interrupted runs\n")[1].split("\n## Reference")[0]
    assert "DivergedError: loss is nan at epoch 3" in failed and "interrupted by the user" in failed
    assert "99.0" not in md.split("\n## Reference")[0]  # published rows may print 99.0 (flowers)


def test_vtab_rows_means_and_missing_tasks():
    def value(t: str, s: int) -> float:
        g = next(g for g, ts in GROUPS.items() if t in ts)
        return {"natural": 80.0, "specialized": 90.0, "structured": 40.0}[g] + (1.0 if s else -1.0)

    complete = full_vtab("lora", value, seeds=(0, 1), trainable_excl_head=290_000)
    partial = [r for r in full_vtab("bitfit", value) if r["dataset"] != "svhn"]
    lb = run(complete + partial)
    rows = lb.vtab_rows("vit_test")
    assert list(rows["method"]) == ["lora", "bitfit"]  # complete rows rank first
    lora, bitfit = (r for _, r in rows.iterrows())
    assert lora["mean19"] == pytest.approx(1240 / 19) and lora["mean_of_groups"] == pytest.approx(70.0)
    assert lora["ppt"] == pytest.approx(ppt_score(1240 / 19, 290_000))
    assert math.isnan(bitfit["mean19"]) and bitfit["structured"] == pytest.approx(39.0)
    md = page_markdown(build_page(lb, []))
    summary = md.split("### VTAB-1k summary")[1].split("###")[0]
    line = next(li for li in summary.splitlines() if "| lora " in li)
    assert [c.strip() for c in line.split("|")[1:8]] == ["1", "lora", "80.00", "90.00", "40.00", "65.26", "70.00"]
    assert "– (6/7)" in summary and "– (18/19)" in summary and "– (2/3)" in summary
    tasks = md.split("### VTAB-1k per task")[1].split("###")[0]
    assert "bitfit: 18 of 19 VTAB-1k tasks, missing svhn." in tasks  # once, under the per-task table


def test_rows_never_mix_backbones_and_other_datasets_get_columns_only():
    records = [
        make_record(backbone="vit_a", dataset="digits", top1=90.0),
        make_record(backbone="vit_b", dataset="digits", top1=80.0),
        make_record(backbone="vit_b", dataset="fashion_mnist", top1=85.0),
    ]
    lb = run(records)
    assert list(zip(lb.rows["backbone"], lb.rows["method"])) == [("vit_a", "lora"), ("vit_b", "lora")]
    assert lb.vtab_rows("vit_a").empty and lb.other_datasets("vit_b") == ["digits", "fashion_mnist"]
    md = page_markdown(build_page(lb, []))
    assert "## vit_a" in md and "## vit_b" in md and "VTAB-1k summary" not in md
    section_a = md.split("## vit_a")[1].split("## vit_b")[0]
    assert "90.0 (1)" in section_a and "80.0" not in section_a
    header = next(li for li in md.split("## vit_b")[1].splitlines() if li.startswith("| method"))
    assert [c.strip() for c in header.split("|")[1:5]] == ["method", "digits", "fashion_mnist", "params (M)"]


def test_config_variants_split_rows_but_per_task_configs_do_not():
    records = [
        make_record(method_config={"r": 8}, top1=70.0),
        make_record(method_config={"r": 16}, top1=72.0),
        make_record(method="vpt_deep", dataset="cifar100", method_config={"num_tokens": 10}),
        make_record(method="vpt_deep", dataset="svhn", method_config={"num_tokens": 50}),
    ]
    assert sorted(run(records).rows["label"]) == ["lora (r=16)", "lora (r=8)", "vpt_deep"]


def test_mixed_settings_split_rows_and_duplicate_seeds_are_flagged():
    """Seeds of one dataset run with different settings are never averaged: each setting is its own row, labelled
    with the keys that differ (the other datasets' runs join the row of their own setting)."""
    records = [
        make_record(seed=0, top1=70.0, lr=1e-3),
        make_record(seed=1, top1=72.0, lr=5e-3),
        make_record(dataset="dtd", seed=0, top1=60.0, finished_at="2025-01-01T00:00:00+00:00"),
        make_record(dataset="dtd", seed=0, top1=64.0, finished_at="2025-02-01T00:00:00+00:00"),
    ]
    lb = run(records)
    cells = lb.cells.set_index(["variant", "dataset"])
    assert not cells["mixed"].any()
    assert cells.at[("optim.lr=0.001", "cifar100"), "mean"] == 70.0
    assert cells.at[("optim.lr=0.005", "cifar100"), "mean"] == 72.0
    assert sorted(lb.rows["label"]) == ["lora (optim.lr=0.001)", "lora (optim.lr=0.005)"]
    dtd = cells.loc[("optim.lr=0.001", "dtd")]
    assert dtd["mean"] == 64.0 and dtd["n"] == 1  # the latest rerun of seed 0
    assert any("different optim.lr; each setting is its own row" in w for w in lb.warnings)
    assert any("seed 0 has more than one final record" in w for w in lb.warnings)


def test_training_costs_and_parameters_in_rows():
    records = [
        make_record(seed=0, images_per_s=800.0, peak_mem=4000.0, trainable_excl_head=100_000),
        make_record(seed=1, images_per_s=600.0, peak_mem=5000.0, trainable_excl_head=300_000),
    ]
    row = row_of(run(records))
    assert (row["train_images_per_s"], row["peak_mem_mb"], row["peak_mem_kind"]) == (
        700.0,
        4500.0,
        "cuda_max_allocated",
    )
    assert row["params_m"] == pytest.approx(0.2) and (row["params_min_m"], row["params_max_m"]) == (0.1, 0.3)


# -- costs like for like ---------------------------------------------------------------------------


def test_a_runs_own_latency_is_used_first():
    records = [make_record(seed=0, latency_ratio=1.2), make_record(seed=1, latency_ratio=1.4)]
    row = row_of(run(records, [make_bench("lora", ratio=0.9)]))
    assert row["lat_ratio"] == pytest.approx(1.3) and row["lat_source"] == "run records"  # median of the runs
    assert row["lat_spread"] == pytest.approx(1.02) and row["lat_at"].startswith("merged, batch 1, bf16, 224 px")


def test_latency_from_another_input_size_is_never_joined():
    """Runs at 56 px on a CPU; bench records at 224 px, on a GPU, in another config: none may join."""
    runs = [make_record(seed=s, device="cpu", img_size=56, method_config={"r": 16}) for s in (0, 1)]
    others = [
        make_bench("lora", ratio=0.95, img_size=224, device="cpu", method_config={"r": 16}),
        make_bench("lora", ratio=0.80, img_size=56, device="cuda", method_config={"r": 16}),
        make_bench("lora", ratio=0.70, img_size=56, device="cpu", method_config={"r": 4}),
        make_bench("lora", ratio=0.60, img_size=56, device="cpu", backbone="vit_other", method_config={"r": 16}),
    ]
    row = row_of(run(runs, others))
    assert math.isnan(row["lat_ratio"]) and row["lat_missing"] == "not measured at 56 px"
    cmd = row["lat_command"]
    assert cmd.startswith("python run.py method=lora ") and "backbone.img_size=56 bench.only=true device=cpu" in cmd
    assert "method.r=16" in cmd  # not lora's default
    lb = run(runs, others)
    md = page_markdown(build_page(lb, []))
    assert "not measured at 56 px" in md and cmd in md and "0.95" not in md

    same = make_bench("lora", ratio=1.10, img_size=56, device="cpu", method_config={"r": 16})
    row = row_of(run(runs, [*others, same]))
    assert row["lat_ratio"] == pytest.approx(1.10) and row["lat_source"] == "bench record"
    assert "56 px" in row["lat_at"] and "AMD EPYC (cpu)" in row["lat_at"] and "fp32" in row["lat_at"]


def test_a_noisy_measurement_is_flagged():
    """p90/median of 13 (a merged LoRA shown at 0.95x with a p90 thirteen times its median): flagged noisy, never ≈;
    small ones within noise."""
    bench = [
        make_bench("lora", ratio=0.95, spread=13.0, device="cpu"),
        make_bench("bitfit", ratio=0.99, spread=1.04, device="cpu"),
        make_bench("vpt_deep", ratio=1.08, spread=1.02, device="cpu", mergeable=False),
    ]
    lat = latency_frame(methods_table(bench)).set_index(["method", "batch"])
    lora, bitfit, vpt = lat.loc[("lora", 1)], lat.loc[("bitfit", 1)], lat.loc[("vpt_deep", 1)]
    assert lora["ratio"] == pytest.approx(0.95) and lora["spread"] == pytest.approx(13.0)
    assert lora["noisy"] and not lora["within_noise"] and NOISE_SPREAD < 13.0
    assert bitfit["within_noise"] and not bitfit["noisy"]  # |0.99 - 1| <= 1.04 - 1
    assert not vpt["within_noise"] and not vpt["noisy"]  # 8% above, 2% spread: a cost
    runs = [make_record(method=m, device="cpu", top1=70.0 + i) for i, m in enumerate(("lora", "bitfit", "vpt_deep"))]
    lb = run(runs, bench)
    assert row_of(lb, "lora")["lat_noisy"]
    md = page_markdown(build_page(lb, []))
    header = "latency overhead (p90/median)"
    cell = {m: md_cells(md, "VTAB-1k summary", m)[header] for m in ("lora", "bitfit", "vpt_deep")}
    assert cell == {"lora": "0.95× (13.00) noisy", "bitfit": "≈0.99× (1.04)", "vpt_deep": "1.08× (1.02)"}
    assert f"p90/median exceeds {NOISE_SPREAD}" in md


def test_a_measured_latency_never_prints_nan_as_a_command_and_each_command_comes_once():
    """ia3's latency is its runs' own, lora's is missing: lora's command is on the page once (though lora is in
    two tables), and no command reads 'nan' (pandas' string columns hold NaN where a row has no command)."""
    cpu = {"device": "cpu", "img_size": 56}
    runs = [make_record(method="ia3", latency_ratio=1.1, dataset=d, **cpu) for d in ("dtd", "digits")]
    runs += [make_record(method="lora", dataset=d, **cpu) for d in ("dtd", "digits")]
    lb = run(runs)
    cmd = row_of(lb, "lora")["lat_command"]
    assert cmd.startswith("python run.py method=lora") and pd.isna(row_of(lb, "ia3")["lat_command"])
    page = build_page(lb, [])
    md = page_markdown(page)
    assert md.count(cmd) == 1 and "`nan`" not in md and ": nan" not in md
    assert md.split("### Latency to measure")[1].split("\n## ")[0].count("- ") == 1  # lora only
    assert md_cells(md, "VTAB-1k summary", "ia3")["latency overhead (p90/median)"] == "1.10× (1.02)"
    html_page = page_html(page)
    assert f"<code>{cmd}</code>" in html_page and "<code>nan</code>" not in html_page
    assert "measure it: nan" not in html_page and html_page.count(cmd) == 3  # the list, and lora's two tooltips


def test_one_rounding_half_to_even_of_the_decimal_value_everywhere():
    """Top-1 on 2,000 images is a multiple of 0.05, so ties are common: 791/2000 = 39.55 is the double
    39.549999..., which Python's format() prints as 39.5. Every number rounds its decimal value half to even,
    as Python's decimal module does (independent truth), on the page and in the README's numbers alike."""
    from decimal import Decimal

    group_mean = sum((78.2, 92.0, 75.6, 72.9)) / 4  # VPT-shallow's specialized tasks: 79.675
    for value, spec, places in [(39.55, ".1f", 1), (93.25, ".1f", 1), (96.65, ".1f", 1), (14.45, ".1f", 1),
                                (group_mean, ".2f", 2), (0.125, ".2f", 2), (65.26315789, ".2f", 2)]:  # fmt: skip
        assert fmt(value, spec) == str(round(Decimal(str(round(value, 10))), places)), value
    assert (fmt(39.55, ".1f"), fmt(93.25, ".1f"), fmt(group_mean, ".2f")) == ("39.6", "93.2", "79.68")
    assert f"{39.55:.1f}" == "39.5"  # what the page printed before
    assert fmt(0.6511627, ".3g") == "0.651" and fmt(5.0, ".3g") == "5" and fmt(0.0, ".2g") == "0"
    records = [make_record(method=m, dataset="dsprites_loc", top1=v) for m, v in (("linear", 39.55), ("ssf", 93.25))]
    records += [make_record(method="lora", dataset="dsprites_loc", seed=s, top1=v) for s, v in enumerate((96.6, 96.7))]
    md = page_markdown(build_page(run(records), []))
    cells = {m: md_cells(md, "VTAB-1k per task", m)["dsprites_loc"] for m in ("linear", "ssf", "lora")}
    assert cells == {"linear": "39.6 (1)", "ssf": "93.2 (1)", "lora": "96.6 ± 0.1 (2)"}  # lora: 96.65, to even


def test_results_readme_quotes_the_committed_page():
    """results/README.md's top-1 numbers are the committed leaderboard's, rounded as the page rounds them."""
    import re

    readme = " ".join((ROOT / "results" / "README.md").read_text().split())
    means = pd.read_csv(ROOT / "results" / "leaderboard" / "leaderboard.csv").set_index("method")
    names = {"DoRA": "dora", "LoRA": "lora", "SSF": "ssf", "Houlsby": "adapter_houlsby", "RepAdapter": "repadapter",
             "Adapter+": "adapter_plus", "AdaLoRA": "adalora", "full": "full", "Pfeiffer": "adapter_pfeiffer",
             "BitFit": "bitfit", "FacT": "fact", "AdaptFormer": "adaptformer", "IA3": "ia3", "linear": "linear",
             "prefix": "prefix", "VPT-deep": "vpt_deep", "VPT-shallow": "vpt_shallow"}  # fmt: skip
    table = readme.split("digits / fashion_mnist / dsprites_loc:")[1].split(". What changed")[0]
    quoted = re.findall(r"([\w+-]+) ([\d.]+) / ([\d.]+) / ([\d.]+)", table)
    assert sorted(n for n, *_ in quoted) == sorted(names)
    for name, *values in quoted:
        row = means.loc[names[name]]
        page = [fmt(row[f"{d}_mean"], ".1f") for d in ("digits", "fashion_mnist", "dsprites_loc")]
        assert values == page, name
    shown = readme.split("top-1 on 2,000 test images):")[1].split("(chance is")[0]
    for name, value in re.findall(r"([A-Za-z][\w+ -]*?) ([\d.]+)(?:,| and)", shown + ","):
        method = {"full fine-tuning": "full", "Houlsby adapters": "Houlsby", "Pfeiffer adapters": "Pfeiffer",
                  "FacT-TK": "FacT", "linear probing": "linear", "prefix tuning": "prefix"}.get(name, name)  # fmt: skip
        assert value == fmt(means.loc[names[method], "dsprites_loc_mean"], ".1f"), name


def test_coverage_names_each_missing_task_once():
    """Three methods with one VTAB-1k task each (two share it): the tasks no method ran are named once, each
    method's own gap once, and the per-task table has a column only for tasks someone ran."""
    records = [make_record(method=m, dataset=d, top1=70.0) for m, d in
               (("lora", "dsprites_loc"), ("bitfit", "dsprites_loc"), ("linear", "dtd"))]  # fmt: skip
    md = page_markdown(build_page(run(records), []))
    ours = md.split("## Reference")[0]
    for task in TASKS:
        assert ours.count(task) == (1 if task not in ("dsprites_loc", "dtd") else ours.count(task)), task
    assert "No method has run cifar100, caltech101, oxford_flowers102" in ours and "(17 tasks; no column here)" in ours
    assert "bitfit, lora: 1 of 19 VTAB-1k tasks, missing dtd." in ours
    assert "linear: 1 of 19 VTAB-1k tasks, missing dsprites_loc." in ours
    header = next(li for li in ours.split("### VTAB-1k per task")[1].splitlines() if li.startswith("| method"))
    assert [c.strip() for c in header.split("|")[1:-1]] == ["method", "dtd", "dsprites_loc"]


def test_the_summary_comes_first(tmp_path):
    """The page opens with the summary tables; plots, recipes, where the numbers come from and the published
    reference follow, in that order, in Markdown and in HTML."""
    demo_records(tmp_path / "runs")
    bench = tmp_path / "bench"
    write_bench_record(bench / "a.json", make_bench("linear", 0, 1000.0, 3000.0, ratio=1.0))
    written = write_leaderboard(tmp_path / "runs", tmp_path / "out", bench)
    md, page = written["leaderboard.md"].read_text(), written["leaderboard.html"].read_text()
    tables = ["VTAB-1k summary", "VTAB-1k per task", "Other datasets", "Recipe and provenance"]
    sections = ["Methods compared", "Failed and interrupted runs", "Made from", "Reference", "Definitions"]
    at = [md.index(f"### {t}") for t in tables[:3]] + [md.index("![")]
    at += [md.index(f"### {tables[3]}")] + [md.index(f"\n## {s}") for s in sections]
    assert at == sorted(at) and md.index("run records:") < at[0]
    assert [li for li in md.splitlines() if li.startswith("## ")] == [
        "## vit_test", "## Methods compared (bench records)", "## Failed and interrupted runs", "## Made from",
        "## Reference: published (not measured here)", "## Definitions"]  # fmt: skip
    at = [page.index(f'-vit-test">{t}') for t in tables] + [page.index(f"<h2>{s}") for s in sections]
    assert at == sorted(at) and page.index("<h3") == page.index('<h3 id="vtab-summary-vit-test">')


# -- provenance ------------------------------------------------------------------------------------


def test_provenance_in_every_file(tmp_path):
    runs_dir, bench_dir = tmp_path / "runs", tmp_path / "bench"
    records = [
        make_record(seed=0, top1=70.0, finished_at="2025-01-01T10:00:00+00:00", git_sha="1111111111aaaa"),
        make_record(
            seed=1, top1=72.0, finished_at="2025-01-03T10:00:00+00:00", git_sha="2222222222bbbb", git_dirty=True
        ),
        make_record(method="linear", top1=60.0, trainable_excl_head=0),
    ]
    for r in records:
        write_record(record_path(runs_dir, r), r)
    write_bench_record(bench_dir / "lora.json", make_bench("lora"))
    out = tmp_path / "out"
    written = write_leaderboard(runs_dir, out, bench_dir)
    md = written["leaderboard.md"].read_text()
    assert "3 run records" in md and "1 bench records" in md
    assert "1111111111" in md and "2222222222" in md and "uncommitted changes" in md
    assert "2025-01-01 to 2025-01-03" in md and "NVIDIA H100 80GB HBM3 (cuda)" in md
    prov = md_cells(md, "Recipe and provenance", "lora")
    assert (prov["input (px)"], prov["dtype"], prov["optimizer"], prov["lr"]) == ("224", "bf16", "AdamW", "0.001")
    assert prov["commit"] == "1111111111, 2222222222 (uncommitted changes)"
    assert prov["finished"] == "2025-01-01 to 2025-01-03"
    links = [p.split(")")[0] for p in md.split("### Recipe and provenance")[1].split("\n## ")[0].split("](")[1:]]
    assert len(links) == 3 and all((out / link).resolve().is_file() for link in links)  # relative, and they resolve
    csv = pd.read_csv(written["leaderboard.csv"])
    lora = csv.set_index("method").loc["lora"]
    assert lora["commits"] == "1111111111, 2222222222" and bool(lora["dirty"]) and lora["n_records"] == 2
    assert all((out / p).resolve().is_file() for p in lora["records"].split(";")) and lora["img_size"] == 224
    tex = written["leaderboard.tex"].read_text()
    assert "% Runs: commit 1111111111" in tex and r"\toprule" in tex and r"$\pm$" in tex
    methods = written["methods.md"].read_text()
    assert "fedcba9876" in methods and "uncommitted changes" in methods and "2025-01-02" in methods
    html_page = written["leaderboard.html"].read_text()
    assert 'href="../runs/' in html_page and "1111111111" in html_page


# -- the reference block ---------------------------------------------------------------------------


def test_reference_block_is_separate():
    records = full_vtab("lora", lambda t, s: 61.5 + s, seeds=(0, 1))
    lb = run(records)
    md = page_markdown(build_page(lb, []))
    ours, ref = md.split("## Reference: published (not measured here)")
    lora = load_reference().set_index("method").loc["lora"]
    assert f"{lora['mean19']:.2f}" in ref and f"{lora['mean19']:.2f}" not in ours
    assert "NOAH" not in ours and "published" not in ours.lower()
    assert "62.0 ± 0.7 (2)" in ours and "62.0 ± 0.7 (2)" not in ref and "62.00" not in ref
    assert len(pd.read_csv(pd.io.common.StringIO(leaderboard_csv(lb)))) == len(lb.rows)  # no published rows


# -- files -----------------------------------------------------------------------------------------


def demo_records(root: Path, backbone: str = "vit_test") -> list[dict]:
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
            latency_ratio=lat[method],
            images_per_s=500.0,
            peak_mem=3000.0,
            backbone=backbone,
        )
    records.append(
        make_record(method="lora", dataset="dmlab", seed=5, status="failed", error="boom", backbone=backbone)
    )
    records.append(
        make_record(method="lora", dataset="digits", seed=0, top1=95.0, latency_ratio=1.02, backbone=backbone)
    )
    records.append(
        make_record(method="linear", dataset="digits", seed=0, top1=90.0, trainable_excl_head=0, backbone=backbone)
    )
    for r in records:
        write_record(record_path(root, r), r)
    return records


def test_write_leaderboard_is_deterministic(tmp_path):
    demo_records(tmp_path / "runs")
    bench = tmp_path / "bench"
    write_bench_record(bench / "a.json", make_bench("linear", 0, 1000.0, 3000.0, ratio=1.0))
    write_bench_record(bench / "b.json", make_bench("vpt_deep", 560_000, 400.0, 6000.0, ratio=1.3, mergeable=False))
    first = write_leaderboard(tmp_path / "runs", tmp_path / "out1", bench)
    second = write_leaderboard(tmp_path / "runs", tmp_path / "out2", bench)
    assert set(first) == set(second)
    for name in (
        "leaderboard.md",
        "leaderboard.csv",
        "leaderboard.tex",
        "leaderboard.html",
        "methods.md",
        "methods.csv",
    ):
        assert name in first
    assert any(n.endswith("_params.png") for n in first) and any(n.endswith("_latency.svg") for n in first)
    assert "published_vtab1k_params.svg" in first
    for name in first:
        assert first[name].read_bytes() == second[name].read_bytes(), name
    methods = (tmp_path / "out1" / "methods.md").read_text()
    vpt = next(li for li in methods.splitlines() if li.startswith("| vpt_deep"))
    cells = [c.strip() for c in vpt.split("|")[1:-1]]
    assert cells[1] == "0.651%" and "1.30× (1.02)" in cells and "0.40×" in cells and "2.00×" in cells
    assert cells[-2] == "no"
    tex = (tmp_path / "out1" / "leaderboard.tex").read_text()
    assert r"\toprule" in tex and r"$\pm$" in tex and "vpt\\_deep" in tex


def test_record_order_does_not_matter(tmp_path):
    records = demo_records(tmp_path)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    a, b = run(records), run(shuffled)
    assert page_markdown(build_page(a, [])) == page_markdown(build_page(b, []))
    assert leaderboard_csv(a) == leaderboard_csv(b)


def test_methods_table_relative_to_linear_and_memory_only_per_method():
    rows = methods_table(
        [
            make_bench("lora", 294_912, 600.0, 4500.0),
            make_bench("linear", 0, 1000.0, 3000.0),
            make_bench("lora", 294_912, 600.0, 4500.0, device="cpu", mem_kind="cpu_peak_rss_isolated"),
            make_bench("linear", 0, 1000.0, 3000.0, device="cpu", mem_kind="cpu_peak_rss_isolated"),
            make_bench("ssf", 200_000, 500.0, 3568.0, backbone="vit_rss", mem_kind="cpu_peak_rss"),
            make_bench("linear", 0, 1000.0, 3568.0, backbone="vit_rss", mem_kind="cpu_peak_rss"),
        ]
    ).set_index(["backbone", "device_label", "method"])
    lora = rows.loc[("vit_test", "NVIDIA H100 80GB HBM3 (cuda)", "lora")]
    assert lora["train_rel"] == pytest.approx(0.6) and lora["mem_rel"] == pytest.approx(1.5)
    assert lora["params_pct"] == pytest.approx(100 * 294_912 / 86_000_000)
    assert rows.loc[("vit_test", "AMD EPYC (cpu)", "lora"), "mem_rel"] == pytest.approx(1.5)  # isolated: per method
    assert math.isnan(rows.loc[("vit_rss", "NVIDIA H100 80GB HBM3 (cuda)", "ssf"), "mem_rel"])  # process RSS: no ratio


def test_plots_only_where_two_rows_compare(tmp_path):
    records = [make_record(dataset="digits", top1=95.0), make_record(method="linear", dataset="pets", top1=90.0)]
    for r in records:
        write_record(record_path(tmp_path / "runs", r), r)
    written = write_leaderboard(tmp_path / "runs", tmp_path / "out")
    assert not [n for n in written if n.startswith("vit-test_")]  # one row per dataset: nothing to compare
    assert "published_vtab1k_params.png" in written


def test_plot_with_zero_parameters_and_published_points(tmp_path):
    plot = plot_tradeoff(
        [("linear", 0.0, 52.0), ("lora", 0.29, 72.0), ("full", 85.8, 65.0), ("bitfit", 0.1, 62.0)],
        "trainable parameters (M, log scale)",
        "top-1 (%)",
        "test",
        True,
        tmp_path,
        "zero",
        published=[("lora (pub.)", 0.29, 72.25)],
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
    bench = tmp_path / "bench"
    write_bench_record(bench / "a.json", make_bench("linear", 0, 1000.0, 3000.0, ratio=1.0))
    page = write_leaderboard(tmp_path / "runs", tmp_path / "out", bench)["leaderboard.html"]
    text = page.read_text()
    assert "<script src" not in text and "<link" not in text  # self-contained
    shot = tmp_path / "page.png"
    done = run_chromium(f"--screenshot={shot}", "--window-size=1400,1000", page.as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (1000, 1400)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text and lines, not a blank page
    dom = run_chromium("--dump-dom", page.as_uri()).stdout
    headings = ["VTAB-1k summary: vit_test", "VTAB-1k per task", "Other datasets", "Recipe and provenance"]
    headings += ["Methods compared on", "Runs that did not finish", "Reference: published", "Definitions"]
    for heading in headings:
        assert heading in dom, heading
    body = dom.split('id="T_vtab-summary-vit-test"')[1].split("<tbody>")[1].split("</tbody>")[0]
    assert body.count("<tr>") == 5
    for method in ("linear", "bitfit", "lora", "vpt_deep", "full"):
        assert f">{method}</td>" in body
    assert 'class="sortable"' in dom and "addEventListener('click'" in dom
    assert dom.count('src="data:image/svg+xml;base64,') >= 5  # params and latency per dataset, and the published

    def order(dom: str) -> list[str]:
        body = dom.split('id="T_vtab-summary-vit-test"')[1].split("<tbody>")[1].split("</tbody>")[0]
        return [row.split("</td>")[1].rsplit(">", 1)[1] for row in body.split("<tr>")[1:]]

    # the page sorts itself from the link (clicking the header): by parameters, then reversed
    by_params = order(run_chromium("--dump-dom", page.as_uri() + "#sort=T_vtab-summary-vit-test:7").stdout)
    assert by_params == ["linear", "bitfit", "lora", "vpt_deep", "full"]
    desc = order(run_chromium("--dump-dom", page.as_uri() + "#sort=T_vtab-summary-vit-test:7:desc").stdout)
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
    lb = run(records)
    cells = lb.cells.set_index("dataset")
    assert sorted(cells.index) == ["cifar10 (a)", "cifar10 (b)", "pets (x/data)", "pets (y/data)"]
    assert (cells.at["cifar10 (a)", "mean"], cells.at["cifar10 (a)", "n"]) == (71.0, 2)
    assert (cells.at["cifar10 (b)", "mean"], cells.at["cifar10 (b)", "n"]) == (30.0, 1)
    assert cells.at["pets (x/data)", "mean"] == 50.0 and cells.at["pets (y/data)", "mean"] == 60.0
    assert list(lb.failures["dataset"]) == ["cifar10 (b)"]
    assert any("dataset cifar10 stands for 2 different sources (/a/cifar10, /b/cifar10)" in w for w in lb.warnings)
    md = page_markdown(build_page(lb, []))
    header = next(li for li in md.splitlines() if li.startswith("| method") and "cifar10" in li)
    assert [c.strip() for c in header.split("|")[2:6]] == [
        "cifar10 (a)",
        "cifar10 (b)",
        "pets (x/data)",
        "pets (y/data)",
    ]
    assert "cifar10 (a)_mean" in leaderboard_csv(lb)


def test_one_folder_or_named_tasks_keep_their_name():
    records = [
        folder_record("/a/flowers", 70.0),
        folder_record("/a/flowers", 74.0, seed=1),
        make_record(dataset="cifar100", top1=60.0),  # a named task: roots on other machines are the same task
        make_record(dataset="cifar100", seed=1, top1=62.0),
    ]
    records[3]["config"]["dataset"] = {"name": "cifar100", "root": "/elsewhere/vtab/cifar100"}
    cells = run(records).cells.set_index("dataset")
    assert sorted(cells.index) == ["cifar100", "flowers"] and list(cells["n"]) == [2, 2]
    both = run([*records, folder_record("/data/mine/cifar100", 10.0)])
    assert sorted(both.cells["dataset"]) == ["cifar100", "cifar100 (mine)", "flowers"]  # the named task keeps its name


def test_task_folders_with_one_name_in_the_files(tmp_path):
    runs = tmp_path / "runs"
    records = [folder_record("/a/cifar10", 70.0), folder_record("/b/cifar10", 30.0)]
    records += [folder_record("/a/cifar10", 60.0, method="linear"), folder_record("/b/cifar10", 20.0, method="linear")]
    for r in records:
        write_record(record_path(runs, r), r)
    written = write_leaderboard(runs, tmp_path / "out")
    md = written["leaderboard.md"].read_text()
    assert "70.0 (1)" in md and "30.0 (1)" in md and "cifar10 (a)" in md and "cifar10 (b)" in md
    assert "vit-test_cifar10-a_params.png" in written and "vit-test_cifar10-b_params.png" in written


# -- under-tuned cells: the chosen value at the edge of a truncated search ----------------------------


def test_search_edge_only_where_the_recipes_grid_goes_past_the_chosen_edge():
    grid = [5e-4, 1e-3, 5e-3, 1e-2]
    top, bottom = search_edge(5e-3, [1e-3, 5e-3], grid), search_edge(1e-3, [1e-3, 5e-3], grid)
    assert top == "0.005 is the largest tried (2 of the recipe's 4; untried: 0.01 above)"
    assert bottom == "0.001 is the smallest tried (2 of the recipe's 4; untried: 0.0005 below)"
    assert search_edge(5e-3, [1e-3, 5e-3], [1e-3, 5e-3]) is None  # the whole grid was searched
    assert search_edge(1e-2, [1e-3, 5e-3, 1e-2], grid) is None  # the grid's own edge: nothing past it
    assert search_edge(5e-3, [1e-3, 5e-3, 1e-2], grid) is None  # an inner point
    assert search_edge(1e-3, [1e-3], [1e-4, 1e-3, 1e-2]) == (
        "0.001 is the only value tried (1 of the recipe's 3; untried: 0.0001 below and 0.01 above)"
    )
    assert search_edge("sgd", ["sgd"], ["sgd", "adamw"]) is None  # not numbers: no order, no edge


def _tuned(lr_tried, lr_chosen, grid, dataset="dtd", method="lora"):
    recs = []
    for lr in lr_tried:
        r = make_record(method=method, dataset=dataset, protocol="tune", lr=lr)
        r["config"]["sweep"] = {"grid": {"optim.lr": grid}}
        recs.append(r)
    final = make_record(method=method, dataset=dataset, lr=lr_chosen, top1=70.0)
    final["config"]["sweep"] = {"grid": {"optim.lr": grid}}
    return [*recs, validate(final)]


def test_under_tuned_cells_are_marked_on_the_page_with_the_reason(tmp_path):
    grid = [1e-4, 1e-3, 1e-2]
    records = _tuned([1e-4, 1e-3], 1e-3, grid) + _tuned(grid, 1e-3, grid, method="bitfit")
    lb = run(records)
    why = dict(zip(lb.cells["method"], lb.cells["under_tuned"]))
    assert why["lora"] == "optim.lr=0.001 is the largest tried (2 of the recipe's 3; untried: 0.01 above)"
    assert why["bitfit"] == ""  # the recipe's whole grid was searched
    md = page_markdown(build_page(lb, []))
    tasks = md_cells(md, "VTAB-1k per task", "lora")
    assert tasks["dtd"].endswith("‡") and not md_cells(md, "VTAB-1k per task", "bitfit")["dtd"].endswith("‡")
    assert "1 of 2 rows:" in md and "lora (dtd): optim.lr=0.001 is the largest tried" in md
    csv = pd.read_csv(io.StringIO(leaderboard_csv(lb)), dtype=str, keep_default_na=False)
    assert dict(zip(csv["method"], csv["dtd_under_tuned"])) == {"bitfit": "", "lora": why["lora"]}


def test_a_final_run_without_tune_records_is_not_marked():
    grid = [1e-4, 1e-3, 1e-2]
    (final,) = _tuned([], 1e-3, grid)
    assert run([final]).cells["under_tuned"].tolist() == [""]


def test_the_committed_vpt_rows_say_why_they_are_low():
    """The committed page must not let a reader take VPT's CPU-sized search for VPT's result."""
    md = (Path(__file__).parents[1] / "results" / "leaderboard" / "leaderboard.md").read_text()
    line = next(li for li in md.splitlines() if li.startswith("- vpt_shallow (digits"))
    assert "method.num_tokens=10 is the only value tried" in line and "optim.lr=0.125 is the largest tried" in line
    assert md_cells(md, "Other datasets", "vpt_shallow")["digits"].endswith("‡")


def test_runs_on_different_compute_are_never_averaged_as_one_setting():
    """Seeds of one config run on a CPU in fp32 and on a GPU in bf16 are different settings (as their identities
    are): never one cell."""
    cpu = make_record(seed=0, top1=60.0, device="cpu")
    gpu = make_record(seed=1, top1=70.0)
    gpu["compute"] = "cuda-bf16"
    lb = run([cpu, validate(gpu)])
    assert not ((lb.cells["n"] == 2) & ~lb.cells["mixed"]).any(), lb.cells[["variant", "n", "mixed"]]
