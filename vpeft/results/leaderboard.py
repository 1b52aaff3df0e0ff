"""The leaderboard as data: a pure function of run records (and bench records), no files, no plots.

Definitions, as the rendered pages state them:

- A row is one (backbone, method[, variant]); backbones never share a row. The variant names the
  method-config fields that differ between runs on the same dataset (e.g. ``r=16``); fields that
  only differ between datasets (VPT's per-task prompt lengths) do not split a row.
- Only ``protocol=final`` runs with ``status=ok`` rank. ``tune`` runs are ignored; failed and
  interrupted runs are listed apart and never averaged.
- A cell is the mean of top-1 (last epoch) over seeds, with the sample standard deviation
  (ddof=1; none for one seed) and the number of seeds n.
- VTAB-1k: a group mean is the mean of the group's task means; "mean of 19 tasks" is the plain
  mean of the 19 task means; "mean of group means" is the mean of the three group means. A mean
  is shown only when every task it needs is there; otherwise the table says what is missing.
- PPT (performance-parameter trade-off, Zhao et al., "SCT", 2023):
  ``PPT = acc * exp(-log10(P / C + 1))`` with acc the VTAB-1k mean of 19 tasks (%), P the trainable
  parameters excluding the head and C = 10^7: a method with no parameters keeps its accuracy,
  one with C parameters keeps exp(-log10 2) = 74% of it.
- A dataset is named by its task, or for a task folder (``dataset=folder``/``imagefolder``) by the folder's
  own name; when one such name stands for several folders, each is labelled by the end of its parent path
  (``cifar10 (a)``, ``cifar10 (b)``) and they never share a cell.
- The Pareto front (maximise accuracy, minimise cost): the points no other point beats on one axis
  without losing on the other; equal points are all on the front.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from importlib.resources import files
from pathlib import PurePath
from typing import Any

from vpeft.vtab import GROUPS, TASKS

PPT_C = 1e7
REFERENCE_FILE = "vtab1k_vitb16_in21k_published.csv"
REFERENCE_LABEL = "published (not measured here)"
REFERENCE_BACKBONE = "ViT-B/16, ImageNet-21k"
GROUP_NAMES = tuple(GROUPS)


# -- pure building blocks --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    """Top-1 over seeds: mean, sample std (None for n=1), n, and whether the runs' settings differ."""

    mean: float
    std: float | None
    n: int
    values: tuple[float, ...]
    mixed: bool = False


def aggregate(values: Sequence[float], mixed: bool = False) -> Cell:
    if not values:
        raise ValueError("aggregate needs at least one value")
    vals = tuple(float(v) for v in values)
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return Cell(mean=statistics.fmean(vals), std=std, n=len(vals), values=vals, mixed=mixed)


@dataclasses.dataclass(frozen=True)
class VtabSummary:
    """The VTAB-1k aggregates of per-task means, each None unless all its tasks are present."""

    groups: dict[str, float | None]
    group_missing: dict[str, tuple[str, ...]]
    mean19: float | None
    mean_of_groups: float | None
    missing: tuple[str, ...]
    present: int


def vtab_summary(task_means: dict[str, float]) -> VtabSummary:
    groups: dict[str, float | None] = {}
    group_missing: dict[str, tuple[str, ...]] = {}
    for g, tasks in GROUPS.items():
        missing = tuple(t for t in tasks if t not in task_means)
        group_missing[g] = missing
        groups[g] = None if missing else statistics.fmean(task_means[t] for t in tasks)
    missing = tuple(t for t in TASKS if t not in task_means)
    mean19 = None if missing else statistics.fmean(task_means[t] for t in TASKS)
    complete = [v for v in groups.values() if v is not None]
    mean_groups = statistics.fmean(complete) if len(complete) == len(GROUPS) else None
    return VtabSummary(groups, group_missing, mean19, mean_groups, missing, len(TASKS) - len(missing))


def ppt_score(accuracy: float | None, params: float | None, c: float = PPT_C) -> float | None:
    """SCT's performance-parameter trade-off: ``accuracy * exp(-log10(params / c + 1))``."""
    if accuracy is None or params is None:
        return None
    if params < 0:
        raise ValueError(f"params must be >= 0, got {params}")
    return accuracy * math.exp(-math.log10(params / c + 1))


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


# -- rows from records -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    backbone: str
    method: str
    variant: str
    cells: dict[str, Cell]
    params_m: float | None  # trainable excluding the head, mean over the row's runs, millions
    params_range_m: tuple[float, float] | None
    latency_overhead: float | None
    latency_variant: str | None  # merged | unmerged: merged where the method allows it
    latency_at: str | None  # dtype, batch and device the overhead is for
    latency_source: str | None  # "run" records or a "bench" record
    train_images_per_s: float | None
    peak_mem_mb: float | None
    peak_mem_kind: str | None
    devices: tuple[str, ...]
    vtab: VtabSummary
    ppt: float | None

    @property
    def label(self) -> str:
        return f"{self.method} ({self.variant})" if self.variant else self.method

    @property
    def vtab_tasks(self) -> list[str]:
        return [t for t in TASKS if t in self.cells]

    @property
    def other_datasets(self) -> list[str]:
        return sorted(d for d in self.cells if d not in TASKS)


@dataclasses.dataclass(frozen=True)
class Failure:
    backbone: str
    method: str
    dataset: str
    protocol: str
    seed: int
    status: str
    error: str


@dataclasses.dataclass(frozen=True)
class Leaderboard:
    rows: tuple[Row, ...]
    failures: tuple[Failure, ...]
    tune_ignored: int
    warnings: tuple[str, ...]

    @property
    def backbones(self) -> list[str]:
        return sorted({r.backbone for r in self.rows} | {f.backbone for f in self.failures})

    def vtab_rows(self, backbone: str) -> list[Row]:
        """Rows with any VTAB-1k task: complete ones by mean of 19 tasks (best first), then the rest."""
        rows = [r for r in self.rows if r.backbone == backbone and r.vtab.present]
        return sorted(
            rows,
            key=lambda r: (r.vtab.mean19 is None, -(r.vtab.mean19 or 0.0), -r.vtab.present, r.label),
        )

    def other_rows(self, backbone: str) -> list[Row]:
        return sorted((r for r in self.rows if r.backbone == backbone and r.other_datasets), key=lambda r: r.label)

    def other_datasets(self, backbone: str) -> list[str]:
        return sorted({d for r in self.other_rows(backbone) for d in r.other_datasets})


def _value_text(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(_value_text(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _variants(records: list[dict[str, Any]]) -> list[str]:
    """The variant label of each record: the method-config fields that differ within one dataset."""
    configs: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for r in records:
        configs[(r["backbone"], r["method"], r["dataset"])].add(json.dumps(r["method_config"], sort_keys=True))
    varying: dict[tuple[str, str], set[str]] = defaultdict(set)
    for (backbone, method, _), blobs in configs.items():
        if len(blobs) > 1:
            dicts = [json.loads(b) for b in blobs]
            keys = set().union(*dicts)
            varying[(backbone, method)] |= {k for k in keys if len({json.dumps(d.get(k)) for d in dicts}) > 1}
    out = []
    for r in records:
        keys = sorted(varying.get((r["backbone"], r["method"]), ()))
        out.append(", ".join(f"{k}={_value_text(r['method_config'].get(k))}" for k in keys))
    return out


def _settings(record: dict[str, Any]) -> str:
    """The run's config minus the seed and the keys that never change a result (as the run harness hashes)."""
    from vpeft.run import NOT_HASHED, NOT_HASHED_TRAINER

    config = {k: v for k, v in record.get("config", {}).items() if k not in NOT_HASHED and k != "seed"}
    if isinstance(config.get("trainer"), dict):
        config["trainer"] = {k: v for k, v in config["trainer"].items() if k not in NOT_HASHED_TRAINER}
    return json.dumps(config, sort_keys=True, default=str)


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _latency_at(at: dict[str, Any] | None, device: str | None) -> tuple[str | None, str | None]:
    """(variant, "dtype, batch N, device") of a headline overhead."""
    if not at:
        return None, None
    text = f"{at.get('dtype')}, batch {at.get('batch')}"
    return at.get("variant"), f"{text}, {device}" if device else text


def _bench_latency(
    bench: list[dict[str, Any]], backbone: str, method: str, configs: Counter
) -> tuple[float | None, str | None, str | None]:
    """The headline overhead of a bench record for this row's (most common) config, if one exists."""
    wanted = [json.loads(blob) for blob, _ in sorted(configs.items(), key=lambda kv: (-kv[1], kv[0]))]
    for config in wanted:
        for b in bench:
            if (b["backbone"], b["method"]) == (backbone, method) and b["method_config"] == config:
                lat = b.get("latency")
                if b.get("latency_overhead") is None or not lat:
                    continue
                at = {"variant": lat["headline_variant"], "dtype": lat["dtypes"][0], "batch": lat["batches"][0]}
                return float(b["latency_overhead"]), *_latency_at(at, b["env"].get("device_name"))
    return None, None, None


FOLDER_DATASETS = ("folder", "imagefolder")


def _folder_root(record: dict[str, Any]) -> str | None:
    """The folder a record's dataset name was taken from, when the name is only that folder's own name."""
    ds = record.get("config", {}).get("dataset")
    if not isinstance(ds, dict) or ds.get("name") not in FOLDER_DATASETS or ds.get("id") or not ds.get("root"):
        return None  # a named task (or an explicit id): the name alone identifies the data
    return os.path.normpath(str(ds["root"]))


def _distinguishing_parents(roots: Sequence[str]) -> list[str]:
    """For distinct folders: the shortest tails of their parent paths that tell them apart."""
    parents = [PurePath(r).parent.parts for r in roots]
    for k in range(1, max(len(p) for p in parents) + 1):
        tails = [p[-k:] for p in parents]
        if len(set(tails)) == len(tails):
            return [str(PurePath(*t)) if t else "." for t in tails]
    return list(roots)  # same parents (names of links, say): the whole path


def dataset_labels(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Each record's dataset label and a warning per name that stands for several folders.

    Two task folders with one name (``/a/cifar10`` and ``/b/cifar10``) hold different data: averaging their
    runs would mix them, so each gets its name plus the distinguishing end of its parent path.
    """
    roots = [_folder_root(r) for r in records]
    keys: dict[str, set[str | None]] = defaultdict(set)
    for r, root in zip(records, roots):
        keys[r["dataset"]].add(root)
    names: dict[tuple[str, str | None], str] = {}
    notes = []
    for name, found in sorted(keys.items()):
        if len(found) == 1:
            names[(name, next(iter(found)))] = name
            continue
        folders = sorted(k for k in found if k is not None)
        labels = [f"{name} ({p})" for p in _distinguishing_parents(folders)]
        names.update({(name, root): label for root, label in zip(folders, labels)})
        if None in found:
            names[(name, None)] = name
            labels.insert(0, name)
        notes.append(
            f"dataset {name} stands for {len(found)} different sources ({', '.join(folders)}); "
            f"shown apart as {', '.join(labels)}"
        )
    return [names[(r["dataset"], root)] for r, root in zip(records, roots)], notes


def build_leaderboard(records: Iterable[dict[str, Any]], bench_records: Iterable[dict[str, Any]] = ()) -> Leaderboard:
    """Rows, failures and warnings from valid run records; bench records fill missing latency."""
    records = list(records)
    bench = sorted(bench_records, key=lambda b: json.dumps(b, sort_keys=True, default=str))
    labels, warnings = dataset_labels(records)
    records = [r if r["dataset"] == label else {**r, "dataset": label} for r, label in zip(records, labels)]
    failures = sorted(
        (
            Failure(
                r["backbone"],
                r["method"],
                r["dataset"],
                r["protocol"],
                r["seed"],
                r["status"],
                (r.get("error") or "").strip().splitlines()[0][:160] if r.get("error") else "",
            )
            for r in records
            if r["status"] != "ok"
        ),
        key=lambda f: (f.backbone, f.method, f.dataset, f.protocol, f.seed, f.status, f.error),
    )
    tune = sum(1 for r in records if r["status"] == "ok" and r["protocol"] == "tune")
    ranked = [r for r in records if r["status"] == "ok" and r["protocol"] == "final"]
    ranked.sort(key=lambda r: json.dumps(r, sort_keys=True, default=str))
    variants = _variants(ranked)

    # (row key, dataset, seed) -> one record: a rerun of the same seed replaces, never doubles, a value
    chosen: dict[tuple, dict[str, Any]] = {}
    for r, v in zip(ranked, variants):
        key = ((r["backbone"], r["method"], v), r["dataset"], r["seed"])
        if key in chosen:
            keep = max(chosen[key], r, key=lambda x: (str(x.get("finished_at") or ""), json.dumps(x, sort_keys=True)))
            warnings.append(
                f"{r['backbone']} / {r['method']}{' (' + v + ')' if v else ''} / {r['dataset']}: seed {r['seed']} "
                "has more than one final record; the latest is used"
            )
            chosen[key] = keep
        else:
            chosen[key] = r
    by_row: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for (row_key, _, _), r in sorted(chosen.items(), key=lambda kv: json.dumps(kv[0])):
        by_row[row_key].append(r)

    rows = []
    for (backbone, method, variant), recs in sorted(by_row.items()):
        label = f"{backbone} / {method}{' (' + variant + ')' if variant else ''}"
        cells = {}
        for dataset in sorted({r["dataset"] for r in recs}):
            runs = sorted((r for r in recs if r["dataset"] == dataset), key=lambda r: r["seed"])
            mixed = len({_settings(r) for r in runs}) > 1
            if mixed:
                warnings.append(f"{label} / {dataset}: the seeds were run with different settings (marked *)")
            cells[dataset] = aggregate([r["metrics"]["top1"] for r in runs], mixed=mixed)
        params = [r["params"]["trainable_excl_head"] / 1e6 for r in recs]
        cost = [r.get("cost") or {} for r in recs]
        lat_runs = [(c.get("latency_overhead"), c.get("latency_overhead_at"), r) for c, r in zip(cost, recs)]
        lat_runs = [x for x in lat_runs if x[0] is not None]
        if lat_runs:
            latency = statistics.median(float(x[0]) for x in lat_runs)
            found = {_latency_at(x[1], x[2]["env"].get("device_name")) for x in lat_runs}
            ats = sorted({a for _, a in found if a})
            variants_seen = sorted({v for v, _ in found if v})
            latency_variant = " + ".join(variants_seen) or None
            latency_at, source = " | ".join(ats) or None, "run"
            if len(ats) > 1:
                warnings.append(f"{label}: latency measured in different settings ({'; '.join(ats)})")
        else:
            configs = Counter(json.dumps(r["method_config"], sort_keys=True) for r in recs)
            latency, latency_variant, latency_at = _bench_latency(bench, backbone, method, configs)
            source = "bench" if latency is not None else None
        kinds = sorted({c.get("peak_mem_kind") for c in cost if c.get("peak_mem_mb") is not None})
        devices = tuple(sorted({r["env"]["device_name"] for r in recs}))
        if len(devices) > 1:
            warnings.append(f"{label}: runs on different devices ({', '.join(devices)}); costs are averaged")
        summary = vtab_summary({t: c.mean for t, c in cells.items() if t in TASKS})
        params_mean = statistics.fmean(params)
        rows.append(
            Row(
                backbone=backbone,
                method=method,
                variant=variant,
                cells=cells,
                params_m=params_mean,
                params_range_m=(min(params), max(params)) if max(params) > min(params) else None,
                latency_overhead=latency,
                latency_variant=latency_variant,
                latency_at=latency_at,
                latency_source=source,
                train_images_per_s=_mean(c.get("train_images_per_s") for c in cost),
                peak_mem_mb=_mean(c.get("peak_mem_mb") for c in cost),
                peak_mem_kind=" + ".join(k for k in kinds if k) or None,
                devices=devices,
                vtab=summary,
                ppt=ppt_score(summary.mean19, params_mean * 1e6),
            )
        )
    return Leaderboard(tuple(rows), tuple(failures), tune, tuple(sorted(set(warnings))))


# -- the published reference block -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReferenceRow:
    method: str
    tasks: dict[str, float]
    params_m: float
    source: str
    vtab: VtabSummary
    ppt: float | None


def load_reference() -> list[ReferenceRow]:
    """The published ViT-B/16 (IN-21k) VTAB-1k numbers shipped with vpeft, aggregated as our rows are."""
    text = files("vpeft.results").joinpath("reference", REFERENCE_FILE).read_text()
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        tasks = {t: float(r[t]) for t in TASKS}
        summary = vtab_summary(tasks)
        params = float(r["params_M_excl_head"])
        rows.append(
            ReferenceRow(r["method"], tasks, params, r["source"], summary, ppt_score(summary.mean19, params * 1e6))
        )
    return rows


# -- the methods table from bench records ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MethodCost:
    device: str
    backbone: str
    method: str
    variant: str
    mergeable: bool
    params_pct: float | None  # trainable excluding head, % of the bare backbone's parameters
    trainable_excl_head: int
    delta_bytes: int | None
    overhead: dict[tuple[str, str, int], float]  # (variant, dtype, batch) -> ratio to bare
    dtypes: tuple[str, ...]
    batches: tuple[int, ...]
    train_images_per_s: float | None
    peak_mem_mb: float | None
    peak_mem_kind: str | None
    train_rel: float | None  # images/s / linear probing's images/s (same backbone, device)
    mem_rel: float | None  # peak memory / linear probing's (GPU allocator peaks only)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def methods_table(bench_records: Iterable[dict[str, Any]]) -> list[MethodCost]:
    """One row per bench record, grouped by (device, backbone), relative costs against linear probing."""
    bench = sorted(bench_records, key=lambda b: json.dumps(b, sort_keys=True, default=str))
    variants = _variants([{**b, "dataset": ""} for b in bench])
    rows = []
    for b, variant in zip(bench, variants):
        device = f"{b['env']['device_name']} ({b['env']['device']})"
        p = b["params"]
        lat = b.get("latency") or {}
        overhead = {(o["variant"], o["dtype"], int(o["batch"])): float(o["ratio"]) for o in lat.get("overhead", [])}
        tr = b.get("training") or {}
        rows.append(
            MethodCost(
                device=device,
                backbone=b["backbone"],
                method=b["method"],
                variant=variant,
                mergeable=bool(b["mergeable"]),
                params_pct=100.0 * p["trainable_excl_head"] / p["backbone_total"] if p.get("backbone_total") else None,
                trainable_excl_head=int(p["trainable_excl_head"]),
                delta_bytes=p.get("delta_bytes"),
                overhead=overhead,
                dtypes=tuple(lat.get("dtypes", ())),
                batches=tuple(int(x) for x in lat.get("batches", ())),
                train_images_per_s=tr.get("images_per_s"),
                peak_mem_mb=tr.get("peak_mem_mb"),
                peak_mem_kind=tr.get("peak_mem_kind"),
                train_rel=None,
                mem_rel=None,
            )
        )
    out = []
    for r in rows:
        ref = next((x for x in rows if (x.device, x.backbone, x.method) == (r.device, r.backbone, "linear")), None)
        gpu = ref is not None and r.peak_mem_kind == ref.peak_mem_kind == "cuda_max_allocated"
        out.append(
            dataclasses.replace(
                r,
                train_rel=_ratio(r.train_images_per_s, ref.train_images_per_s if ref else None),
                # a process-lifetime RSS peak says nothing about one method against another
                mem_rel=_ratio(r.peak_mem_mb, ref.peak_mem_mb) if gpu and ref else None,
            )
        )
    return sorted(out, key=lambda r: (r.device, r.backbone, r.method, r.variant))
