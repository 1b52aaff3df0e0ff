"""Retention and sequential records as frames: what adapting to one task cost the backbone elsewhere."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from vpeft.results.retention import iter_retention_records
from vpeft.results.sequential import iter_sequential_records

RETENTION_COLUMNS = ["backbone", "method", "dataset", "seed", "target_top1", "retention", "probes", "per_task", "path",
                     "run_config_hash"]  # fmt: skip
SEQUENTIAL_COLUMNS = ["backbone", "method", "first", "second", "seed", "a_before", "a_after", "forgetting", "b_top1",
                      "b_alone_top1", "path"]  # fmt: skip


def retention_frame(records: Sequence[dict[str, Any]], paths: Sequence[str | Path] | None = None) -> pd.DataFrame:
    """One row per ``ok`` retention record: the run's target top-1 and its mean retention (a fraction), the probe
    tasks and each one's retention; the latest record of a (backbone, method, dataset, seed, probes) wins."""
    paths = list(paths) if paths is not None else [None] * len(records)
    rows = [
        {
            "backbone": r["backbone"], "method": r["method"], "dataset": r["dataset"], "seed": r["seed"],
            "target_top1": r["metrics"]["target_top1"], "retention": r["metrics"]["mean_retention"],
            "probes": ", ".join(r["probe"]["tasks"]),
            "per_task": {t: p["retention"] for t, p in r["per_task"].items()},
            "path": str(p) if p is not None else None, "run_config_hash": r["run"]["config_hash"],
            "finished_at": r.get("finished_at") or "",
        }
        for r, p in zip(records, paths)
        if r["status"] == "ok"
    ]  # fmt: skip
    df = pd.DataFrame(rows, columns=[*RETENTION_COLUMNS, "finished_at"])
    df = df.sort_values(["finished_at", "path"]).drop_duplicates(
        ["backbone", "method", "dataset", "seed", "probes"], keep="last"
    )
    return df.drop(columns="finished_at").sort_values(["backbone", "method", "dataset", "seed"]).reset_index(drop=True)


def sequential_frame(records: Sequence[dict[str, Any]], paths: Sequence[str | Path] | None = None) -> pd.DataFrame:
    """One row per ``ok`` sequential record (A then B): A's top-1 before and after, the drop, B's top-1 continued
    and alone."""
    paths = list(paths) if paths is not None else [None] * len(records)
    rows = [
        {
            "backbone": r["backbone"], "method": r["method"], "first": r["tasks"][0], "second": r["tasks"][1],
            "seed": r["seed"], **{k: r["metrics"].get(k) for k in ("a_before", "a_after", "forgetting", "b_top1",
                                                                   "b_alone_top1")},
            "path": str(p) if p is not None else None,
        }
        for r, p in zip(records, paths)
        if r["status"] == "ok"
    ]  # fmt: skip
    return (
        pd.DataFrame(rows, columns=SEQUENTIAL_COLUMNS)
        .sort_values(["backbone", "method", "first", "second", "seed"])
        .reset_index(drop=True)
    )


def load_retention_records(path: str | Path) -> pd.DataFrame:
    found = list(iter_retention_records(path))
    return retention_frame([r for _, r in found], [p for p, _ in found])


def load_sequential_records(path: str | Path) -> pd.DataFrame:
    found = list(iter_sequential_records(path))
    return sequential_frame([r for _, r in found], [p for p, _ in found])


def row_retention(ret: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per leaderboard row (backbone, method, variant): the mean retention of its ranked final runs that were
    probed (matched by backbone, method, dataset, seed and the run's config hash) and how many were."""
    keys = ["backbone", "method", "variant"]
    final = runs[(runs["status"] == "ok") & (runs["protocol"] == "final")]
    final = final[["backbone", "method", "variant", "dataset_label", "seed", "config_hash"]].rename(
        columns={"dataset_label": "dataset", "config_hash": "run_config_hash"}
    )
    probed = final.merge(ret[["backbone", "method", "dataset", "seed", "run_config_hash", "retention"]],
                         on=["backbone", "method", "dataset", "seed", "run_config_hash"])  # fmt: skip
    return (
        probed.groupby(keys, sort=True)["retention"]
        .agg(["mean", "size"])
        .reset_index()
        .rename(columns={"mean": "retention", "size": "retention_n"})
    )
