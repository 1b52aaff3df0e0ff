"""The leaderboard on disk: Markdown, CSV, LaTeX, one self-contained HTML page, and trade-off plots.

Tables are pandas frames of display text written by pandas' own writers (``to_csv``, ``to_markdown``,
``Styler.to_latex``, ``Styler.to_html``); the pages around them are Jinja2 templates shipped with the
package (``vpeft/results/templates``). Every output is a function of the records and the folders named
(no clock, sorted everywhere), so the same records give byte-identical files.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import html
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
from markupsafe import Markup
from pandas.io.formats.style import Styler

from vpeft.errors import DataError
from vpeft.files import slug
from vpeft.results.composition import composition_frame, load_merge_records, negation_frame
from vpeft.results.forgetting import (
    load_retention_records,
    load_sequential_records,
    retention_frame,
    row_retention,
    sequential_frame,
)
from vpeft.results.frame import NOISE_SPREAD, _value_text, latency_frame, load_bench_records, load_records
from vpeft.results.leaderboard import (
    GROUP_NAMES,
    KEY,
    PPT_C,
    REFERENCE_BACKBONE,
    REFERENCE_LABEL,
    Leaderboard,
    build_leaderboard,
    load_reference,
    methods_table,
)
from vpeft.results.plots import Plot, composition_plots, forgetting_plots, make_plots
from vpeft.vtab import GROUPS, TASKS

EMPTY = "–"
SHORT = {
    "oxford_flowers102": "flowers102",
    "oxford_iiit_pet": "pets",
    "patch_camelyon": "camelyon",
    "diabetic_retinopathy": "retinopathy",
}


# -- a table for every format ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Table:
    """A table ready for every format: its anchor, title, cells (a frame of text; a column of lists of
    (label, path) is a column of links), the notes printed under it and tooltips (same shape, or None)."""

    key: str
    title: str
    frame: pd.DataFrame
    notes: list[str] = dataclasses.field(default_factory=list)
    tips: pd.DataFrame | None = None

    @property
    def link_columns(self) -> list[str]:
        return [c for c in self.frame.columns if self.frame[c].map(lambda v: isinstance(v, list)).any()]

    def text_columns(self) -> list[bool]:
        """Columns that hold words (left-aligned): any cell that is not a number (with a unit, a mark or a remark
        in brackets) or a dash."""
        number = re.compile(rf"^({EMPTY}.*|≈?-?\d[\d.]*(e[-+]?\d+)?[%×†]?( .*)?)?$")
        return [
            i == 0 or self.frame[c].map(lambda v: isinstance(v, list) or not number.match(str(v))).any()
            for i, c in enumerate(self.frame.columns)
        ]


def _na(v: Any) -> bool:
    return v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v))


def _text(value: Any) -> str:
    """A text field as text: '' for a missing one (pandas' string columns hold NaN there, never 'nan')."""
    return "" if _na(value) else str(value)


def fmt(value: Any, spec: str) -> str:
    """``format(value, spec)`` with the one rounding every number on the page gets: the decimal value (12
    significant digits, which drops the float noise of a sum: a top-1 of 791/2000 is 39.55, a mean of
    (78.2, 92.0, 75.6, 72.9) is 79.675) rounded half to even (39.6, 79.68), never the binary double's
    39.5499... (39.5). Specs ``.Nf`` and ``.Ng`` round so; any other formats as given."""
    m = re.fullmatch(r"(.*)\.(\d+)([fg])", spec)
    d = Decimal(f"{float(value):.12g}")
    if m is None or not d.is_finite() or (m[3] == "g" and d == 0):
        return format(value, spec)
    exp = -int(m[2]) if m[3] == "f" else d.adjusted() - max(int(m[2]), 1) + 1
    return format(float(d.quantize(Decimal(1).scaleb(exp), rounding=ROUND_HALF_EVEN)), spec)


def _num(v: Any, spec: str, suffix: str = "") -> str:
    return EMPTY if _na(v) else fmt(v, spec) + suffix


def _params(p: Any, lo: Any = None, hi: Any = None) -> tuple[str, str]:
    if _na(p):
        return EMPTY, ""
    spec = ".2g" if p < 0.01 else ".3f" if p < 1 else ".2f" if p < 10 else ".1f"
    text = "0" if p == 0 else fmt(p, spec)
    if not _na(lo) and not _na(hi) and hi > lo:
        return text + "†", f"mean over tasks; {fmt(lo, '.3g')} to {fmt(hi, '.3g')} M"
    return text, ""


def _cell(c: pd.Series | None) -> tuple[str, str]:
    """'mean ± std (n)' of one (row, dataset), and the seeds' values as its tooltip."""
    if c is None:
        return EMPTY, ""
    mean = fmt(c["mean"], ".1f")
    text = f"{mean} ± {fmt(c['std'], '.1f')} ({c['n']})" if c["n"] > 1 else f"{mean} ({c['n']})"
    tip = "seeds: " + ", ".join(fmt(v, ".2f") for v in c["values"])
    if c["mixed"]:
        text, tip = text + " *", tip + " (settings differ between seeds)"
    if c.get("under_tuned"):
        text, tip = text + " ‡", tip + "; under-tuned: " + c["under_tuned"]
    return text, tip


UNDER_TUNED = ("‡ under-tuned: the chosen value of a grid key is the edge of what the tune stage tried, and the "
               "recipe's grid goes past it untried; a wider search may move the number.")  # fmt: skip


def under_tuned_notes(lb: Leaderboard, rows: pd.DataFrame, datasets: Sequence[str]) -> list[str]:
    """Why each ‡ cell of a table is under-tuned: one line per row and reason, naming its datasets."""
    c = lb.cells.merge(rows[KEY], on=KEY)
    c = c[c["dataset"].isin(datasets) & (c["under_tuned"] != "")]
    if c.empty:
        return []
    lines = [f"{UNDER_TUNED} {c[KEY].drop_duplicates().shape[0]} of {len(rows)} rows:"]
    label = c["method"] + c["variant"].map(lambda v: f" ({v})" if v else "")
    for (who, why), d in c.assign(label=label).groupby(["label", "under_tuned"], sort=True)["dataset"]:
        lines.append(f"{who} ({', '.join(sorted(d))}): {why}.")
    return lines


def _agg(value: Any, present: int, total: int, missing: Sequence[str] = ()) -> tuple[str, str]:
    if not _na(value):
        return fmt(value, ".2f"), ""
    if present == 0:
        return EMPTY, ""
    return f"{EMPTY} ({present}/{total})", "missing: " + ", ".join(missing)


def latency_text(ratio: Any, spread: Any, noisy: Any, within: Any) -> str:
    """'1.03× (1.04)': the ratio to the bare backbone and p90/median; ≈ within the noise, 'noisy' past the limit."""
    if _na(ratio):
        return EMPTY
    return f"{'≈' if within else ''}{fmt(ratio, '.2f')}× ({fmt(spread, '.2f')}){' noisy' if noisy else ''}"


def _memory(value: Any, kind: Any) -> tuple[str, str]:
    if _na(value):
        return EMPTY, ""
    if kind == "cpu_peak_rss":
        return f"{fmt(value, '.0f')} (process)", "the run process's peak RSS since it started: not per method"
    return fmt(value, ".0f"), _text(kind)


def _table(key: str, title: str, cells: list[dict[str, tuple[str, str] | str | list]], notes=()) -> Table:
    """A Table from rows of {header: text | (text, tooltip) | links}."""
    text = [{h: v[0] if isinstance(v, tuple) else v for h, v in r.items()} for r in cells]
    tips = [{h: v[1] if isinstance(v, tuple) else "" for h, v in r.items()} for r in cells]
    frame = pd.DataFrame(text, dtype=object)
    return Table(key, title, frame, notes=list(notes), tips=pd.DataFrame(tips, dtype=object) if cells else None)


# -- the tables ------------------------------------------------------------------------------------

COST_HEADERS = ("params (M)", "latency overhead (p90/median)", "train img/s", "peak mem (MB)")


def _costs(r: pd.Series) -> dict[str, Any]:
    if not _na(r["lat_ratio"]):
        record = _text(r["lat_record_rel"])
        where = f"{_text(r['lat_at'])}; from {_text(r['lat_source'])}" + (f" {record}" if record else "")
        latency = (latency_text(r["lat_ratio"], r["lat_spread"], r["lat_noisy"], r["lat_within_noise"]), where)
    else:
        command = _text(r["lat_command"])
        latency = (_text(r["lat_missing"]) or EMPTY, f"measure it: {command}" if command else "")
    return {
        COST_HEADERS[0]: _params(r["params_m"], r["params_min_m"], r["params_max_m"]),
        COST_HEADERS[1]: latency,
        COST_HEADERS[2]: _num(r["train_images_per_s"], ".0f"),
        COST_HEADERS[3]: _memory(r["peak_mem_mb"], r["peak_mem_kind"]),
        **(
            {
                "retention (%)": (_num(100 * r["retention"], ".1f"), f"mean of {r['retention_n']:.0f} probed runs")
                if not _na(r["retention"])
                else (EMPTY, "")
            }
            if "retention" in r.index
            else {}
        ),  # fmt: skip
    }


def measure_commands(lb: Leaderboard, backbone: str) -> list[tuple[str, str]]:
    """(row label, command) for every row of ``backbone`` whose latency was not measured at its settings:
    each command once, however many tables show the row."""
    rows = lb.rows[lb.rows["backbone"] == backbone]
    return sorted({(r["label"], _text(r["lat_command"])) for _, r in rows.iterrows() if _text(r["lat_command"])})


def _measure_note(rows: pd.DataFrame) -> list[str]:
    """Where a table's unmeasured latencies are explained (the commands are listed once, below the tables)."""
    n = sum(bool(_text(c)) for c in rows["lat_command"])
    if not n:
        return []
    return [f"Latency not measured at these settings for {n} of {len(rows)} rows: 'Latency to measure' below gives "
            "the command for each."]  # fmt: skip


def coverage_notes(rows: pd.DataFrame) -> list[str]:
    """Which VTAB-1k tasks the rows have, compactly: rows with the same tasks share a line, and a task that no
    row has is named once, not once per row."""
    have = {r["label"]: tuple(t for t in TASKS if t not in r["vtab_missing"]) for _, r in rows.iterrows()}
    if all(len(h) == len(TASKS) for h in have.values()):
        return []
    nowhere = [t for t in TASKS if not any(t in h for h in have.values())]
    groups: dict[tuple[str, ...], list[str]] = {}
    for label, h in have.items():
        groups.setdefault(h, []).append(label)
    notes = []
    for h, labels in sorted(groups.items(), key=lambda g: (-len(g[0]), sorted(g[1]))):
        who = f"every method ({len(labels)})" if len(groups) == 1 and len(labels) > 1 else ", ".join(sorted(labels))
        own = [t for t in TASKS if t not in h and t not in nowhere]
        detail = f", missing {', '.join(own)}" if own else f" ({', '.join(h)})" if 0 < len(h) <= 6 else ""
        notes.append(f"{who}: {len(h)} of {len(TASKS)} VTAB-1k tasks{detail}.")
    if nowhere:
        notes.append(f"No method has run {', '.join(nowhere)} ({len(nowhere)} tasks; no column here): a mean is "
                     "shown only where all its tasks are there.")  # fmt: skip
    return notes


def vtab_summary_table(lb: Leaderboard, backbone: str) -> Table:
    rows = lb.vtab_rows(backbone)
    cells, rank = [], 0
    for _, r in rows.iterrows():
        complete = not _na(r["mean19"])
        rank += complete
        groups = {g: _agg(r[g], r[f"{g}_tasks"], len(GROUPS[g]), [t for t in GROUPS[g] if t in r["vtab_missing"]])
                  for g in GROUP_NAMES}  # fmt: skip
        present_groups = sum(not _na(r[g]) for g in GROUP_NAMES)
        cells.append(
            {
                "rank": str(rank) if complete else EMPTY,
                "method": r["label"],
                **groups,
                "mean (19 tasks)": _agg(r["mean19"], r["vtab_tasks"], len(TASKS), r["vtab_missing"]),
                "mean of group means": _agg(r["mean_of_groups"], present_groups if r["vtab_tasks"] else 0, len(GROUPS)),
                **_costs(r),
                "PPT": _num(r["ppt"], ".2f"),
            }
        )
    return _table(f"vtab-summary-{slug(backbone)}", f"VTAB-1k summary: {backbone}", cells, _measure_note(rows))


def vtab_tasks_table(lb: Leaderboard, backbone: str) -> Table:
    """Rows x the VTAB-1k tasks any row has run (a task no row has is named once in the notes, not as a column
    of dashes)."""
    rows = lb.vtab_rows(backbone)
    tasks = [t for t in TASKS if any(t not in missing for missing in rows["vtab_missing"])]
    cells = [
        {"method": r["label"], **{SHORT.get(t, t): _cell(lb.cell(r, t)) for t in tasks}} for _, r in rows.iterrows()
    ]
    title = f"VTAB-1k per task, top-1 (%) mean ± std (n seeds): {backbone}"
    notes = coverage_notes(rows) + under_tuned_notes(lb, rows, tasks)
    return _table(f"vtab-tasks-{slug(backbone)}", title, cells, notes)


def other_table(lb: Leaderboard, backbone: str) -> Table:
    datasets = lb.other_datasets(backbone)
    rows = lb.other_rows(backbone)
    cells = [
        {"method": r["label"], **{d: _cell(lb.cell(r, d)) for d in datasets}, **_costs(r)} for _, r in rows.iterrows()
    ]
    title = f"Other datasets, top-1 (%) mean ± std (n seeds): {backbone}"
    return _table(f"other-{slug(backbone)}", title, cells, _measure_note(rows) + under_tuned_notes(lb, rows, datasets))


def _dates(first: Any, last: Any) -> str:
    if _na(first):
        return EMPTY
    a, b = first.strftime("%Y-%m-%d"), last.strftime("%Y-%m-%d")
    return a if a == b else f"{a} to {b}"


def _config_text(key: str) -> str:
    import json

    return ", ".join(f"{k}={_value_text(v)}" for k, v in sorted(json.loads(key).items())) or EMPTY


def provenance_table(lb: Leaderboard, backbone: str) -> Table:
    """What produced each row: the recipe (input size, dtype, epochs, batch, optimizer, the chosen lr and
    weight decay, the method config), the code (commits, uncommitted changes), when and where, the records."""
    rows = lb.rows[lb.rows["backbone"] == backbone].sort_values("label")
    cells = [
        {
            "method": r["label"],
            "input (px)": r["img_size"],
            "dtype": r["dtype"],
            "epochs": r["epochs"],
            "batch": r["batch"],
            "optimizer": r["optimizer"] or EMPTY,
            "lr": r["lr"] or EMPTY,
            "weight decay": r["weight_decay"] or EMPTY,
            "tuned by": r["tuned_by"] or EMPTY,
            "method config": _config_text(r["method_config_key"]),
            "device": r["devices"],
            "commit": (r["commits"] or "unknown") + (" (uncommitted changes)" if r["dirty"] else ""),
            "finished": _dates(r["first_finished"], r["last_finished"]),
            "records": r["records_rel"],
        }
        for _, r in rows.iterrows()
    ]
    note = (
        "lr and weight decay: the values the final runs used (chosen by the tune stage where hparams= was given). "
        "tuned by: grid = every grid point trained the whole schedule; halving = successive halving stopped some "
        "points at a rung (scripts/vtab1k.py --tune halving; the hyperparameter file counts them); "
        f"{EMPTY} = values given directly."
    )
    return _table(f"provenance-{slug(backbone)}", f"Recipe and provenance: {backbone}", cells, [note])


def failures_table(lb: Leaderboard) -> Table:
    cells = [
        {
            **{k: str(f[k]) for k in ("backbone", "method", "dataset", "protocol", "seed", "status", "error")},
            "record": [("record", f["path_rel"])] if f["path_rel"] else EMPTY,
        }
        for _, f in lb.failures.iterrows()
    ]
    return _table("failed", "Runs that did not finish (never averaged)", cells)


def _stated(r: pd.Series) -> str:
    """The source's own overall average and which one it is, e.g. ``75.6 (mean of group means)``."""
    value, kind = r.get("stated_average"), _text(r.get("average"))
    if value is None or _na(value):
        return kind if kind in ("none stated", "not checked") else ""
    return f"{float(value):g} ({kind})" if kind else f"{float(value):g}"


def reference_tables(ref: pd.DataFrame) -> list[Table]:
    summary = [
        {
            "method": r["method"],
            **{g: _num(r[g], ".2f") for g in GROUP_NAMES},
            "mean (19 tasks)": _num(r["mean19"], ".2f"),
            "mean of group means": _num(r["mean_of_groups"], ".2f"),
            "params (M)": _params(r["params_m"]),
            "PPT": _num(r["ppt"], ".2f"),
            "stated average": _stated(r),
            "data copy": _text(r.get("data_copy")),
            "epoch": _text(r.get("epoch_selection")),
            "variant": _text(r.get("variant")),
            "source": r["source"],
        }
        for _, r in ref.iterrows()
    ]
    tasks = [{"method": r["method"], **{SHORT.get(t, t): _num(r[t], ".1f") for t in TASKS}} for _, r in ref.iterrows()]
    note = (
        "Numbers as their sources print them (per-task top-1, %); the means are computed from them by the same "
        "code as the rows above; 'stated average' is the one the source prints (and which average it is), "
        "'epoch' says whether a row is the last epoch or the best test accuracy over epochs (selected on the "
        "test set), 'data copy' which copy of VTAB-1k it was measured on (TFDS or NOAH's JPEGs: the copy alone "
        "moves CIFAR-100 by about 10 points). Recipes differ between papers: compare with care. Rows that could not "
        "be checked at a primary source (Adapter+, RepAdapter's paper, DoRA, prefix tuning, IA3) have none "
        "(vpeft/results/reference/README.md)."
    )
    return [
        _table("published-summary", f"{REFERENCE_LABEL}: VTAB-1k, {REFERENCE_BACKBONE}", summary, [note]),
        _table("published-tasks", f"{REFERENCE_LABEL}: VTAB-1k per task, {REFERENCE_BACKBONE}", tasks),
    ]


def _latency_columns(lat: pd.DataFrame) -> list[tuple[str, int]]:
    """(dtype, batch) settings of a methods table: fp32 first, the smallest and the largest batch."""
    dtypes = sorted(set(lat["dtype"]), key=lambda d: (d != "fp32", d))
    batches = sorted(set(lat["batch"]))
    return [(d, b) for d in dtypes for b in (sorted({batches[0], batches[-1]}) if batches else [])]


def methods_tables(methods: pd.DataFrame, out_dir: Path | None = None) -> list[Table]:
    """One table per (device, backbone, input size): relative costs of every benchmarked method."""
    lat = latency_frame(methods)  # methods_table numbers its rows 0..n-1: ``record`` is the row
    tables = []
    for (device, backbone, size), rows in methods.groupby(["device_label", "backbone", "img_size"], sort=True):
        mine = lat[lat["record"].isin(rows.index)]
        settings = _latency_columns(mine)
        cells = []
        for i, m in rows.iterrows():
            cell: dict[str, Any] = {
                "method": m["label"],
                "trainable (% of backbone)": _num(m["params_pct"], ".3g", "%"),
                "delta (MiB)": _num(m["delta_mib"], ".2f"),
            }
            for d, b in settings:
                for which in ("unmerged", "merged"):
                    hit = mine[(mine["record"] == i) & (mine["dtype"] == d) & (mine["batch"] == b)]
                    hit = hit[hit["which"] == which]
                    h = hit.iloc[0] if not hit.empty else None
                    text = EMPTY if h is None else latency_text(h["ratio"], h["spread"], h["noisy"], h["within_noise"])
                    ms = "" if h is None else f"{fmt(h['median_ms'], '.1f')} ms, bare {fmt(h['bare_median_ms'], '.1f')}"
                    tip = f"median {ms} ms" if ms else ""
                    cell[f"{d} b{b} {which}"] = (text, tip)
            mem_tip = (
                ""
                if _na(m["training.base_mem_mb"])
                else f"the process held {fmt(m['training.base_mem_mb'], '.0f')} MB before the model"
            )
            cell |= {
                "train img/s": _num(m["training.images_per_s"], ".2f"),
                "vs linear": _num(m["train_rel"], ".2f", "×"),
                "peak mem (MB)": (_num(m["training.peak_mem_mb"], ".0f"), mem_tip),
                "mem vs linear": _num(m["mem_rel"], ".2f", "×"),
                "mergeable": "yes" if m["mergeable"] else "no",
                "record": [("json", _rel(m["path"], out_dir))],
            }
            cells.append(cell)
        tables.append(
            _table(
                f"methods-{slug(device)}-{slug(backbone)}-{size}",
                f"Methods compared on {device}: {backbone} at {size} px",
                cells,
                _methods_notes(rows),
            )
        )
    return tables


def _methods_notes(rows: pd.DataFrame) -> list[str]:
    """What the table measured and how, and where its records come from (commits, dates, versions)."""
    kinds = sorted(set(rows["training.peak_mem_kind"].dropna()))
    base = rows["training.base_mem_mb"].dropna()
    memory = {
        "cpu_peak_rss_isolated": "peak resident set of a fresh process that loaded only the method's model and "
        "trained it (one process per method)"
        + (
            f"; such a process holds {fmt(base.min(), '.0f')} to {fmt(base.max(), '.0f')} MB before the model"
            if len(base)
            else ""
        ),
        "cuda_max_allocated": "CUDA allocator peak, reset before each method",
        "cpu_peak_rss": "the benchmarking process's peak RSS since it started: it only grows over a sweep, so it "
        "does not compare methods (no ratio is shown)",
    }
    commits = sorted({f"{str(s)[:10]}{' (uncommitted changes)' if d else ''}" for s, d in
                      zip(rows["env.git_sha"].fillna("unknown"), rows["env.git_dirty"].fillna(False))})  # fmt: skip
    created = rows["created_at"].dropna()
    cfg = rows.iloc[0]
    notes = [
        "Latency: per-call median of the method over the bare backbone's median, timed in turns in the same process "
        f"(1.00× = no cost); in brackets p90/median, the larger of the two; ≈: within that spread; noisy: "
        f"p90/median > {NOISE_SPREAD}. {cfg.get('latency.warmup', '?')} warm-up and {cfg.get('latency.iters', '?')} "
        f"timed calls per variant, {cfg.get('latency.threads', '?')} threads.",
        f"Training: AdamW on the trainable parameters, batch {cfg.get('training.batch_size')}, "
        f"{cfg.get('training.steps')} timed steps ({cfg.get('training.dtype')}); 'vs linear': relative to linear "
        "probing in the same table.",
        "Peak memory: " + ("; ".join(memory.get(k, k) for k in kinds) or "not measured") + ".",
        f"Made from {len(rows)} bench records, commit {', '.join(commits)}, "
        + (f"{created.min():%Y-%m-%d} to {created.max():%Y-%m-%d}" if len(created) else "dates unknown")
        + f", torch {cfg.get('env.torch')}, timm {cfg.get('env.timm')}.",
    ]
    return notes


# -- composition (merge records and AdapterFusion runs) --------------------------------------------

COMPOSITION_NOTES = [
    "A cell: mean over the pool's tasks of the merged model's top-1 (each task evaluated with its own head), and "
    "in brackets the mean normalized accuracy, merged / the task's own delta (%). 'own deltas': the mean top-1 of "
    "each task's delta alone. Coefficients chosen on each task's val200 split with the tune runs' deltas, never "
    "on test.",
    "Weight space: the change a delta makes to the backbone's weights, merged into one backbone. Delta space: the "
    "delta's own tensors (prompts, adapter weights) as changes from the method's identity (1 for IA3 and SSF "
    "scales, 0 otherwise), merged and added back to it: a different operation. AdapterFusion: trained on "
    "each task over the pool's frozen adapters (a run per task).",
    "params (M): one task's delta. In the plot, what one task's composed model trained beyond the backbone and "
    "its head: the delta's for a merge, the fusion layers plus the pool's adapters for AdapterFusion.",
]


def composition_tables(comp: pd.DataFrame, neg: pd.DataFrame, out_dir: Path | None = None) -> list[Table]:
    """Per (backbone, task pool): method x algorithm, beside the methods' own accuracy and parameters; then
    the negation records (forgetting)."""
    tables = []
    for (backbone, tasks), g in comp.groupby(["backbone", "tasks"], sort=True):
        algorithms = sorted(set(g["algorithm"]), key=lambda a: (a == "AdapterFusion", a))
        cells = []
        for method, rows in g.groupby("method", sort=True):
            first = rows.iloc[0]
            cell: dict[str, Any] = {
                "method": method,
                "params (M)": _params(None if _na(first["delta_params"]) else first["delta_params"] / 1e6),
                "own deltas": _num(first["individual_top1"], ".1f"),
            }
            for a in algorithms:
                hit = rows[rows["algorithm"] == a]
                if hit.empty:
                    cell[a] = (EMPTY, "")
                    continue
                h = hit.iloc[0]
                tip = f"{h['space']}; {h['chosen']}" if h["chosen"] else h["space"]
                if a == "AdapterFusion" and not _na(h["params"]):
                    tip += f"; {fmt(h['params'] / 1e6, '.3g')} M parameters trained per task with the pool's adapters"
                space = " (delta space)" if h["space"] == "delta" else ""
                cell[a] = (f"{fmt(h['top1'], '.1f')} ({fmt(h['normalized'], '.0f')}%){space}", tip)
            cell["records"] = [
                (f"{r['algorithm']}", _rel(p, out_dir)) for _, r in rows.iterrows() for p in r["records"][:1]
            ]
            cells.append(cell)
        title = f"Composition on {backbone}: {tasks.replace('+', ', ')}"
        tables.append(_table(f"composition-{slug(backbone)}-{slug(tasks)}", title, cells, COMPOSITION_NOTES))
    if len(neg):
        cells = [
            {
                "method": r["method"],
                "tasks (negated, control)": r["tasks"].replace("+", ", "),
                "drop on the negated task (points)": _num(r["target_drop"], ".1f"),
                "control kept (%)": _num(r["control_normalized"], ".0f"),
                "chosen": r["chosen"],
                "record": [("json", _rel(r["path"], out_dir))],
            }
            for _, r in neg.iterrows()
        ]
        tables.append(_table("negation", "Negation: forgetting one task, keeping another", cells,
                             ["Task arithmetic's forgetting protocol: the negated task's vector subtracted, lambda "
                              "chosen on val200 so the control task keeps at least 95% of its own "
                              "accuracy."]))  # fmt: skip
    return tables


# -- forgetting (retention and sequential records) ------------------------------------------------

RETENTION_NOTES = [
    "Retention: k-NN top-1 (DINO's weighted k-NN, k=20, cosine, T=0.07; fit on each probe task's train800val200, "
    "scored on its test split) of the adapted model's pre-logit features over the bare backbone's; 100% keeps all "
    "of it. Mean over the probe tasks, never the run's own task. Target top-1: the run's own test top-1.",
]
SEQUENTIAL_NOTES = [
    "Sequential: task A's run continued on task B with the same trainable set and a fresh head (A's kept aside), "
    "then A tested again with its own head. Forgetting = A before - A after (points). A separate delta per task "
    "forgets nothing by construction (drop 0; both deltas stored); merging them is the composition section's.",
]


def forgetting_tables(ret: pd.DataFrame, seq: pd.DataFrame, out_dir: Path | None = None) -> list[Table]:
    """Per backbone: each probed run's target top-1 beside its retention (mean, then per probe task); then the
    sequential runs: A before and after B, the drop, B continued and B alone."""
    tables = []
    for backbone, g in ret.groupby("backbone", sort=True):
        probes = sorted({t for d in g["per_task"] for t in d})
        cells = [
            {
                "method": r["method"], "task": r["dataset"], "seed": str(r["seed"]),
                "target top-1": _num(r["target_top1"], ".1f"), "retention (%)": _num(100 * r["retention"], ".1f"),
                **{p: _num(100 * r["per_task"][p], ".1f") if p in r["per_task"] else EMPTY for p in probes},
                "record": [("json", _rel(r["path"], out_dir))] if r["path"] else EMPTY,
            }
            for _, r in g.iterrows()
        ]  # fmt: skip
        tables.append(_table(f"retention-{slug(backbone)}", f"Retention on other tasks: {backbone}", cells,
                             RETENTION_NOTES))  # fmt: skip
    for backbone, g in seq.groupby("backbone", sort=True):
        cells = [
            {
                "method": r["method"], "A -> B": f"{r['first']} -> {r['second']}", "seed": str(r["seed"]),
                "A before": _num(r["a_before"], ".1f"), "A after B": _num(r["a_after"], ".1f"),
                "forgetting (points)": _num(r["forgetting"], ".1f"), "B (continued)": _num(r["b_top1"], ".1f"),
                "B (own delta)": _num(r["b_alone_top1"], ".1f"),
                "record": [("json", _rel(r["path"], out_dir))] if r["path"] else EMPTY,
            }
            for _, r in g.iterrows()
        ]  # fmt: skip
        tables.append(_table(f"sequential-{slug(backbone)}", f"Sequential fine-tuning: {backbone}", cells,
                             SEQUENTIAL_NOTES))  # fmt: skip
    return tables


# -- writers (pandas does the tables) --------------------------------------------------------------


def _rel(path: Any, out_dir: Path | None) -> str:
    if _na(path) or not path:
        return ""
    return Path(os.path.relpath(path, out_dir)).as_posix() if out_dir is not None else str(path)


def _with_links(t: Table, render: Callable[[list], str]) -> pd.DataFrame:
    df = t.frame.copy()
    for c in t.link_columns:
        df[c] = df[c].map(lambda v: render(v) if isinstance(v, list) else v)
    return df.fillna(EMPTY)


def markdown_body(t: Table) -> str:
    """The table as a Markdown pipe table (pandas' ``to_markdown``): links as ``[label](path)``, text columns left."""
    df = _with_links(t, lambda links: " ".join(f"[{label}]({path})" for label, path in links))
    df = df.map(lambda v: str(v).replace("|", "\\|"))
    align = ["left" if text else "right" for text in t.text_columns()]
    return df.to_markdown(index=False, colalign=align, disable_numparse=True)


_TEX_UNICODE = {"±": r"$\pm$", "×": r"$\times$", "≈": r"$\approx$", "–": "--", "†": r"$^\dagger$"}
_TEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {"\\": r"\textbackslash{}", "~": r"\textasciitilde{}", "^": r"\^{}"}


def _tex(text: str) -> str:
    """Plain text (a caption) as LaTeX: special characters escaped, then the few symbols the tables use."""
    text = re.sub(r"[\\&%$#_{}~^]", lambda m: _TEX_SPECIAL[m.group()], text)
    for k, v in _TEX_UNICODE.items():
        text = text.replace(k, v)
    return text


def table_latex(t: Table) -> str:
    if t.frame.empty:
        return ""
    df = _with_links(t, lambda links: f"{len(links)}")
    styler = df.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    cols = "".join("l" if text else "r" for text in t.text_columns())
    tex = styler.to_latex(
        caption=_tex(t.title), label=f"tab:{t.key}", hrules=True, column_format=cols, position_float="centering"
    )
    for k, v in _TEX_UNICODE.items():
        tex = tex.replace(k, v)
    # wide tables shrink to the line width
    tex = tex.replace("\\begin{tabular}", "\\resizebox{\\linewidth}{!}{%\n\\begin{tabular}").replace(
        "\\end{tabular}", "\\end{tabular}}"
    )
    return tex


def _links_html(links: list[tuple[str, str]]) -> str:
    anchors = " ".join(f'<a href="{html.escape(p)}">{html.escape(label)}</a>' for label, p in links)
    if len(links) <= 2:
        return anchors
    return f"<details><summary>{len(links)} records</summary>{anchors}</details>"


def html_body(t: Table) -> Markup:
    """The table as HTML (pandas' ``Styler``): sortable, tooltips as title attributes, text columns left."""
    df = t.frame.fillna(EMPTY)
    links = t.link_columns
    styler = Styler(df, uuid=t.key).hide(axis="index")
    styler = styler.format(escape="html").format_index(escape="html", axis=1)
    if links:
        styler = styler.format(lambda v: _links_html(v) if isinstance(v, list) else html.escape(str(v)), subset=links)
    if t.tips is not None:
        styler = styler.set_tooltips(t.tips.fillna("").map(lambda s: html.escape(str(s))), as_title_attribute=True)
    left = [c for c, text in zip(df.columns, t.text_columns()) if text]
    left_css = [{"selector": "td", "props": "text-align: left"}, {"selector": "th", "props": "text-align: left"}]
    styler = styler.set_table_styles(dict.fromkeys(left, left_css), overwrite=False)
    return Markup(styler.set_table_attributes('class="sortable"').to_html())


def _code(text: str) -> Markup:
    """Text with `commands in backticks` as <code>, the rest escaped."""
    return Markup(re.sub(r"`([^`]*)`", r"<code>\1</code>", str(html.escape(text))))


def _svg_data(p: Plot) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(p.svg.read_bytes()).decode()


@functools.cache
def _env() -> jinja2.Environment:
    """The page templates shipped with the package; HTML ones escape what they print."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("vpeft.results", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters |= {"markdown_body": markdown_body, "html_body": html_body, "latex": table_latex, "code": _code,
                    "svg_data": _svg_data}  # fmt: skip
    return env


CSV_COLUMNS = [
    *GROUP_NAMES, "mean19", "mean_of_groups", "vtab_tasks", "params_m", "lat_ratio", "lat_spread", "lat_noisy",
    "lat_within_noise", "lat_source", "lat_at", "lat_missing", "lat_command", "train_images_per_s", "peak_mem_mb",
    "peak_mem_kind", "ppt", "img_size", "dtype", "epochs", "batch", "optimizer", "lr", "weight_decay", "devices",
    "commits", "dirty", "first_finished", "last_finished", "n_records",
]  # fmt: skip


def leaderboard_csv(lb: Leaderboard) -> str:
    """One row per (backbone, method[, variant]): each dataset's mean/std/n and why it is under-tuned, then
    ``CSV_COLUMNS`` of the rows frame (VTAB means, parameters in millions, the latency with its spread, flags and
    source, training costs, PPT, the recipe and provenance) and the records' paths (relative to the output folder,
    ';'-separated)."""
    stats = lb.cells.pivot(index=KEY, columns="dataset", values=["mean", "std", "n", "under_tuned"])
    order = [t for t in TASKS if t in lb.cells["dataset"].values] + lb.other_datasets_all()
    stats.columns = [f"{d}_{k}" for k, d in stats.columns]
    stats = stats[[f"{d}_{k}" for d in order for k in ("mean", "std", "n", "under_tuned")]]
    rows = lb.rows.reindex(columns=[*KEY, *CSV_COLUMNS, "records_rel"]).set_index(KEY)  # none ranked: no rows
    out = stats.join(rows[CSV_COLUMNS].assign(records=[";".join(p for _, p in r) for r in rows["records_rel"]]))
    return out.reset_index().to_csv(index=False, float_format="%.4f", lineterminator="\n")


METHODS_CSV_COLUMNS = [
    "device_label", "backbone", "img_size", "method", "variant", "mergeable", "params.trainable_excl_head",
    "params_pct", "params.delta_bytes", "training.images_per_s", "train_rel", "training.peak_mem_mb",
    "training.peak_mem_kind", "training.base_mem_mb", "mem_rel", "env.git_sha", "env.git_dirty", "created_at",
]  # fmt: skip


def methods_csv(methods: pd.DataFrame, out_dir: Path | None = None) -> str:
    """One row per bench record: its columns named as ``load_bench_records`` names them, then every latency
    ratio, spread and noise flag as ``latency_<variant>_<dtype>_b<batch>[_spread|_noisy]``."""
    lat = latency_frame(methods)
    lat["setting"] = "latency_" + lat["which"] + "_" + lat["dtype"] + "_b" + lat["batch"].astype(str)
    wide = lat.pivot(index="record", columns="setting", values=["ratio", "spread", "noisy"])
    wide.columns = [s + {"ratio": "", "spread": "_spread", "noisy": "_noisy"}[k] for k, s in wide.columns]
    out = (
        methods[METHODS_CSV_COLUMNS]
        .join(wide[sorted(wide.columns)])
        .assign(record=[_rel(p, out_dir) for p in methods["path"]])
    )
    return out.to_csv(index=False, float_format="%.4f", lineterminator="\n")


# -- pages -----------------------------------------------------------------------------------------


def definitions() -> list[str]:
    """What the page's words and numbers mean (``templates/definitions.txt.j2``), one paragraph each."""
    text = _env().get_template("definitions.txt.j2").render(noise_spread=NOISE_SPREAD, ppt_c=f"{PPT_C:.0e}")
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


@dataclasses.dataclass(frozen=True)
class Section:
    """A part of the page: the tables a reader looks at first, the plots, the detail tables, and the commands
    that measure what is missing (each once); ``reference`` marks numbers not measured here."""

    title: str
    tables: list[Table]
    plots: list[Plot] = dataclasses.field(default_factory=list)
    details: list[Table] = dataclasses.field(default_factory=list)
    measure: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    reference: bool = False

    @property
    def key(self) -> str:
        return slug(self.title)


@dataclasses.dataclass(frozen=True)
class Page:
    """Everything rendered: the summary line, the sections in order, what the page was made from (records,
    commits, dates, devices, versions), warnings and definitions."""

    intro: list[str]
    sections: list[Section]
    warnings: list[str]
    provenance: list[str] = dataclasses.field(default_factory=list)
    definitions: list[str] = dataclasses.field(default_factory=definitions)


NOTHING_RANKED = (
    "Nothing is ranked yet: no record is a finished protocol=final run (tune runs choose hyperparameters, "
    "final runs are ranked)."
)


def _provenance_lines(lb: Leaderboard, runs: pd.DataFrame, bench: pd.DataFrame | None) -> list[str]:
    """The page's header: what it was made from (records, commits, dates, devices, versions)."""
    ranked = int(lb.cells["n"].sum()) if not lb.cells.empty else 0
    lines = [
        f"{lb.n_records} run records: {ranked} final runs ranked in {len(lb.rows)} rows, {lb.tune_ignored} tune "
        f"runs ignored, {len(lb.failures)} failed or interrupted."
        + (f" {len(bench)} bench records." if bench is not None else "")
    ]
    for what, df, when in (("Runs", runs, "finished_at"), ("Bench records", bench, "created_at")):
        if df is None or df.empty:
            continue
        shas = df["env.git_sha"].fillna("unknown").str.slice(0, 10)
        dirty = df["env.git_dirty"].fillna(False).astype(bool)
        commits = ", ".join(
            f"{s} ({n} records{f', {d} with uncommitted changes' if d else ''})"
            for s, n, d in pd.DataFrame({"s": shas, "d": dirty}).groupby("s")["d"].agg(["size", "sum"]).itertuples()
        )
        dates = df[when].dropna()
        span = f"{dates.min():%Y-%m-%d} to {dates.max():%Y-%m-%d}" if len(dates) else "dates unknown"
        devices = ", ".join(sorted(set(df["env.device_name"].dropna() + " (" + df["env.device"].dropna() + ")")))
        versions = ", ".join(sorted({f"torch {t}, timm {m}" for t, m in zip(df["env.torch"], df["env.timm"])}))
        lines.append(f"{what}: commit {commits}; {span}; {devices}; {versions}.")
    return lines


def build_page(
    lb: Leaderboard,
    plots: list[Plot],
    runs: pd.DataFrame | None = None,
    methods: pd.DataFrame | None = None,
    out_dir: Path | None = None,
    composition: tuple[list[Table], list[Plot]] | None = None,
    forgetting: tuple[list[Table], list[Plot]] | None = None,
) -> Page:
    """The page's sections, summaries first (the composition table first where merges are given); record links
    relative to ``out_dir`` (give the leaderboard ``relative_to`` it)."""
    sections = []
    if composition is not None:  # merges were asked for: their table is what the page is for
        sections.append(Section("Composition (merge records, AdapterFusion runs)", *composition))
    if forgetting is not None:
        sections.append(Section("Forgetting (retention and sequential records)", *forgetting))
    for backbone in lb.backbones:
        summary, details = [], []
        if not lb.vtab_rows(backbone).empty:
            summary += [vtab_summary_table(lb, backbone), vtab_tasks_table(lb, backbone)]
        if not lb.other_rows(backbone).empty:
            summary.append(other_table(lb, backbone))
        if (lb.rows["backbone"] == backbone).any():
            details.append(provenance_table(lb, backbone))
        mine = [p for p in plots if p.stem.startswith(slug(backbone) + "_")]
        if summary or details or mine:
            sections.append(Section(backbone, summary, mine, details, measure_commands(lb, backbone)))
    if methods is not None:
        sections.append(Section("Methods compared (bench records)", methods_tables(methods, out_dir)))
    sections.append(Section("Failed and interrupted runs", [failures_table(lb)]))
    ref_plots = [p for p in plots if p.stem.startswith("published_")]
    sections.append(Section(f"Reference: {REFERENCE_LABEL}", reference_tables(load_reference()), ref_plots,
                            reference=True))  # fmt: skip
    runs = runs if runs is not None else pd.DataFrame(columns=["env.git_sha"])
    first, *provenance = _provenance_lines(lb, runs, methods)
    return Page([first, *([NOTHING_RANKED] if lb.rows.empty else [])], sections, list(lb.warnings), provenance)


def relative_to(lb: Leaderboard, out_dir: Path | None) -> Leaderboard:
    """The leaderboard with its record paths as links from ``out_dir`` (as they are, without one)."""
    rows = lb.rows.assign(
        records_rel=[[(label, _rel(p, out_dir)) for label, p in links] for links in lb.rows.get("records", [])],
        lat_record_rel=[_rel(p, out_dir) for p in lb.rows.get("lat_record", [])],
    )
    failures = lb.failures.assign(path_rel=[_rel(p, out_dir) for p in lb.failures["path"]])
    return dataclasses.replace(lb, rows=rows, failures=failures)


def page_markdown(page: Page) -> str:
    return _env().get_template("leaderboard.md.j2").render(page=page)


def page_latex(page: Page) -> str:
    return _env().get_template("leaderboard.tex.j2").render(page=page)


def page_html(page: Page) -> str:
    return _env().get_template("leaderboard.html.j2").render(page=page)


def methods_markdown(methods: pd.DataFrame, out_dir: Path | None = None) -> str:
    return _env().get_template("methods.md.j2").render(tables=methods_tables(methods, out_dir))


# -- the whole thing -------------------------------------------------------------------------------


def write_leaderboard(
    records_dir: str | Path,
    out_dir: str | Path,
    bench_dir: str | Path | None = None,
    merges_dir: str | Path | None = None,
    retention_dir: str | Path | None = None,
    sequential_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Read run records (and bench and merge records), write every output into ``out_dir``; return their paths."""
    records_dir, out_dir = Path(records_dir), Path(out_dir)
    if not records_dir.is_dir():
        raise DataError(
            f"no records folder at {records_dir}; pass the folder run.py writes records to (paths.results, "
            "default outputs/runs)"
        )
    if bench_dir is not None and not Path(bench_dir).is_dir():
        raise DataError(f"no bench folder at {bench_dir}; pass the folder bench-only runs wrote their records to")
    if merges_dir is not None and not Path(merges_dir).is_dir():
        raise DataError(f"no merges folder at {merges_dir}; pass the folder merge jobs wrote their records to "
                        "(paths.merges, default outputs/merges)")  # fmt: skip
    for what, folder, job in (("retention", retention_dir, "job=retention"), ("sequential", sequential_dir,
                                                                              "job=sequential")):  # fmt: skip
        if folder is not None and not Path(folder).is_dir():
            raise DataError(f"no {what} folder at {folder}; pass the folder {job} wrote its records to "
                            f"(paths.{what}, default outputs/{what})")  # fmt: skip
    runs = load_records(records_dir)
    bench = load_bench_records(bench_dir) if bench_dir is not None else None
    lb = relative_to(build_leaderboard(runs, bench, bench_dir), out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = load_reference()
    plots = make_plots(lb, out_dir, reference)
    methods = methods_table(bench) if bench is not None else None
    composition = comp = None
    if merges_dir is not None:
        merges = load_merge_records(merges_dir)
        comp = composition_frame(merges, runs)
        comp_plots = composition_plots(comp, out_dir)
        plots += comp_plots
        composition = (composition_tables(comp, negation_frame(merges), out_dir), comp_plots)
    forgetting = ret = seq = None
    if retention_dir is not None or sequential_dir is not None:
        ret = load_retention_records(retention_dir) if retention_dir is not None else retention_frame([])
        seq = load_sequential_records(sequential_dir) if sequential_dir is not None else sequential_frame([])
        lb = dataclasses.replace(lb, rows=lb.rows.merge(row_retention(ret, runs), on=KEY, how="left"))
        forget_plots = forgetting_plots(ret, out_dir)
        plots += forget_plots
        forgetting = (forgetting_tables(ret, seq, out_dir), forget_plots)
    page = build_page(lb, plots, runs, methods, out_dir, composition, forgetting)
    files: dict[str, Callable[[], str]] = {
        "leaderboard.md": lambda: page_markdown(page),
        "leaderboard.csv": lambda: leaderboard_csv(lb),
        "leaderboard.tex": lambda: page_latex(page),
        "leaderboard.html": lambda: page_html(page),
    }
    if comp is not None:
        links = [" ".join(_rel(p, out_dir) for p in r) for r in comp["records"]]
        files["composition.csv"] = lambda: comp.assign(records=links).to_csv(index=False, float_format="%.4f")
    if ret is not None:
        files["retention.csv"] = lambda: ret.assign(
            path=[_rel(p, out_dir) for p in ret["path"]],
            per_task=[json.dumps(d, sort_keys=True) for d in ret["per_task"]],
        ).to_csv(index=False, float_format="%.4f", lineterminator="\n")
        files["sequential.csv"] = lambda: seq.assign(path=[_rel(p, out_dir) for p in seq["path"]]).to_csv(
            index=False, float_format="%.4f", lineterminator="\n"
        )
    if methods is not None:
        files["methods.md"] = lambda: methods_markdown(methods, out_dir)
        files["methods.csv"] = lambda: methods_csv(methods, out_dir)
    written = {}
    for name, render in files.items():
        path = out_dir / name
        path.write_text(render(), encoding="utf-8")
        written[name] = path
    for p in plots:
        written[p.png.name] = p.png
        written[p.svg.name] = p.svg
    return written
