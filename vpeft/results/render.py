"""The leaderboard on disk: Markdown, CSV, LaTeX, one self-contained HTML page, and trade-off plots.

Tables are pandas frames of display text written by pandas' own writers (``to_csv``, ``to_markdown``,
``Styler.to_latex``, ``Styler.to_html``); what is written by hand here is what pandas does not do:
the page around the tables, its column sorting, the plots. Every output is a function of the records
and the folders named (no clock, sorted everywhere), so the same records give byte-identical files.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
import os
import re
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from pandas.io.formats.style import Styler

from vpeft.errors import DataError
from vpeft.results.frame import NOISE_SPREAD, latency_frame
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
    pareto_front,
)
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
class Out:
    """One cell built by hand (scripts use it): its text, a sort value (unused: the page sorts by text), a tooltip."""

    text: str
    sort: float | str | None = None
    title: str = ""


@dataclasses.dataclass
class Table:
    """A table ready for every format: its anchor, title, cells (a frame of text; a column of lists of
    (label, path) is a column of links), the notes printed under it and tooltips (same shape, or None).

    ``Table(key, title, headers, rows_of_Out, notes)`` builds one from hand-made cells.
    """

    key: str
    title: str
    frame: pd.DataFrame | list[str]
    rows: list[list[Out]] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    tips: pd.DataFrame | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.frame, pd.DataFrame):
            headers, rows = list(self.frame), self.rows or []
            self.frame = pd.DataFrame([[c.text for c in r] for r in rows], columns=headers, dtype=object)
            self.tips = pd.DataFrame([[c.title for c in r] for r in rows], columns=headers, dtype=object)
        self.rows = None

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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def _na(v: Any) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _num(v: Any, fmt: str, suffix: str = "") -> str:
    return EMPTY if _na(v) else f"{v:{fmt}}{suffix}"


def _params(p: Any, lo: Any = None, hi: Any = None) -> tuple[str, str]:
    if _na(p):
        return EMPTY, ""
    text = "0" if p == 0 else f"{p:.2g}" if p < 0.01 else f"{p:.3f}" if p < 1 else f"{p:.2f}" if p < 10 else f"{p:.1f}"
    if not _na(lo) and not _na(hi) and hi > lo:
        return text + "†", f"mean over tasks; {lo:.3g} to {hi:.3g} M"
    return text, ""


def _cell(c: pd.Series | None) -> tuple[str, str]:
    """'mean ± std (n)' of one (row, dataset), and the seeds' values as its tooltip."""
    if c is None:
        return EMPTY, ""
    text = f"{c['mean']:.1f} ± {c['std']:.1f} ({c['n']})" if c["n"] > 1 else f"{c['mean']:.1f} ({c['n']})"
    tip = "seeds: " + ", ".join(f"{v:.2f}" for v in c["values"])
    return (text + " *", tip + " (settings differ between seeds)") if c["mixed"] else (text, tip)


def _agg(value: Any, present: int, total: int, missing: Sequence[str] = ()) -> tuple[str, str]:
    if not _na(value):
        return f"{value:.2f}", ""
    if present == 0:
        return EMPTY, ""
    return f"{EMPTY} ({present}/{total})", "missing: " + ", ".join(missing)


def latency_text(ratio: Any, spread: Any, noisy: Any, within: Any) -> str:
    """'1.03× (1.04)': the ratio to the bare backbone and p90/median; ≈ within the noise, 'noisy' past the limit."""
    if _na(ratio):
        return EMPTY
    return f"{'≈' if within else ''}{ratio:.2f}× ({spread:.2f}){' noisy' if noisy else ''}"


def _memory(value: Any, kind: Any) -> tuple[str, str]:
    if _na(value):
        return EMPTY, ""
    if kind == "cpu_peak_rss":
        return f"{value:.0f} (process)", "the run process's peak RSS since it started: not per method"
    return f"{value:.0f}", str(kind or "")


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
        where = f"{r['lat_at']}; from {r['lat_source']}" + (f" {r['lat_record_rel']}" if r["lat_record_rel"] else "")
        latency = (latency_text(r["lat_ratio"], r["lat_spread"], r["lat_noisy"], r["lat_within_noise"]), where)
    else:
        latency = (r["lat_missing"] or EMPTY, f"measure it: {r['lat_command']}" if r["lat_command"] else "")
    return {
        COST_HEADERS[0]: _params(r["params_m"], r["params_min_m"], r["params_max_m"]),
        COST_HEADERS[1]: latency,
        COST_HEADERS[2]: _num(r["train_images_per_s"], ".0f"),
        COST_HEADERS[3]: _memory(r["peak_mem_mb"], r["peak_mem_kind"]),
    }


def _measure_notes(rows: pd.DataFrame) -> list[str]:
    cmds = [f"{r['label']}: `{r['lat_command']}`" for _, r in rows.iterrows() if r["lat_command"]]
    if not cmds:
        return []
    return ["Latency not measured at these settings; each command writes the bench record the next build joins:"] + cmds


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
    notes = [f"{r['label']}: missing {', '.join(r['vtab_missing'])}" for _, r in rows.iterrows()
             if r["vtab_missing"] and r["vtab_tasks"]]  # fmt: skip
    return _table(
        f"vtab-summary-{_slug(backbone)}", f"VTAB-1k summary: {backbone}", cells, notes + _measure_notes(rows)
    )


def vtab_tasks_table(lb: Leaderboard, backbone: str) -> Table:
    cells = [
        {"method": r["label"], **{SHORT.get(t, t): _cell(lb.cell(r, t)) for t in TASKS}}
        for _, r in lb.vtab_rows(backbone).iterrows()
    ]
    return _table(
        f"vtab-tasks-{_slug(backbone)}", f"VTAB-1k per task, top-1 (%) mean ± std (n seeds): {backbone}", cells
    )


def other_table(lb: Leaderboard, backbone: str) -> Table:
    datasets = lb.other_datasets(backbone)
    rows = lb.other_rows(backbone)
    cells = [
        {"method": r["label"], **{d: _cell(lb.cell(r, d)) for d in datasets}, **_costs(r)} for _, r in rows.iterrows()
    ]
    title = f"Other datasets, top-1 (%) mean ± std (n seeds): {backbone}"
    return _table(f"other-{_slug(backbone)}", title, cells, _measure_notes(rows))


def _dates(first: Any, last: Any) -> str:
    if _na(first):
        return EMPTY
    a, b = first.strftime("%Y-%m-%d"), last.strftime("%Y-%m-%d")
    return a if a == b else f"{a} to {b}"


def _config_text(key: str) -> str:
    import json

    from vpeft.results.frame import _value_text

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
            "method config": _config_text(r["method_config_key"]),
            "device": r["devices"],
            "commit": (r["commits"] or "unknown") + (" (uncommitted changes)" if r["dirty"] else ""),
            "finished": _dates(r["first_finished"], r["last_finished"]),
            "records": r["records_rel"],
        }
        for _, r in rows.iterrows()
    ]
    note = "lr and weight decay: the values the final runs used (chosen by the tune stage where hparams= was given)."
    return _table(f"provenance-{_slug(backbone)}", f"Recipe and provenance: {backbone}", cells, [note])


def failures_table(lb: Leaderboard) -> Table:
    cells = [
        {
            **{k: str(f[k]) for k in ("backbone", "method", "dataset", "protocol", "seed", "status", "error")},
            "record": [("record", f["path_rel"])] if f["path_rel"] else EMPTY,
        }
        for _, f in lb.failures.iterrows()
    ]
    return _table("failed", "Runs that did not finish (never averaged)", cells)


def _text(value: Any) -> str:
    return "" if _na(value) else str(value)


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
                    tip = "" if h is None else f"median {h['median_ms']:.1f} ms, bare {h['bare_median_ms']:.1f} ms"
                    cell[f"{d} b{b} {which}"] = (text, tip)
            mem_tip = (
                ""
                if _na(m["training.base_mem_mb"])
                else f"the process held {m['training.base_mem_mb']:.0f} MB before the model"
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
                f"methods-{_slug(device)}-{_slug(backbone)}-{size}",
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
        + (f"; such a process holds {base.min():.0f} to {base.max():.0f} MB before the model" if len(base) else ""),
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
    "delta's own tensors (prompts, adapter weights) averaged: a different operation. AdapterFusion: trained on "
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
                    tip += f"; {h['params'] / 1e6:.3g} M parameters trained per task with the pool's adapters"
                space = " (delta space)" if h["space"] == "delta" else ""
                cell[a] = (f"{h['top1']:.1f} ({h['normalized']:.0f}%){space}", tip)
            cell["records"] = [
                (f"{r['algorithm']}", _rel(p, out_dir)) for _, r in rows.iterrows() for p in r["records"][:1]
            ]
            cells.append(cell)
        title = f"Composition on {backbone}: {tasks.replace('+', ', ')}"
        tables.append(_table(f"composition-{_slug(backbone)}-{_slug(tasks)}", title, cells, COMPOSITION_NOTES))
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


def composition_plots(comp: pd.DataFrame, out_dir: Path) -> list[Plot]:
    """Per (backbone, pool) with at least two methods: normalized accuracy of each method's best merge (by the
    mean normalized accuracy over the pool) and of AdapterFusion, against what one task's composed model trained
    (``params``: the delta's for a merge, the fusion layers plus the pool's adapters for AdapterFusion)."""
    plots = []
    for (backbone, tasks), g in comp.groupby(["backbone", "tasks"], sort=True):
        g = g[g["params"].notna()]
        merged = g[g["algorithm"] != "AdapterFusion"].sort_values(["normalized", "algorithm"], ascending=[False, True])
        best = merged.drop_duplicates("method")
        points = [(f"{r['method']} ({r['algorithm']})", r["params"] / 1e6, r["normalized"]) for _, r in best.iterrows()]
        points += [(f"{r['method']} (AdapterFusion)", r["params"] / 1e6, r["normalized"])
                   for _, r in g[g["algorithm"] == "AdapterFusion"].iterrows()]  # fmt: skip
        if len(points) < 2:
            continue
        plots.append(plot_tradeoff(
            sorted(points), PARAMS_X, "normalized accuracy (% of each task's own delta)",
            f"Merged deltas: {backbone}, {tasks.replace('+', ', ')}", True, out_dir,
            f"composition_{_slug(backbone)}_{_slug(tasks)}",
        ))  # fmt: skip
    return plots


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


def table_markdown(t: Table, level: int = 3) -> str:
    head = f"{'#' * level} {t.title}\n\n"
    if t.frame.empty:
        return head + "(none)\n"
    df = _with_links(t, lambda links: " ".join(f"[{label}]({path})" for label, path in links))
    df = df.map(lambda v: str(v).replace("|", "\\|"))
    align = ["left" if text else "right" for text in t.text_columns()]
    md = df.to_markdown(index=False, colalign=align, disable_numparse=True)
    return head + md + "\n\n" + "".join(f"- {n}\n" for n in t.notes) + ("\n" if t.notes else "")


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


def _notes_html(notes: list[str]) -> str:
    """Notes as a list; `text in backticks` (commands) as code."""
    items = [re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(n)) for n in notes]
    return "<ul class='notes'>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>\n" if notes else ""


def table_html(t: Table) -> str:
    head = f'<h3 id="{t.key}">{html.escape(t.title)}</h3>\n'
    if t.frame.empty:
        return head + "<p>(none)</p>\n"
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
    body = styler.set_table_attributes('class="sortable"').to_html()
    return head + f'<div class="scroll">{body}</div>\n' + _notes_html(t.notes)


CSV_COLUMNS = [
    *GROUP_NAMES, "mean19", "mean_of_groups", "vtab_tasks", "params_m", "lat_ratio", "lat_spread", "lat_noisy",
    "lat_within_noise", "lat_source", "lat_at", "lat_missing", "lat_command", "train_images_per_s", "peak_mem_mb",
    "peak_mem_kind", "ppt", "img_size", "dtype", "epochs", "batch", "optimizer", "lr", "weight_decay", "devices",
    "commits", "dirty", "first_finished", "last_finished", "n_records",
]  # fmt: skip


def leaderboard_csv(lb: Leaderboard) -> str:
    """One row per (backbone, method[, variant]): each dataset's mean/std/n, then ``CSV_COLUMNS`` of the rows frame
    (VTAB means, parameters in millions, the latency with its spread, flags and source, training costs, PPT, the
    recipe and provenance) and the records' paths (relative to the output folder, ';'-separated)."""
    stats = lb.cells.pivot(index=KEY, columns="dataset", values=["mean", "std", "n"])
    order = [t for t in TASKS if t in lb.cells["dataset"].values] + lb.other_datasets_all()
    stats.columns = [f"{d}_{k}" for k, d in stats.columns]
    stats = stats[[f"{d}_{k}" for d in order for k in ("mean", "std", "n")]]
    rows = lb.rows.set_index(KEY)
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


# -- plots -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plot:
    stem: str
    title: str
    png: Path
    svg: Path


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _outside(box, frame) -> float:
    inside = _overlap(box, frame)
    return box.width * box.height - inside


def _place_labels(fig, ax, xs: list[float], ys: list[float], labels: list[str]) -> None:
    """Put each label next to its point where it covers no other label or point, with a leader line if far."""
    import numpy as np
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    disp = ax.transData.transform(np.column_stack([xs, ys]))
    r = 6 * fig.dpi / 72
    points = [Bbox.from_extents(px - r, py - r, px + r, py + r) for px, py in disp]
    frame = ax.get_window_extent(renderer)
    base = [(7, 3, "left", "bottom"), (7, -3, "left", "top"), (-7, 3, "right", "bottom"), (-7, -3, "right", "top")]
    base += [
        (0, 9, "center", "bottom"),
        (0, -9, "center", "top"),
        (10, 0, "left", "center"),
        (-10, 0, "right", "center"),
    ]
    candidates = [(dx * k, dy * k, ha, va, k > 1) for k in (1, 2.2, 3.6) for dx, dy, ha, va in base]
    placed: list[Any] = []
    for i in sorted(range(len(xs)), key=lambda i: (-ys[i], xs[i], labels[i])):
        best = None
        for dx, dy, ha, va, far in candidates:
            ann = ax.annotate(
                labels[i],
                (xs[i], ys[i]),
                xytext=(dx, dy),
                textcoords="offset points",
                ha=ha,
                va=va,
                fontsize=8,
                arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6} if far else None,
            )
            box = ann.get_window_extent(renderer).expanded(1.04, 1.15)
            cost = sum(_overlap(box, b) for b in placed)
            cost += sum(_overlap(box, p) for j, p in enumerate(points) if j != i)
            cost += 4 * _outside(box, frame) + (0.5 if far else 0.0)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        placed.append(best[2])


def plot_tradeoff(
    points: list[tuple[str, float, float]],
    xlabel: str,
    ylabel: str,
    title: str,
    log_x: bool,
    out_dir: Path,
    stem: str,
    published: Sequence[tuple[str, float, float]] = (),
    noisy: Sequence[str] = (),
) -> Plot:
    """Accuracy against a cost: the Pareto front (max accuracy, min cost) of the measured points drawn as a
    staircase, each point labelled. ``published`` points (orange diamonds) and ``noisy`` ones (crosses) are
    drawn but never on the front."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter

    everything = list(points) + list(published)
    labels = [p[0] for p in everything]
    xs = [float(p[1]) for p in everything]
    ys = [float(p[2]) for p in everything]
    n = len(points)
    measured = [i for i in range(n) if labels[i] not in noisy]
    front_of = pareto_front([(xs[i], ys[i]) for i in measured])
    front = {i for i, f in zip(measured, front_of) if f}
    zero_at = None
    if log_x:
        positive = [x for x in xs if x > 0]
        if len(positive) < len(xs):  # zero parameters (linear probing) sit at a marked floor
            zero_at = 10 ** (math.floor(math.log10(min(positive))) - 1) if positive else 1e-3
            xs = [x if x > 0 else zero_at for x in xs]
    with matplotlib.rc_context({"svg.hashsalt": "vpeft", "font.size": 10, "svg.fonttype": "path"}):
        fig = Figure(figsize=(7.5, 5.0), dpi=150, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if log_x:
            ax.set_xscale("log")
        order = sorted(front, key=lambda i: (xs[i], ys[i]))
        if len(order) > 1:
            ax.step([xs[i] for i in order], [ys[i] for i in order], where="post", color="C0", lw=1.2, alpha=0.6)
        dom = [i for i in measured if i not in front]
        if order:
            ax.scatter([xs[i] for i in order], [ys[i] for i in order], s=46, color="C0", zorder=3, label="Pareto front")
        if dom:
            ax.scatter(
                [xs[i] for i in dom],
                [ys[i] for i in dom],
                s=40,
                facecolors="white",
                edgecolors="0.45",
                zorder=4,
                label="dominated",
            )  # fmt: skip  (hollow, above the front: a hidden point still shows)
        bad = [i for i in range(n) if i not in measured]
        if bad:
            ax.scatter([xs[i] for i in bad], [ys[i] for i in bad], s=46, marker="x", color="C3", zorder=4,
                       label=f"noisy latency (p90/median > {NOISE_SPREAD})")  # fmt: skip
        if published:
            pub = range(n, len(xs))
            ax.scatter([xs[i] for i in pub], [ys[i] for i in pub], s=44, marker="D", color="C1", alpha=0.8, zorder=2,
                       label=f"{REFERENCE_LABEL}, {REFERENCE_BACKBONE}")  # fmt: skip
        ax.margins(x=0.18, y=0.14)
        if zero_at is not None:
            ax.axvline(zero_at * 1.8, color="0.8", lw=0.8, ls=":")
            lo, hi = ax.get_xlim()
            ticks = [t for t in LogLocator(base=10).tick_values(lo, hi) if zero_at * 3 < t <= hi]
            ax.xaxis.set_major_locator(FixedLocator([zero_at, *ticks]))
            minor = LogLocator(base=10, subs=tuple(range(2, 10))).tick_values(lo, hi)
            ax.xaxis.set_minor_locator(FixedLocator([t for t in minor if zero_at * 3 < t <= hi]))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticklabels(["0"] + [f"{t:g}" for t in ticks])
        ax.grid(True, which="major", color="0.9", lw=0.8)
        ax.set_axisbelow(True)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=11)  # a long pool wraps, never clipped
        ax.legend(loc="lower right", fontsize=8, frameon=False)
        fig.canvas.draw()
        _place_labels(fig, ax, xs, ys, labels)
        out_dir.mkdir(parents=True, exist_ok=True)
        png, svg = out_dir / f"{stem}.png", out_dir / f"{stem}.svg"
        fig.savefig(png, format="png", metadata={"Software": None})
        fig.savefig(svg, format="svg", metadata={"Date": None, "Creator": None})
    return Plot(stem, title, png, svg)


PARAMS_X = "trainable parameters, excluding the head (millions, log scale)"


def _published_overlay(backbone: str) -> bool:
    """Published ViT-B/16 IN-21k numbers sit beside measured VTAB-1k rows of that backbone only."""
    return backbone.startswith("vit_base_patch16_224") and "21k" in backbone


def make_plots(lb: Leaderboard, out_dir: Path, reference: pd.DataFrame | None = None) -> list[Plot]:
    """Per backbone and dataset (VTAB-1k: mean of 19 tasks, complete rows only) with at least two rows:
    accuracy vs parameters and, where at least two rows have a like-for-like latency, vs latency overhead.
    The published numbers get a plot of their own and sit beside measured ViT-B/16 IN-21k VTAB-1k rows."""
    plots = []
    ref = reference if reference is not None else pd.DataFrame(columns=["method", "params_m", "mean19"])
    pub = [(f"{m} (pub.)", p, a) for m, p, a in ref[["method", "params_m", "mean19"]].itertuples(index=False)]
    for backbone in lb.backbones:
        series: list[tuple[str, str, pd.DataFrame]] = []
        vtab = lb.vtab_rows(backbone)
        vtab = vtab[vtab["mean19"].notna()]
        series.append(("vtab1k", "VTAB-1k top-1 (%), mean of 19 tasks", vtab.assign(acc=vtab["mean19"])))
        for d in lb.other_datasets(backbone):
            rows = lb.other_rows(backbone)
            acc = [lb.cell(r, d)["mean"] if lb.cell(r, d) is not None else float("nan") for _, r in rows.iterrows()]
            rows = rows.assign(acc=acc)
            series.append((d, f"{d} top-1 (%)", rows[rows["acc"].notna()]))
        for name, ylabel, rows in series:
            if len(rows) < 2:
                continue  # one point compares with nothing
            stem = f"{_slug(backbone)}_{_slug(name)}"
            overlay = pub if name == "vtab1k" and _published_overlay(backbone) else []
            p = [(r["label"], r["params_m"], r["acc"]) for _, r in rows.iterrows() if not _na(r["params_m"])]
            title = f"{backbone}: {name if name != 'vtab1k' else 'VTAB-1k'}, accuracy vs trainable parameters"
            plots.append(plot_tradeoff(p, PARAMS_X, ylabel, title, True, out_dir, f"{stem}_params", published=overlay))
            lat = rows[rows["lat_ratio"].notna()]
            if len(lat) >= 2:
                ats = sorted({a.split("; median")[0] for a in lat["lat_at"]})
                where = ats[0] if len(ats) == 1 else "settings differ, see the table"
                points = [(r["label"], r["lat_ratio"], r["acc"]) for _, r in lat.iterrows()]
                noisy = [r["label"] for _, r in lat.iterrows() if r["lat_noisy"]]
                title = f"{backbone}: {name if name != 'vtab1k' else 'VTAB-1k'}, accuracy vs latency overhead"
                xlabel = f"inference latency overhead (× bare backbone, median per call)\n{where}"
                plots.append(
                    plot_tradeoff(points, xlabel, ylabel, title, False, out_dir, f"{stem}_latency", noisy=noisy)
                )
    if pub:  # a plot of published rows only: short labels, the re-tuned study's rows marked
        retuned = " [PETL_Vision]"
        short = [
            (m.replace(retuned, "†"), p, a) for m, p, a in ref[["method", "params_m", "mean19"]].itertuples(index=False)
        ]
        title = f"{REFERENCE_LABEL}: VTAB-1k, {REFERENCE_BACKBONE}"
        if any(retuned in m for m in ref["method"]):
            title += "\n† PETL_Vision (Mai et al., 2025): re-tuned, last epoch"
        ylabel = "VTAB-1k top-1 (%), mean of 19 tasks"
        plots.append(
            plot_tradeoff([], PARAMS_X, ylabel, title, True, out_dir, "published_vtab1k_params", published=short)
        )
    return plots


# -- pages -----------------------------------------------------------------------------------------

DEFINITIONS = [
    "Only final runs (train800val200 -> test) with status ok rank; tune runs are ignored; failed and interrupted "
    "runs are listed apart, never averaged. A rerun of a seed replaces it (the latest wins).",
    "Cells: top-1 (%) at the last epoch, mean ± sample standard deviation (ddof=1) over seeds, n seeds in "
    "brackets; one seed shows no std. * marks seeds run with different settings.",
    "VTAB-1k: a group mean averages the group's task means; 'mean (19 tasks)' averages the 19 task means; "
    "'mean of group means' averages the three group means. Papers mix the two conventions; both are shown, "
    "labelled, and only when every task they need is there (else the count of tasks present).",
    "params (M): trainable parameters excluding the classifier head, in millions (mean over tasks, marked †, "
    "when it varies with the task, e.g. VPT's per-task prompt lengths).",
    "Costs like for like: a latency stands beside an accuracy only when it was measured on the same backbone, "
    "method config, input size, device and dtype as the runs: the runs' own measurement, else a bench record "
    "(bench.only=true) with all five equal. Otherwise the cell says 'not measured at <size> px' and the notes "
    "give the command that measures it. Train img/s and peak memory are the runs' own.",
    "latency overhead: median latency per forward call of the method over the bare backbone's, both timed in "
    "turns in one process (synchronised, warm-up, then timed calls), merged where the method allows it, at "
    "batch 1; in brackets p90/median, the larger of the method's and the bare backbone's.",
    f"Noise: 'noisy' when p90/median exceeds {NOISE_SPREAD} (a few slow calls move such a median: the ratio says "
    "nothing; noisy points are crosses in the plots, never on a front); ≈ when |ratio − 1| is within "
    "p90/median − 1 (the difference is smaller than the call-to-call variation).",
    "peak mem: CUDA allocator peak (reset per measurement); on a CPU the peak RSS of a fresh process per method "
    "in bench records, while a run's own number, marked (process), is its process's lifetime peak and not per method.",
    f"PPT (performance-parameter trade-off, as SCT, Zhao et al. 2023, define it): mean of 19 tasks × "
    f"exp(-log10(P / C + 1)), P = trainable parameters excluding the head, C = {PPT_C:.0e}.",
    "Plots: only where at least two rows compare; the Pareto front (maximise accuracy, minimise parameters or "
    "latency overhead) is a staircase, hollow points are dominated, orange diamonds are published numbers "
    "(never on the front). Linear probing (0 trainable parameters besides the head) sits at the axis' '0' tick.",
]


@dataclasses.dataclass(frozen=True)
class Page:
    """Everything rendered: the header lines, the sections in order (title, tables, plots), warnings."""

    intro: list[str]
    sections: list[tuple[str, list[Table], list[Plot]]]
    warnings: list[str]


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
) -> Page:
    """The page's sections; record links relative to ``out_dir`` (give the leaderboard ``relative_to`` it)."""
    sections = []
    for backbone in lb.backbones:
        tables = []
        if not lb.vtab_rows(backbone).empty:
            tables += [vtab_summary_table(lb, backbone), vtab_tasks_table(lb, backbone)]
        if not lb.other_rows(backbone).empty:
            tables.append(other_table(lb, backbone))
        if (lb.rows["backbone"] == backbone).any():
            tables.append(provenance_table(lb, backbone))
        mine = [p for p in plots if p.stem.startswith(_slug(backbone) + "_")]
        if tables or mine:
            sections.append((backbone, tables, mine))
    if methods is not None:
        sections.append(("Methods compared (bench records)", methods_tables(methods, out_dir), []))
    if composition is not None:
        sections.append(("Composition (merge records, AdapterFusion runs)", *composition))
    sections.append(("Failed and interrupted runs", [failures_table(lb)], []))
    ref_plots = [p for p in plots if p.stem.startswith("published_")]
    sections.append((f"Reference: {REFERENCE_LABEL}", reference_tables(load_reference()), ref_plots))
    runs = runs if runs is not None else pd.DataFrame(columns=["env.git_sha"])
    intro = _provenance_lines(lb, runs, methods)
    return Page(intro, sections, list(lb.warnings))


def relative_to(lb: Leaderboard, out_dir: Path | None) -> Leaderboard:
    """The leaderboard with its record paths as links from ``out_dir`` (as they are, without one)."""
    rows = lb.rows.assign(
        records_rel=[[(label, _rel(p, out_dir)) for label, p in links] for links in lb.rows.get("records", [])],
        lat_record_rel=[_rel(p, out_dir) for p in lb.rows.get("lat_record", [])],
    )
    failures = lb.failures.assign(path_rel=[_rel(p, out_dir) for p in lb.failures["path"]])
    return dataclasses.replace(lb, rows=rows, failures=failures)


def page_markdown(page: Page) -> str:
    out = ["# vpeft leaderboard", "", *page.intro, ""]
    for title, tables, plots in page.sections:
        out += [f"## {title}", ""]
        out += [table_markdown(t) for t in tables]
        out += [f"![{p.title}]({p.png.name})" for p in plots]
        if plots:
            out.append("")
    if page.warnings:
        out += ["## Warnings", "", *[f"- {w}" for w in page.warnings], ""]
    out += ["## Definitions", "", *[f"- {d}" for d in DEFINITIONS], ""]
    return "\n".join(out)


def page_latex(page: Page) -> str:
    out = ["% vpeft leaderboard tables; needs \\usepackage{booktabs} and \\usepackage{graphicx}"]
    out += [f"% {line}" for line in page.intro] + [""]
    for title, tables, _ in page.sections:
        out.append(f"% --- {title}")
        out += [table_latex(t) for t in tables if not t.frame.empty]
    return "\n".join(out)


_CSS = " ".join(
    [
        "body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1500px;color:#222;padding:0 16px}",
        "h1{font-size:24px} h2{font-size:19px;margin-top:34px;border-bottom:1px solid #ddd;padding-bottom:4px}",
        "h3{font-size:15px} .scroll{overflow-x:auto;max-width:100%}",
        "table{border-collapse:collapse;font-size:12px;margin:6px 0}",
        "th,td{padding:3px 7px;border-bottom:1px solid #e6e6e6;text-align:right}",
        "td{white-space:nowrap} th{white-space:normal;min-width:3.5em;max-width:10em;vertical-align:bottom}",
        "th{background:#f4f6f8;cursor:pointer;user-select:none;position:sticky;top:0}",
        'th.asc::after{content:" \\25B2"} th.desc::after{content:" \\25BC"} tbody tr:hover{background:#fafbe6}',
        "details{display:inline} summary{cursor:pointer;color:#1a5fb4} td a{margin-right:4px}",
        ".notes{font-size:12px;color:#555} .notes code{font-size:11px;background:#f4f4f4;padding:1px 3px}",
        ".plots{display:flex;flex-wrap:wrap;gap:12px} .plots img{width:640px;max-width:100%;border:1px solid #eee}",
        ".ref{background:#fbf7ee;border:1px solid #e8dcc0;padding:4px 14px;margin-top:30px} .warn{color:#8a4b00}",
        ".intro{font-size:13px;color:#333}",
    ]
)

# Sorting by a cell's text: a leading number (after ≈) sorts as a number, a dash or nothing last, words as words.
_JS = """
function sortKey(cell){
  if (!cell) return null;
  var t = cell.textContent.trim();
  if (t === '' || t.charAt(0) === '\\u2013') return null;
  var m = t.match(/^\\u2248?(-?\\d[\\d.]*(?:e[-+]?\\d+)?)[%\\u00d7\\u2020]?(?: .*)?$/i);
  return m ? parseFloat(m[1]) : t.toLowerCase();
}
document.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('thead th').forEach(function(th, col){
    th.title = 'click to sort';
    th.addEventListener('click', function(){
      var asc = !th.classList.contains('asc');
      table.querySelectorAll('thead th').forEach(function(h){h.classList.remove('asc','desc');});
      th.classList.add(asc ? 'asc' : 'desc');
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function(a, b){
        var x = sortKey(a.cells[col]), y = sortKey(b.cells[col]);
        if (x === null) return y === null ? 0 : 1;
        if (y === null) return -1;
        var c = (typeof x === 'number' && typeof y === 'number') ? x - y
              : (typeof x === 'number') ? -1 : (typeof y === 'number') ? 1 : x.localeCompare(y);
        return asc ? c : -c;
      });
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
});
// a link can carry a sort: page.html#sort=<table id>:<column>[:desc]
(function(){
  var m = location.hash.match(/^#sort=([A-Za-z0-9_-]+):(\\d+)(:desc)?$/);
  var table = m && document.getElementById(m[1]);
  var th = table && table.querySelectorAll('thead th')[parseInt(m[2], 10)];
  if (th) { th.click(); if (m[3]) th.click(); }
})();
"""


def page_html(page: Page) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>vpeft leaderboard</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>vpeft leaderboard</h1>",
        "<div class='intro'>" + "".join(f"<p>{html.escape(line)}</p>" for line in page.intro),
        "<p>Click a column header to sort (again to reverse); hover a cell for where its number comes from.</p></div>",
    ]
    for title, tables, plots in page.sections:
        ref = title.startswith("Reference")
        parts.append('<section class="ref">' if ref else "<section>")
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts += [table_html(t) for t in tables]
        if plots:
            parts.append('<div class="plots">')
            for p in plots:
                data = base64.b64encode(p.svg.read_bytes()).decode()
                parts.append(f'<img alt="{html.escape(p.title)}" src="data:image/svg+xml;base64,{data}">')
            parts.append("</div>")
        parts.append("</section>")
    if page.warnings:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in page.warnings)
        parts.append(f'<h2>Warnings</h2><ul class="warn">{items}</ul>')
    parts.append("<h2>Definitions</h2>" + _notes_html(DEFINITIONS))
    parts.append(f"<script>{_JS}</script></body></html>\n")
    return "\n".join(parts)


def methods_markdown(methods: pd.DataFrame, out_dir: Path | None = None) -> str:
    tables = methods_tables(methods, out_dir)
    body = [table_markdown(t, level=2) for t in tables] if tables else ["(no bench records)", ""]
    return "\n".join(["# vpeft methods compared", "", *body])


# -- the whole thing -------------------------------------------------------------------------------


def write_leaderboard(
    records_dir: str | Path,
    out_dir: str | Path,
    bench_dir: str | Path | None = None,
    merges_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Read run records (and bench and merge records), write every output into ``out_dir``; return their paths."""
    from vpeft.results.frame import load_bench_records, load_records

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
    runs = load_records(records_dir)
    bench = load_bench_records(bench_dir) if bench_dir is not None else None
    lb = relative_to(build_leaderboard(runs, bench, bench_dir), out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = load_reference()
    plots = make_plots(lb, out_dir, reference)
    methods = methods_table(bench) if bench is not None else None
    composition = comp = None
    if merges_dir is not None:
        from vpeft.results.composition import composition_frame, load_merge_records, negation_frame

        merges = load_merge_records(merges_dir)
        comp = composition_frame(merges, runs)
        comp_plots = composition_plots(comp, out_dir)
        plots += comp_plots
        composition = (composition_tables(comp, negation_frame(merges), out_dir), comp_plots)
    page = build_page(lb, plots, runs, methods, out_dir, composition)
    files: dict[str, Callable[[], str]] = {
        "leaderboard.md": lambda: page_markdown(page),
        "leaderboard.csv": lambda: leaderboard_csv(lb),
        "leaderboard.tex": lambda: page_latex(page),
        "leaderboard.html": lambda: page_html(page),
    }
    if comp is not None:
        links = [" ".join(_rel(p, out_dir) for p in r) for r in comp["records"]]
        files["composition.csv"] = lambda: comp.assign(records=links).to_csv(index=False, float_format="%.4f")
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
