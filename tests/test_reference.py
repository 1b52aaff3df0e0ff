"""The published reference table: every row says where it comes from and how it was measured, and
its per-task numbers give the means its source prints."""

from __future__ import annotations

import csv
from importlib.resources import files

import pandas as pd
import pytest

from vpeft.results.leaderboard import AVERAGES, EPOCH_SELECTIONS, REFERENCE_FIELDS, REFERENCE_FILE, load_reference
from vpeft.vtab import GROUPS, TASKS

TOLERANCE = 0.1
STATED = {"stated_natural": "natural", "stated_specialized": "specialized", "stated_structured": "structured"}


def raw_rows() -> list[dict[str, str]]:
    text = files("vpeft.results").joinpath("reference", REFERENCE_FILE).read_text()
    return list(csv.DictReader(text.splitlines()))


def readme() -> str:
    return files("vpeft.results").joinpath("reference", "README.md").read_text()


def test_every_row_carries_source_data_copy_variant_epoch_and_average():
    from vpeft.methods import METHODS

    rows = raw_rows()
    assert len({r["method"] for r in rows}) == len(rows)  # one name per (method, source)
    for r in rows:
        for field in REFERENCE_FIELDS:
            assert r[field].strip(), (r["method"], field)
        assert r["epoch_selection"] in EPOCH_SELECTIONS, r["method"]
        assert r["average"] in AVERAGES, r["method"]
        assert r["data_copy"].split(" (")[0] in ("TFDS", "NOAH JPEG copy", "PETL_Vision processed copy"), r["method"]
        assert r["family"] in METHODS, r["method"]  # the vpeft method the row compares with
        assert all(r[t].strip() for t in TASKS), r["method"]  # 19 per-task numbers, no gaps
        assert all(0.0 <= float(r[t]) <= 100.0 for t in TASKS), r["method"]
        if r["stated_average"]:
            assert r["average"] in ("mean of group means", "mean of 19 tasks"), r["method"]


def test_the_data_copy_and_variant_of_the_rows_the_literature_mixes():
    ref = load_reference().set_index("method")
    for m in ("full", "linear", "vpt_shallow", "vpt_deep"):
        assert ref.loc[m, "data_copy"].startswith("TFDS"), m
    for m in ("lora", "bitfit", "adaptformer", "ssf", "fact_tk_r32", "fact_tt_r16"):
        assert ref.loc[m, "data_copy"] == "NOAH JPEG copy", m
    assert "fused qkv" in ref.loc["lora", "variant"] and "fused qkv" in ref.loc["lora [PETL_Vision]", "variant"]
    assert ref.loc["lora", "epoch_selection"] == "best test epoch"
    petl = ref[ref.index.str.endswith("[PETL_Vision]")]
    assert len(petl) >= 10 and set(petl["epoch_selection"]) == {"last epoch"}
    assert petl["source"].str.contains("OSU-MLB/PETL_Vision").all()
    for family in ("lora", "adaptformer", "ssf", "repadapter", "fact", "adapter_houlsby", "adapter_pfeiffer"):
        assert family in set(petl["family"]), family


def test_per_task_numbers_give_the_sources_stated_means():
    ref = load_reference()
    checked = 0
    for _, r in ref.iterrows():
        if not pd.isna(r["stated_average"]):
            key = "mean_of_groups" if r["average"] == "mean of group means" else "mean19"
            # the source rounds its mean (to 0.1: up to 0.05) of per-task numbers it also rounded (up to 0.05 each)
            assert r[key] == pytest.approx(float(r["stated_average"]), abs=TOLERANCE), r["method"]
            checked += 1
        for column, group in STATED.items():
            if not pd.isna(r[column]):
                assert r[group] == pytest.approx(float(r[column]), abs=TOLERANCE), (r["method"], group)
    assert checked >= 5  # adaptformer and the four FacT rows at least


def test_fact_rows_are_fact_table_1():
    ref = load_reference().set_index("method")
    tk = ref.loc["fact_tk_r32"]
    assert [tk[t] for t in GROUPS["natural"]] == [70.6, 90.6, 70.8, 99.1, 90.7, 88.6, 54.1]
    assert tk["params_m"] == 0.069 and "Table 1" in tk["source"] and tk["family"] == "fact"
    assert tk["variant"].startswith("FacT-TK") and ref.loc["fact_tt_r16", "variant"].startswith("FacT-TT")
    assert ref.loc["fact_tt_r16", "stated_average"] == 75.3


def test_readme_lists_the_rows_it_could_not_verify():
    text = readme()
    for name in ("Adapter+", "RepAdapter", "DoRA", "IA3"):
        assert name in text.split("## Not included")[1], name
    for column in REFERENCE_FIELDS:
        assert f"`{column}`" in text, column
