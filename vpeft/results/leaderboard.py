"""The leaderboard as data: pandas frames computed from the records' frame (``vpeft.results.load_records``).

Definitions, as the rendered pages state them:

- A row is one (backbone, method[, variant]); backbones never share a row. The variant names the
  method-config fields, then the other settings, that differ between runs on the same dataset (e.g.
  ``r=16``, ``optim.lr=0.005``): seeds of different settings are never averaged into one cell. Fields
  that only differ between datasets (VPT's per-task prompt lengths, tuned per-task lrs) do not split a row.
- Only ``protocol=final`` runs with ``status=ok`` rank. ``tune`` runs are ignored; failed and
  interrupted runs are listed apart and never averaged. A rerun of one seed replaces it (the latest wins).
- A cell is the mean of top-1 (last epoch) over seeds, with the sample standard deviation
  (ddof=1; none for one seed) and the number of seeds n.
- VTAB-1k: a group mean is the mean of the group's task means; "mean of 19 tasks" is the plain
  mean of the 19 task means; "mean of group means" is the mean of the three group means. A mean
  is shown only when every task it needs is there; otherwise the table says what is missing.
- PPT (performance-parameter trade-off, Zhao et al., "SCT", 2023):
  ``PPT = acc * exp(-log10(P / C + 1))`` with acc the VTAB-1k mean of 19 tasks (%), P the trainable
  parameters excluding the head and C = 10^7.
- Costs like for like: a latency joins a row only when it was measured on the row's backbone, method
  config, input size, device and dtype: the runs' own latency, else a bench record with all five equal.
  Otherwise the row says so and gives the command that measures it. Training images/s and peak memory
  come from the runs themselves.
- Noise: a latency ratio is noisy when p90/median of the method's or the bare backbone's timings exceeds
  ``NOISE_SPREAD`` (1.5); it is within the noise when |ratio - 1| <= spread - 1 (see ``latency_frame``).
- Under-tuned (‡): a cell whose chosen value of a grid key sits at the edge of what its tune stage tried, where
  the recipe's own grid (``sweep.grid`` in the records' config) has values beyond that edge that were not
  tried: a wider search could move it, so the number is the search's, not the method's (see ``search_edges``).
- The Pareto front (maximise accuracy, minimise cost): the points no other point beats on one axis
  without losing on the other; equal points are all on the front.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterable, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vpeft.results.frame import NOISE_SPREAD, bench_frame, latency_frame, noise_flags, records_frame
from vpeft.vtab import GROUPS, TASKS

PPT_C = 1e7
REFERENCE_FILE = "vtab1k_vitb16_in21k_published.csv"
REFERENCE_LABEL = "published (not measured here)"
REFERENCE_BACKBONE = "ViT-B/16, ImageNet-21k"
GROUP_NAMES = tuple(GROUPS)
KEY = ["backbone", "method", "variant"]
PER_METHOD_MEMORY = ("cuda_max_allocated", "cpu_peak_rss_isolated")
__all__ = ["NOISE_SPREAD", "Leaderboard", "build_leaderboard", "load_reference", "methods_table"]


# -- pure building blocks --------------------------------------------------------------------------


def ppt_score(accuracy: Any, params: Any, c: float = PPT_C) -> Any:
    """SCT's performance-parameter trade-off, elementwise: ``accuracy * exp(-log10(params / c + 1))``."""
    p = np.asarray(params, dtype=float)
    if np.any(p < 0):
        raise ValueError(f"params must be >= 0, got {params}")
    return accuracy * np.exp(-np.log10(p / c + 1))


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """For each (cost, accuracy): True when no other point has cost <= and accuracy >= with one strict.

    Points with a missing coordinate are never on the front.
    """
    flags = []
    for i, (x, y) in enumerate(points):
        if x is None or y is None:
            flags.append(False)
            continue
        dominated = any(
            j != i and qx is not None and qy is not None and qx <= x and qy >= y and (qx < x or qy > y)
            for j, (qx, qy) in enumerate(points)
        )
        flags.append(not dominated)
    return flags


def vtab_means(task_means: pd.DataFrame) -> pd.DataFrame:
    """Per row of per-task means: the three group means, the mean of 19 tasks and the mean of group means
    (NaN unless every task they need is there), the number of tasks present and the missing ones."""
    wide = task_means.reindex(columns=list(TASKS)).astype(float)
    out = pd.DataFrame({g: wide[list(ts)].mean(axis=1, skipna=False) for g, ts in GROUPS.items()}, index=wide.index)
    out["mean19"] = wide.mean(axis=1, skipna=False)
    out["mean_of_groups"] = out[list(GROUP_NAMES)].mean(axis=1, skipna=False)
    out["vtab_tasks"] = wide.notna().sum(axis=1)
    missing = wide.isna()
    out["vtab_missing"] = [tuple(t for t in TASKS if missing.at[i, t]) for i in wide.index]
    for g, ts in GROUPS.items():
        out[f"{g}_tasks"] = wide[list(ts)].notna().sum(axis=1)
    return out


# -- the leaderboard -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Leaderboard:
    """``cells``: one row per (backbone, method, variant, dataset) with mean, std, n, values, mixed.
    ``rows``: one row per (backbone, method, variant): label, VTAB-1k means, parameters, costs, PPT and
    provenance (recipe, commits, dates, devices, the records). ``failures``: runs that did not finish."""

    cells: pd.DataFrame
    rows: pd.DataFrame
    failures: pd.DataFrame
    tune_ignored: int
    n_records: int
    warnings: tuple[str, ...]

    @property
    def backbones(self) -> list[str]:
        return sorted(set(self.rows["backbone"]) | set(self.failures["backbone"]))

    def task_means(self) -> pd.DataFrame:
        """Rows x datasets of mean top-1 (NaN where a row has no run)."""
        return self.cells.pivot(index=KEY, columns="dataset", values="mean")

    def cell(self, row: pd.Series | dict, dataset: str) -> pd.Series | None:
        c = self.cells
        hit = c[(c["backbone"] == row["backbone"]) & (c["method"] == row["method"])]
        hit = hit[(hit["variant"] == row["variant"]) & (hit["dataset"] == dataset)]
        return None if hit.empty else hit.iloc[0]

    def vtab_rows(self, backbone: str) -> pd.DataFrame:
        """Rows with any VTAB-1k task: complete ones by mean of 19 tasks (best first), then the rest."""
        r = self.rows[(self.rows["backbone"] == backbone) & (self.rows["vtab_tasks"] > 0)]
        return r.assign(_c=r["mean19"].isna(), _m=-r["mean19"].fillna(0), _t=-r["vtab_tasks"]).sort_values(
            ["_c", "_m", "_t", "label"]
        )[r.columns]

    def other_datasets(self, backbone: str) -> list[str]:
        c = self.cells
        return sorted(set(c.loc[(c["backbone"] == backbone) & ~c["dataset"].isin(TASKS), "dataset"]))

    def other_datasets_all(self) -> list[str]:
        return sorted(set(self.cells["dataset"]) - set(TASKS))

    def other_rows(self, backbone: str) -> pd.DataFrame:
        c = self.cells
        keys = c.loc[(c["backbone"] == backbone) & ~c["dataset"].isin(TASKS), KEY].drop_duplicates()
        return self.rows.merge(keys, on=KEY).sort_values("label")


def _number(v: Any) -> float | None:
    ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    return float(v) if ok and np.isfinite(v) else None


def search_edge(chosen: Any, tried: Iterable[Any], grid: Iterable[Any]) -> str | None:
    """Why ``chosen`` may be under-tuned: it is the largest (smallest) value ``tried`` while ``grid`` (the recipe's)
    has larger (smaller) values that were not tried. None when the search reached past it, or values are not numbers.
    """
    c, t, g = _number(chosen), [_number(v) for v in tried], [_number(v) for v in grid]
    if c is None or None in t or None in g or c not in t:
        return None
    untried = sorted({v for v in g if v not in t})
    above = [v for v in untried if v > c] if c == max(t) else []
    below = [v for v in untried if v < c] if c == min(t) else []
    if not above and not below:
        return None
    beyond = " and ".join(
        f"{', '.join(_g(v) for v in vs)} {side}" for vs, side in ((below, "below"), (above, "above")) if vs
    )
    how = "the only value tried" if len(set(t)) == 1 else "the " + ("largest" if above else "smallest") + " tried"
    return f"{_g(chosen)} is {how} ({len(set(t))} of the recipe's {len(set(g))}; untried: {beyond})"


def search_edges(ok_runs: pd.DataFrame, ranked: pd.DataFrame) -> pd.DataFrame:
    """Per (backbone, method, variant, dataset) of the ranked final runs: ``under_tuned``, the grid keys whose chosen
    value sits at the edge of a truncated search (``search_edge``), '' where none does or no tune runs are there.

    The tune runs of a cell are the ``ok`` ones with its backbone, method, dataset and recipe; the recipe's grid is
    the final records' ``config.sweep.grid``; the chosen values are the final runs' own config values."""
    out = ranked[KEY + ["dataset"]].drop_duplicates().assign(under_tuned="")
    grid_cols = [c for c in ranked.columns if c.startswith("config.sweep.grid.")]
    tune = ok_runs[ok_runs["protocol"] == "tune"]
    if not grid_cols or tune.empty:
        return out
    recipe = "config.recipe" if "config.recipe" in ranked.columns else None
    reasons = []
    for _, cell in out.iterrows():
        finals = ranked[
            (ranked["backbone"] == cell["backbone"]) & (ranked["method"] == cell["method"])
            & (ranked["variant"] == cell["variant"]) & (ranked["dataset"] == cell["dataset"])
        ]  # fmt: skip
        first = finals.iloc[0]
        mine = tune[
            (tune["backbone"] == cell["backbone"]) & (tune["method"] == cell["method"])
            & (tune["dataset_label"] == cell["dataset"])
        ]  # fmt: skip
        if recipe is not None:
            mine = mine[mine[recipe].astype(object).eq(first[recipe]) | (mine[recipe].isna() & pd.isna(first[recipe]))]
        why = []
        for col in grid_cols:
            key = col.removeprefix("config.sweep.grid.")
            grid, value_col = first[col], f"config.{key}"
            if not isinstance(grid, list) or value_col not in mine.columns or mine.empty:
                continue
            for chosen in sorted({v for v in finals[value_col] if _number(v) is not None}):
                edge = search_edge(chosen, mine[value_col].dropna(), grid)
                if edge:
                    why.append(f"{key}={edge}")
        reasons.append("; ".join(why))
    return out.assign(under_tuned=reasons)


def _as_frame(records: Any, make) -> pd.DataFrame:
    if isinstance(records, pd.DataFrame):
        return records
    return make(list(records))


def _uniq(values: Iterable[Any], fmt=str) -> str:
    """The distinct non-null values, formatted and sorted, joined: what a recipe cell shows."""
    seen = {fmt(v) for v in values if v is not None and not (isinstance(v, float) and np.isnan(v)) and v is not pd.NA}
    return ", ".join(sorted(seen))


def _g(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float, np.integer, np.floating)) else str(v)


def _first_line(error: Any) -> str:
    return str(error).strip().splitlines()[0][:160] if isinstance(error, str) and error.strip() else ""


def build_leaderboard(
    runs: pd.DataFrame | Iterable[dict[str, Any]],
    bench: pd.DataFrame | Iterable[dict[str, Any]] | None = None,
    bench_dir: str | Path | None = None,
) -> Leaderboard:
    """The leaderboard of a frame of run records (``load_records``); a frame of bench records
    (``load_bench_records``) supplies latency where the runs have none and the settings match.
    Lists of record dicts work too. ``bench_dir`` goes into the commands that measure missing costs."""
    runs = _as_frame(runs, records_frame)
    bench = _as_frame(bench if bench is not None else [], bench_frame)
    notes = list(runs.attrs.get("warnings", []))
    runs = runs.copy()
    for col in ("config.optim._target_", "overrides", "finished_at", "cost.latency.results"):
        if col not in runs.columns:
            runs[col] = None
    runs["finished_at"] = pd.to_datetime(runs["finished_at"], utc=True)
    ok = runs["status"] == "ok"
    failures = runs.loc[~ok, KEY + ["dataset_label", "protocol", "seed", "status", "error", "path"]].copy()
    failures["error"] = failures["error"].map(_first_line)
    failures = failures.rename(columns={"dataset_label": "dataset"}).sort_values(
        ["backbone", "method", "dataset", "protocol", "seed", "status", "error"]
    )
    tune = int((ok & (runs["protocol"] == "tune")).sum())

    ranked = runs[ok & (runs["protocol"] == "final")].sort_values(
        ["finished_at", "path", "config_hash"], na_position="first"
    )
    ident = KEY + ["dataset_label", "seed"]
    dup = ranked.duplicated(ident, keep="last")
    for _, r in ranked[dup].drop_duplicates(ident).iterrows():
        label = r["method"] + (f" ({r['variant']})" if r["variant"] else "")
        notes.append(
            f"{r['backbone']} / {label} / {r['dataset_label']}: seed {r['seed']} has more than one final record; "
            "the latest is used"
        )
    ranked = ranked[~dup].assign(dataset=lambda d: d["dataset_label"])

    cells = (
        ranked.sort_values("seed")
        .groupby(KEY + ["dataset"], sort=True)
        .agg(
            mean=("metrics.top1", "mean"),
            std=("metrics.top1", "std"),
            n=("metrics.top1", "size"),
            values=("metrics.top1", tuple),
            settings=("settings", "nunique"),
        )
        .reset_index()
    )
    cells["mixed"] = cells.pop("settings") > 1
    cells = cells.merge(search_edges(runs[ok], ranked), on=KEY + ["dataset"], how="left")
    cells["under_tuned"] = cells["under_tuned"].fillna("")
    for _, c in cells[cells["mixed"]].iterrows():
        label = c["method"] + (f" ({c['variant']})" if c["variant"] else "")
        notes.append(
            f"{c['backbone']} / {label} / {c['dataset']}: the seeds were run with different settings (marked *)"
        )

    rows = _rows(ranked, cells, bench, bench_dir, notes)
    rows["records_rel"], rows["lat_record_rel"] = rows["records"], rows["lat_record"].fillna("")  # links as found
    failures = failures.reset_index(drop=True).assign(path_rel=lambda f: f["path"].fillna(""))
    return Leaderboard(cells, rows, failures, tune, len(runs), tuple(sorted(set(notes))))


def _rows(ranked: pd.DataFrame, cells: pd.DataFrame, bench: pd.DataFrame, bench_dir, notes: list[str]) -> pd.DataFrame:
    """One row per (backbone, method, variant): VTAB means, parameters, costs, PPT, provenance."""
    if ranked.empty:
        return pd.DataFrame(columns=[*KEY, "label", "vtab_tasks", "mean19", "records", "lat_record"])
    wide = cells.pivot(index=KEY, columns="dataset", values="mean")
    g = ranked.groupby(KEY, sort=True)
    rows = vtab_means(wide).join(
        g.agg(
            params_m=("params.trainable_excl_head", lambda s: s.astype(float).mean() / 1e6),
            params_min_m=("params.trainable_excl_head", lambda s: s.astype(float).min() / 1e6),
            params_max_m=("params.trainable_excl_head", lambda s: s.astype(float).max() / 1e6),
            train_images_per_s=("cost.train_images_per_s", "mean"),
            peak_mem_mb=("cost.peak_mem_mb", "mean"),
            peak_mem_kind=("cost.peak_mem_kind", _uniq),
            img_size=("img_size", _uniq),
            dtype=("dtype", _uniq),
            epochs=("config.trainer.epochs", _uniq),
            batch=("config.trainer.batch_size", _uniq),
            optimizer=("config.optim._target_", lambda s: _uniq(s, lambda v: str(v).rsplit(".", 1)[-1])),
            lr=("config.optim.lr", lambda s: _uniq(s, _g)),
            weight_decay=("config.optim.weight_decay", lambda s: _uniq(s, _g)),
            tuned_by=("tuned_by", _uniq),
            devices=("env.device_name", _uniq),
            commits=("env.git_sha", lambda s: _uniq(s, lambda v: str(v)[:10])),
            dirty=("env.git_dirty", lambda s: bool(s.fillna(False).any())),
            first_finished=("finished_at", "min"),
            last_finished=("finished_at", "max"),
            n_records=("path", "size"),
            method_config_key=("method_config_key", lambda s: s.mode().iloc[0]),
        )
    )
    rows = rows.reset_index()
    rows["label"] = rows["method"] + rows["variant"].map(lambda v: f" ({v})" if v else "")
    rows["ppt"] = ppt_score(rows["mean19"], rows["params_m"] * 1e6)
    records = ranked.assign(path=ranked["path"].fillna("")).sort_values(["dataset", "seed"]).groupby(KEY)
    rows["records"] = [
        [(f"{r['dataset']} s{r['seed']}", r["path"]) for _, r in records.get_group(tuple(k)).iterrows() if r["path"]]
        for k in rows[KEY].itertuples(index=False)
    ]
    for _, r in rows[rows["devices"].str.contains(", ", regex=False)].iterrows():
        notes.append(f"{r['backbone']} / {r['label']}: runs on different devices ({r['devices']}); costs are averaged")
    run_lat, bench_lat = latency_frame(ranked), latency_frame(bench)
    lat = [_latency(k, ranked, run_lat, bench, bench_lat, bench_dir, notes) for k in rows[KEY].itertuples(index=False)]
    lat = pd.DataFrame(lat, columns=LATENCY_FIELDS)
    lat = lat.astype({"lat_ratio": float, "lat_spread": float, "lat_noisy": "boolean", "lat_within_noise": "boolean"})
    return pd.concat([rows, lat], axis=1)


LATENCY_FIELDS = ("lat_ratio", "lat_spread", "lat_noisy", "lat_within_noise", "lat_source", "lat_at", "lat_record",
                  "lat_missing", "lat_command")  # fmt: skip


def _of(frame: pd.DataFrame, key: tuple) -> pd.Series:
    return (frame["backbone"] == key[0]) & (frame["method"] == key[1]) & (frame["variant"] == key[2])


def _latency(key: tuple, ranked, run_lat, bench, bench_lat, bench_dir, notes: list[str]) -> dict[str, Any]:
    """The like-for-like latency of one row: its runs' own, else the latest bench record with every setting equal
    (backbone, method config, input size, device, dtype); else why not and the command that measures it."""
    out: dict[str, Any] = dict.fromkeys(LATENCY_FIELDS)
    recs = ranked[_of(ranked, key)]
    settings = recs[["img_size", "env.device", "env.device_name", "dtype"]].astype(object).drop_duplicates()
    if settings.isna().any(axis=None):
        return out | {"lat_missing": "input size, device or dtype not recorded"}
    if len(settings) > 1:
        label = f"{key[0]} / {key[1]}{f' ({key[2]})' if key[2] else ''}"
        notes.append(f"{label}: runs at different input sizes, devices or dtypes; no latency is shown")
        return out | {"lat_missing": "runs differ in input size, device or dtype"}
    size, device, name, dtype = settings.iloc[0]
    where = f"{dtype}, {size} px, {name} ({device})"
    own = run_lat[_of(run_lat, key) & run_lat["headline"] & (run_lat["dtype"] == dtype)]
    if not own.empty:
        own = own[own["batch"] == own["batch"].min()]
        ratio, spread = float(own["ratio"].median()), float(own["spread"].max())
        noisy, within = noise_flags(ratio, spread)
        at = f"{own['which'].iloc[0]}, batch {own['batch'].iloc[0]}, {where}; median over {len(own)} runs"
        return out | {"lat_ratio": ratio, "lat_spread": spread, "lat_noisy": noisy, "lat_within_noise": within,
                      "lat_source": "run records", "lat_at": at}  # fmt: skip
    config = recs["method_config_key"].mode().iloc[0]
    cand = bench_lat[(bench_lat["backbone"] == key[0]) & (bench_lat["method"] == key[1])]
    same = (cand["method_config_key"] == config) & (cand["img_size"] == size) & (cand["dtype"] == dtype)
    cand = cand[(same & (cand["device"] == device) & (cand["device_name"] == name) & cand["headline"]).fillna(False)]
    if not cand.empty:  # the latest record that matches, at its smallest batch
        created = bench["created_at"].reset_index(drop=True)
        cand = cand.assign(_t=cand["record"].map(created)).sort_values(["_t", "record"], na_position="first")
        best = cand[cand["record"] == cand["record"].iloc[-1]]
        best = best[best["batch"] == best["batch"].min()].iloc[0]
        return out | {
            "lat_ratio": float(best["ratio"]),
            "lat_spread": float(best["spread"]),
            "lat_noisy": bool(best["noisy"]),
            "lat_within_noise": bool(best["within_noise"]),
            "lat_source": "bench record",
            "lat_at": f"{best['which']}, batch {best['batch']}, {where}",
            "lat_record": best["path"],
        }
    return out | {
        "lat_missing": f"not measured at {size} px",
        "lat_command": bench_command(recs.iloc[-1], size, device, bench_dir),
    }


def _hydra_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, list):
        return "[" + ",".join(_hydra_value(x) for x in v) + "]"
    return str(v)


def _method_defaults(method: str) -> dict[str, Any]:
    """The method's config file in the repository's conf/ (empty when vpeft runs from an installed package)."""
    path = Path(__file__).resolve().parents[2] / "conf" / "method" / f"{method}.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(OmegaConf.load(path), resolve=False))


def bench_command(record: pd.Series, size: Any, device: Any, bench_dir: str | Path | None = None) -> str:
    """``python run.py method=<m> backbone=<b> backbone.img_size=<s> bench.only=true`` for a run's settings:
    its backbone overrides, the method-config fields that differ from the method's defaults, its device."""
    config = json.loads(record["method_config_key"])
    defaults = _method_defaults(record["method"])
    parts = ["python run.py", f"method={record['method']}"]
    parts += [f"method.{k}={_hydra_value(v)}" for k, v in sorted(config.items()) if defaults.get(k, object()) != v]
    overrides = record["overrides"] if isinstance(record["overrides"], list) else []
    for o in overrides:
        name = o.split("=", 1)[0].lstrip("+~")
        if (name == "backbone" or name.startswith("backbone.")) and name != "backbone.img_size":
            parts.append(o)
    parts += [f"backbone.img_size={size}", "bench.only=true"]
    if device == "cpu":
        parts.append("device=cpu")
    if bench_dir is not None:
        parts.append(f"paths.bench={bench_dir}")
    return " ".join(parts)


# -- the published reference block -----------------------------------------------------------------


# what every published row says besides its numbers (vpeft/results/reference/README.md)
REFERENCE_FIELDS = ("source", "family", "variant", "data_copy", "epoch_selection", "average")
EPOCH_SELECTIONS = ("last epoch", "best test epoch", "not checked")
AVERAGES = ("mean of group means", "mean of 19 tasks", "none stated", "not checked")


def load_reference() -> pd.DataFrame:
    """The published ViT-B/16 (IN-21k) VTAB-1k numbers shipped with vpeft, one row per (method, source),
    with the same VTAB means and PPT as our rows (computed by the same code from the per-task numbers),
    and each row's source, data copy, variant, epoch selection and stated average as the file gives them."""
    text = files("vpeft.results").joinpath("reference", REFERENCE_FILE).read_text()
    ref = pd.read_csv(io.StringIO(text))
    missing = [c for c in REFERENCE_FIELDS if c not in ref.columns or ref[c].isna().any()]
    if missing or ref["method"].duplicated().any():
        raise ValueError(f"{REFERENCE_FILE}: every row needs a unique method and {', '.join(REFERENCE_FIELDS)}")
    ref = ref.join(vtab_means(ref[list(TASKS)]))
    ref["params_m"] = ref["params_M_excl_head"].astype(float)
    ref["ppt"] = ppt_score(ref["mean19"], ref["params_m"] * 1e6)
    return ref


# -- the methods table from bench records ----------------------------------------------------------


def methods_table(bench: pd.DataFrame | Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per bench record, relative costs against linear probing on the same device, backbone and
    input size; memory ratios only where both peaks are per method (GPU allocator, or an isolated CPU process)."""
    b = _as_frame(bench, bench_frame)
    if b.empty:  # an empty bench folder: the columns of a filled one, no rows
        empty = {c: pd.Series(dtype=float) for c in ("params_pct", "delta_mib", "train_rel", "mem_rel")}
        return b.assign(device_label=pd.Series(dtype="string"), label=pd.Series(dtype="string"), **empty)
    b = b.copy()
    b["device_label"] = b["env.device_name"] + " (" + b["env.device"] + ")"
    b["params_pct"] = 100.0 * b["params.trainable_excl_head"].astype(float) / b["params.backbone_total"].astype(float)
    b["delta_mib"] = b["params.delta_bytes"].astype(float) / 2**20
    group = ["device_label", "backbone", "img_size"]
    linear = b[b["method"] == "linear"].drop_duplicates(group, keep="last").set_index(group)
    cols = ["training.images_per_s", "training.peak_mem_mb", "training.peak_mem_kind"]
    ref = b[group + cols].merge(linear[cols], left_on=group, right_index=True, how="left", suffixes=("", "_linear"))
    b["train_rel"] = ref["training.images_per_s"] / ref["training.images_per_s_linear"]
    same_kind = (ref["training.peak_mem_kind"] == ref["training.peak_mem_kind_linear"]).fillna(False)
    per_method = ref["training.peak_mem_kind"].isin(PER_METHOD_MEMORY).fillna(False)
    b["mem_rel"] = (ref["training.peak_mem_mb"] / ref["training.peak_mem_mb_linear"]).where(same_kind & per_method)
    b["label"] = b["method"] + b["variant"].map(lambda v: f" ({v})" if v else "")
    return b.sort_values([*group, "method", "variant"]).reset_index(drop=True)
