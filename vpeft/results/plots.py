"""The leaderboard's trade-off plots: accuracy against trainable parameters or latency overhead, the Pareto
front drawn as a staircase, every point labelled where it covers nothing else; PNG and SVG, byte-stable."""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from vpeft.files import slug
from vpeft.results.frame import NOISE_SPREAD
from vpeft.results.leaderboard import REFERENCE_BACKBONE, REFERENCE_LABEL, Leaderboard, pareto_front


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
            stem = f"{slug(backbone)}_{slug(name)}"
            overlay = pub if name == "vtab1k" and _published_overlay(backbone) else []
            p = [(r["label"], r["params_m"], r["acc"]) for _, r in rows.iterrows() if not pd.isna(r["params_m"])]
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
            f"composition_{slug(backbone)}_{slug(tasks)}",
        ))  # fmt: skip
    return plots


def forgetting_plots(ret: pd.DataFrame, out_dir: Path) -> list[Plot]:
    """Per backbone with at least two runs probed: target-task top-1 against what the features lost elsewhere
    (100 - mean retention, %): the learning-forgetting trade-off, its Pareto front up and to the left."""
    plots = []
    for backbone, g in ret.groupby("backbone", sort=True):
        mean = g.groupby(["method", "dataset"], sort=True)[["target_top1", "retention"]].mean().reset_index()
        points = [(f"{r['method']} ({r['dataset']})", 100 * (1 - r["retention"]), r["target_top1"])
                  for _, r in mean.iterrows()]  # fmt: skip
        if len(points) < 2:
            continue
        plots.append(plot_tradeoff(
            points, "lost on the probe tasks: 100 - mean k-NN retention (%)", "target-task top-1 (%)",
            f"Learning against forgetting: {backbone}", False, out_dir, f"forgetting_{slug(backbone)}",
        ))  # fmt: skip
    return plots
