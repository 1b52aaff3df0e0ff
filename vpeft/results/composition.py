"""The leaderboard's composition section: what each method's deltas are worth once composed.

Two sources, both records:

- merge records (``python run.py job=merge ...``, ``scripts/merge_bench.py``): one per (backbone,
  method, algorithm, space, task pool); each holds per task the merged model's top-1 with that task's
  head, the task's own delta's top-1 ("individual") and their ratio ("normalized");
- AdapterFusion runs (``method=adapter_fusion``, ordinary run records): trained on one task over the
  pool's adapters. Its individual top-1 is that of the adapter run on the same task among the fused
  ones (the delta file next to the run record), so its normalized accuracy means the same as a merge's.

Definitions (as the page states them): a cell is the mean over the pool's tasks of the merged (or
fused) top-1 and of the normalized accuracy (merged / individual, in %); "individual" is the mean
top-1 of the method's own deltas on the same tasks; ``delta_params`` are the trainable parameters of one
task's delta, excluding the head, from its run record; ``params`` what one task's composed model trained
beyond the backbone and its head: the delta's for a merge (one merged delta serves every task), the
fusion layers plus the pool's adapters for AdapterFusion. Negation records (forgetting) are listed apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any

import pandas as pd

from vpeft.results.merges import iter_merge_records

MERGE_COLUMNS: dict[str, str] = {
    "path": "string",
    "status": "string",
    "error": "string",
    "backbone": "string",
    "method": "string",
    "algorithm": "string",
    "space": "string",
    "tasks": "string",
    "n_tasks": "Int64",
    "seed": "Int64",
    "chosen": "string",
    "mean_top1": "float64",
    "mean_individual_top1": "float64",
    "mean_normalized": "float64",
    "target_drop": "float64",
    "control_normalized": "float64",
    "merge_seconds": "float64",
    "eval_seconds": "float64",
    "git_sha": "string",
    "git_dirty": "boolean",
    "device": "string",
    "finished_at": "datetime64[ns, UTC]",
}
FUSION = "adapter_fusion"
FUSION_LABEL = "AdapterFusion"


def _tail(path: Any, n: int = 4) -> tuple[str, ...]:
    """The last ``n`` parts of a path (dataset/backbone/method/file): how a record is found again wherever
    the folder was when it was written (records hold the paths they were given, relative or absolute)."""
    return PurePath(str(path)).parts[-n:]


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in sorted(value.items()))
    return f"{value:g}" if isinstance(value, float) else str(value)


def merge_frame(records: Sequence[dict[str, Any]], paths: Sequence[str | Path] | None = None) -> pd.DataFrame:
    """Merge records (as ``vpeft.results.merges.validate_merge_record`` checks them), one row each.

    ``run_records`` (a list per row) names the run records of the tasks' own deltas."""
    rows = []
    for i, r in enumerate(records):
        m, cost, env = r.get("metrics") or {}, r.get("cost") or {}, r.get("env") or {}
        rows.append({
            "path": str(paths[i]) if paths is not None else None,
            "status": r["status"],
            "error": r.get("error"),
            "backbone": r["backbone"],
            "method": r["method"],
            "algorithm": r["algorithm"],
            "space": r["space"],
            "tasks": "+".join(r["tasks"]),
            "n_tasks": len(r["tasks"]),
            "seed": r["seed"],
            "chosen": _text(r.get("params") or {}),
            **{k: m.get(k) for k in ("mean_top1", "mean_individual_top1", "mean_normalized", "target_drop",
                                     "control_normalized")},  # fmt: skip
            "merge_seconds": cost.get("merge_seconds"),
            "eval_seconds": cost.get("eval_seconds"),
            "git_sha": env.get("git_sha"),
            "git_dirty": env.get("git_dirty"),
            "device": env.get("device_name") or env.get("device"),
            "finished_at": r.get("finished_at"),
            "run_records": [p.get("record") for p in (r.get("per_task") or {}).values()],
        })  # fmt: skip
    df = pd.DataFrame(rows, columns=[*MERGE_COLUMNS, "run_records"])
    for name, dtype in MERGE_COLUMNS.items():
        if dtype.startswith("datetime"):
            df[name] = pd.to_datetime(df[name], utc=True, format="ISO8601", errors="coerce").astype(dtype)
        else:
            df[name] = df[name].astype("object").where(df[name].notna(), None).astype(dtype)
    return df


def load_merge_records(path: str | Path) -> pd.DataFrame:
    """Every valid merge record under ``path``, one row each (unreadable files skipped with a warning)."""
    found = list(iter_merge_records(path))
    return merge_frame([r for _, r in found], [p for p, _ in found])


def fusion_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per finished final AdapterFusion run of ``runs`` (a ``load_records`` frame) whose own adapter
    (the fused delta trained on the same task) is among the runs: backbone, the adapters' method, the task,
    seed, fused and individual top-1, normalized (%), the pool (the fused adapters' tasks) and the paths."""
    cols = ["backbone", "method", "dataset", "seed", "top1", "individual_top1", "normalized", "tasks", "path",
            "individual_path", "params"]  # fmt: skip
    by_tail = {_tail(p): i for i, p in runs["path"].items() if p is not None}
    fused = runs[(runs["method"] == FUSION) & (runs["status"] == "ok") & (runs["protocol"] == "final")]
    rows = []
    for _, f in fused.iterrows():
        tails = (_tail(Path(a).with_suffix(".json")) for a in f.get("method_config.adapters") or [])
        sources = [runs.loc[by_tail[t]] for t in tails if t in by_tail]
        own = [s for s in sources if s["dataset"] == f["dataset"] and s["status"] == "ok"]
        if not own or len(sources) != len(f.get("method_config.adapters") or []):
            continue  # an adapter run that is not in this folder: no individual accuracy to compare with
        o = own[0]
        rows.append({
            "backbone": f["backbone"], "method": o["method"], "dataset": f["dataset_label"], "seed": f["seed"],
            "top1": f["metrics.top1"], "individual_top1": o["metrics.top1"],
            "normalized": 100 * f["metrics.top1"] / o["metrics.top1"] if o["metrics.top1"] else None,
            "tasks": "+".join(sorted(s["dataset_label"] for s in sources)), "path": f["path"],
            "individual_path": o["path"], "params": f["params.trainable_excl_head"],
        })  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def _params_of(runs: pd.DataFrame | None, records: list[Any]) -> float | None:
    """The trainable parameters (excluding the head) of the tasks' own deltas, from their run records."""
    if runs is None or runs.empty:
        return None
    tails = {_tail(p) for p in records if p}
    hit = runs[[p is not None and _tail(p) in tails for p in runs["path"]]]["params.trainable_excl_head"].dropna()
    return float(hit.median()) if len(hit) else None


def composition_frame(merges: pd.DataFrame, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """The section's data in long form: one row per (backbone, method, pool, algorithm) with the mean merged
    top-1, mean normalized accuracy (%), the individual mean top-1, the chosen coefficients, the delta's
    trainable parameters and the record paths. AdapterFusion rows (algorithm "AdapterFusion") come from
    ``runs``: their means over the pool's tasks, only when every task of the pool has a fused run."""
    ok = merges[(merges["status"] == "ok") & (merges["algorithm"] != "negation")] if not merges.empty else merges
    rows = []
    for _, m in ok.iterrows():
        delta_params = _params_of(runs, m["run_records"])  # one merged delta serves every task
        rows.append({
            "backbone": m["backbone"], "method": m["method"], "n_tasks": m["n_tasks"],
            "tasks": "+".join(sorted(m["tasks"].split("+"))),  # a pool is a set: merges and fusion runs meet
            "algorithm": m["algorithm"], "space": m["space"], "top1": m["mean_top1"],
            "normalized": 100 * m["mean_normalized"], "individual_top1": m["mean_individual_top1"],
            "chosen": m["chosen"], "delta_params": delta_params, "params": delta_params, "records": [m["path"]],
        })  # fmt: skip
    if runs is not None and not runs.empty:
        fusion = fusion_frame(runs)
        for (backbone, method, tasks), g in fusion.groupby(["backbone", "method", "tasks"], sort=True):
            g = g.sort_values("seed").drop_duplicates("dataset")  # one seed per task: the lowest
            if set(g["dataset"]) != set(tasks.split("+")):
                continue  # a pool with a task not yet fused
            own = _params_of(runs, list(g["individual_path"]))
            fusion_params = float(g["params"].median())
            rows.append({
                "backbone": backbone, "method": method, "tasks": tasks, "n_tasks": len(g), "algorithm": FUSION_LABEL,
                "space": "fusion (trained per task)", "top1": g["top1"].mean(), "normalized": g["normalized"].mean(),
                "individual_top1": g["individual_top1"].mean(),
                "chosen": f"{int(fusion_params):,} fusion parameters per task",
                "delta_params": own, "params": None if own is None else fusion_params + len(g) * own,
                "records": sorted(g["path"]),
            })  # fmt: skip
    cols = ["backbone", "method", "tasks", "n_tasks", "algorithm", "space", "top1", "normalized", "individual_top1",
            "chosen", "delta_params", "params", "records"]  # fmt: skip
    return pd.DataFrame(rows, columns=cols).sort_values(["backbone", "tasks", "method", "algorithm"], ignore_index=True)


def negation_frame(merges: pd.DataFrame) -> pd.DataFrame:
    """Negation records: the drop on the negated task and what is kept on the control task (normalized, %)."""
    neg = merges[(merges["status"] == "ok") & (merges["algorithm"] == "negation")] if not merges.empty else merges
    out = pd.DataFrame({
        "backbone": neg.get("backbone"), "method": neg.get("method"), "tasks": neg.get("tasks"),
        "target_drop": neg.get("target_drop"),
        "control_normalized": 100 * neg.get("control_normalized", pd.Series(dtype=float)),
        "chosen": neg.get("chosen"), "path": neg.get("path"),
    })  # fmt: skip
    return out.sort_values(["backbone", "tasks", "method"], ignore_index=True) if len(out) else out
