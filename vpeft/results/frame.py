"""Records as pandas DataFrames: what the leaderboard is computed from, and what a notebook reads.

``load_records(path)`` gives one row per run record, ``load_bench_records(path)`` one row per bench
record. Nested fields are flattened to dotted column names (``metrics.top1``, ``cost.latency_overhead``,
``config.optim.lr``, ``env.git_sha``); lists stay Python lists. The columns in ``RUN_COLUMNS`` /
``BENCH_COLUMNS`` are always there with their dtype, even when no record has the field, so code that
reads them does not depend on which records a folder holds. Derived columns (no dot in their names):

- ``kind`` ("run" | "bench") and ``path`` (the record's file, as found under the folder given);
- ``dataset_label``: the dataset name, told apart when one folder name stands for several folders;
- ``variant``: the method-config fields that differ between ranked runs of one dataset (``r=16``), then
  the other settings that do (``optim.lr=0.005``): runs of different settings are never one cell's seeds;
- ``img_size``: the input side in pixels; ``dtype``: the training precision (fp32 | bf16 | fp16);
- ``settings``: the run's config minus the seed and the keys that never change a result (as hashed);
- ``method_config_key``: the method config as canonical JSON, the key a bench record joins on.

``latency_frame`` turns the latency results of either kind into one row per (record, dtype, batch,
variant), with the ratio to the bare backbone, the spread of the timings and the noise flags.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any

import pandas as pd

from vpeft.results.bench_record import iter_bench_records
from vpeft.results.record import hashed_config
from vpeft.results.store import iter_records

# A latency is noisy when p90 / median of the method's or the bare backbone's timings exceeds this.
NOISE_SPREAD = 1.5

_COMMON = {
    "kind": "string",
    "path": "string",
    "method": "string",
    "variant": "string",
    "backbone": "string",
    "img_size": "Int64",
    "method_config_key": "string",
    "env.device": "string",
    "env.device_name": "string",
    "env.torch": "string",
    "env.timm": "string",
    "env.vpeft": "string",
    "env.git_sha": "string",
    "env.git_dirty": "boolean",
}
RUN_COLUMNS: dict[str, str] = {
    **_COMMON,
    "status": "string",
    "error": "string",
    "dataset": "string",
    "dataset_label": "string",
    "tuned_by": "string",
    "data_source": "string",
    "protocol": "string",
    "seed": "Int64",
    "config_hash": "string",
    "dtype": "string",
    "settings": "string",
    "metrics.top1": "float64",
    "metrics.train_loss": "float64",
    "metrics.eval_split": "string",
    "metrics.best_epoch_top1": "float64",
    "params.trainable": "Int64",
    "params.trainable_excl_head": "Int64",
    "params.total": "Int64",
    "cost.train_seconds": "float64",
    "cost.train_images_per_s": "float64",
    "cost.peak_mem_mb": "float64",
    "cost.peak_mem_kind": "string",
    "cost.amp": "string",
    "cost.delta_bytes": "Int64",
    "cost.flops.ratio": "float64",
    "cost.latency_overhead": "float64",
    "config.trainer.epochs": "Int64",
    "config.trainer.batch_size": "Int64",
    "config.optim.lr": "float64",
    "config.optim.weight_decay": "float64",
    "started_at": "datetime64[ns, UTC]",
    "finished_at": "datetime64[ns, UTC]",
}
BENCH_COLUMNS: dict[str, str] = {
    **_COMMON,
    "mergeable": "boolean",
    "created_at": "datetime64[ns, UTC]",
    "params.trainable": "Int64",
    "params.trainable_excl_head": "Int64",
    "params.total": "Int64",
    "params.delta_bytes": "Int64",
    "params.backbone_total": "Int64",
    "flops.ratio": "float64",
    "latency_overhead": "float64",
    "latency.headline_variant": "string",
    "training.images_per_s": "float64",
    "training.peak_mem_mb": "float64",
    "training.peak_mem_kind": "string",
    "training.base_mem_mb": "float64",
    "training.batch_size": "Int64",
    "training.dtype": "string",
}
LATENCY_COLUMNS: dict[str, str] = {
    "record": "Int64",
    "kind": "string",
    "path": "string",
    "backbone": "string",
    "method": "string",
    "variant": "string",
    "method_config_key": "string",
    "img_size": "Int64",
    "device": "string",
    "device_name": "string",
    "dtype": "string",
    "batch": "Int64",
    "which": "string",
    "headline": "boolean",
    "median_ms": "float64",
    "p90_ms": "float64",
    "bare_median_ms": "float64",
    "bare_p90_ms": "float64",
    "n": "Int64",
    "ratio": "float64",
    "spread": "float64",
    "noisy": "boolean",
    "within_noise": "boolean",
}


# -- dataset names and variants (they need the whole set of records) -------------------------------

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


def _value_text(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(_value_text(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def variant_labels(records: Sequence[dict[str, Any]], group: Sequence[str], among: Sequence[bool]) -> list[str]:
    """Each record's variant: the method-config fields that differ between the ``among`` records that share
    backbone, method and the ``group`` fields (the dataset for runs: VPT's per-task prompt lengths do not
    split a row; nothing for bench records)."""
    configs: dict[tuple, set[str]] = defaultdict(set)
    for r, use in zip(records, among):
        if use:
            configs[(r["backbone"], r["method"], *(r.get(g) for g in group))].add(_key(r["method_config"]))
    varying: dict[tuple[str, str], set[str]] = defaultdict(set)
    for (backbone, method, *_), blobs in configs.items():
        if len(blobs) > 1:
            dicts = [json.loads(b) for b in blobs]
            keys = set().union(*dicts)
            varying[(backbone, method)] |= {k for k in keys if len({json.dumps(d.get(k)) for d in dicts}) > 1}
    out = []
    for r in records:
        keys = sorted(varying.get((r["backbone"], r["method"]), ()))
        out.append(", ".join(f"{k}={_value_text(r['method_config'].get(k))}" for k in keys))
    return out


def _key(method_config: dict[str, Any]) -> str:
    return json.dumps(method_config, sort_keys=True, default=str)


def _settings(record: dict[str, Any]) -> str:
    """The run's config minus the seed and the keys that never change a result (as its hash leaves them out)."""
    config = {k: v for k, v in hashed_config(record.get("config", {}), record.get("compute")).items() if k != "seed"}
    return json.dumps(config, sort_keys=True, default=str)


def _run_img_size(record: dict[str, Any]) -> int | None:
    size = (record.get("data") or {}).get("input_size")
    if isinstance(size, list) and len(size) == 3:
        return int(size[1])
    side = ((record.get("config") or {}).get("backbone") or {}).get("img_size")
    return int(side) if isinstance(side, int) else None


def _tuned_by(record: dict[str, Any]) -> str | None:
    """How a run's hyperparameters were chosen: its config's ``tuned_by`` (set from ``hparams=FILE``); a run that
    read a file from before halving existed was tuned on the grid; None for values given directly."""
    config = record.get("config") or {}
    return config.get("tuned_by") or ("grid" if config.get("hparams") else None)


def _run_dtype(record: dict[str, Any]) -> str | None:
    """The training precision: the amp the run resolved, else its config (``auto``: bf16 on CUDA, fp32 on CPU)."""
    amp = (record.get("cost") or {}).get("amp")
    if amp is None:
        amp = ((record.get("config") or {}).get("trainer") or {}).get("amp")
        if amp == "auto":
            amp = "bf16" if record["env"].get("device") == "cuda" else "none"
    return {"none": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}.get(amp) if amp else None


# -- flattening ------------------------------------------------------------------------------------


def _flatten(records: Sequence[dict[str, Any]], derived: dict[str, list[Any]], columns: dict[str, str]) -> pd.DataFrame:
    """json_normalize the records, drop null parents of flattened fields, add the derived columns, cast dtypes."""
    df = pd.json_normalize(list(records), sep=".") if records else pd.DataFrame(index=pd.RangeIndex(0))
    # a field that is null in some records and an object in others gives both "x" and "x.y": keep "x.y"
    parents = [c for c in df.columns if df[c].isna().all() and any(o.startswith(c + ".") for o in df.columns)]
    df = df.drop(columns=parents)
    for name, values in derived.items():
        df[name] = values
    for name, dtype in columns.items():
        if name not in df.columns:
            df[name] = pd.Series([pd.NA] * len(df), dtype="object")
        if dtype.startswith("datetime"):
            df[name] = pd.to_datetime(df[name], utc=True, format="ISO8601", errors="coerce").astype(dtype)
        else:
            df[name] = df[name].astype("object").where(df[name].notna(), None).astype(dtype)
    front = [c for c in columns if c in df.columns]
    return df[front + sorted(c for c in df.columns if c not in columns)]


def records_frame(records: Sequence[dict[str, Any]], paths: Sequence[str | Path] | None = None) -> pd.DataFrame:
    """Run records (valid, as ``vpeft.results.validate`` checks them) as a DataFrame, one row each."""
    records = list(records)
    labels, notes = dataset_labels(records)
    ranked = [r["status"] == "ok" and r["protocol"] == "final" for r in records]
    labelled = [{**r, "dataset": label} for r, label in zip(records, labels)]
    derived = {
        "kind": ["run"] * len(records),
        "path": [str(p) for p in paths] if paths is not None else [None] * len(records),
        "dataset_label": labels,
        "variant": variant_labels(labelled, ["dataset"], ranked),
        "img_size": [_run_img_size(r) for r in records],
        "dtype": [_run_dtype(r) for r in records],
        "tuned_by": [_tuned_by(r) for r in records],
        "settings": [_settings(r) for r in records],
        "method_config_key": [_key(r["method_config"]) for r in records],
    }
    split, split_notes = settings_labels(labelled, ranked)
    derived["variant"] = [", ".join(v for v in pair if v) for pair in zip(derived["variant"], split)]
    df = _flatten(records, derived, RUN_COLUMNS)
    df.attrs["warnings"] = notes + split_notes
    return df


# dataset.root says where a named task was read from (machines differ); a folder's root is its dataset label
_NOT_A_SETTING = ("method", "dataset.root")


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if name in _NOT_A_SETTING:
            continue
        if isinstance(value, dict) and value:
            out.update(_leaves(value, name + "."))
        else:
            out[name] = value
    return out


def settings_labels(records: Sequence[dict[str, Any]], among: Sequence[bool]) -> tuple[list[str], list[str]]:
    """Each record's settings label and a note per (backbone, method) they split.

    Seeds of one cell must share their settings, or their mean is of nothing in particular: the config keys
    (dotted, outside the method's own fields, which ``variant_labels`` names) whose values differ between the
    ``among`` records of one (backbone, method, dataset) label every record of that (backbone, method) with
    its values, so each setting gets its own row, as a method-config field does.
    """
    leaves = [_leaves(json.loads(_settings(r))) for r in records]
    cells: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r, flat, use in zip(records, leaves, among):
        if use:
            cells[(r["backbone"], r["method"], r["dataset"])].append(flat)
    varying: dict[tuple[str, str], set[str]] = defaultdict(set)
    for (backbone, method, _), flats in cells.items():
        for key in set().union(*flats):
            if len({json.dumps(f.get(key), sort_keys=True, default=str) for f in flats}) > 1:
                varying[(backbone, method)].add(key)
    notes = [
        f"{backbone} / {method}: seeds of one dataset were run with different {', '.join(sorted(keys))}; "
        "each setting is its own row"
        for (backbone, method), keys in sorted(varying.items())
    ]
    labels = []
    for r, flat in zip(records, leaves):
        keys = sorted(varying.get((r["backbone"], r["method"]), ()))
        labels.append(", ".join(f"{k}={_value_text(flat.get(k))}" for k in keys))
    return labels, notes


def bench_frame(records: Sequence[dict[str, Any]], paths: Sequence[str | Path] | None = None) -> pd.DataFrame:
    """Bench records (valid, as ``vpeft.results.bench_record`` checks them) as a DataFrame, one row each."""
    records = list(records)
    derived = {
        "kind": ["bench"] * len(records),
        "path": [str(p) for p in paths] if paths is not None else [None] * len(records),
        "variant": variant_labels(records, [], [True] * len(records)),
        "img_size": [int(r["input_size"][1]) for r in records],
        "method_config_key": [_key(r["method_config"]) for r in records],
    }
    return _flatten(records, derived, BENCH_COLUMNS)


def load_records(path: str | Path) -> pd.DataFrame:
    """Every valid run record under ``path`` (files it cannot read are skipped with a warning), one row each;
    ``.attrs["warnings"]`` names dataset names that stand for several folders (told apart in ``dataset_label``)."""
    found = list(iter_records(path))
    return records_frame([r for _, r in found], [p for p, _ in found])


def load_bench_records(path: str | Path) -> pd.DataFrame:
    """Every valid bench record under ``path``, one row each (``kind`` "bench")."""
    found = list(iter_bench_records(path))
    return bench_frame([r for _, r in found], [p for p, _ in found])


# -- latency in long form --------------------------------------------------------------------------


def latency_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (record, dtype, batch, variant timed against the bare backbone) of a run or bench frame;
    ``record`` is the record's position in ``frame``.

    ``ratio`` = median / the bare backbone's median (same process, same dtype and batch); ``spread`` =
    the larger p90 / median of the two timings; ``noisy``: spread > NOISE_SPREAD (a few slow calls move
    such a median, so the ratio means nothing); ``within_noise``: not noisy and |ratio - 1| <= spread - 1
    (the difference is smaller than the call-to-call variation). ``headline``: the variant a table shows
    first, merged where the method allows it.
    """
    rows = []
    for position, rec in enumerate(frame.to_dict("records")):
        run = rec["kind"] == "run"
        results = rec.get("cost.latency.results" if run else "latency.results")
        if not isinstance(results, list):
            continue
        headline = rec.get("cost.latency.headline_variant" if run else "latency.headline_variant")
        device = rec.get("env.device")
        name = rec.get("env.device_name")
        stats = {(s["variant"], s["dtype"], int(s["batch"])): s for s in results}
        for (which, dtype, batch), s in sorted(stats.items()):
            bare = stats.get(("bare", dtype, batch))
            if which == "bare" or bare is None:
                continue
            spread = max(s["p90_ms"] / s["median_ms"], bare["p90_ms"] / bare["median_ms"])
            ratio = s["median_ms"] / bare["median_ms"]
            noisy, within = noise_flags(ratio, spread)
            rows.append(
                {
                    "record": position,
                    **{k: rec.get(k) for k in ("kind", "path", "backbone", "method", "variant")},
                    **{k: rec.get(k) for k in ("method_config_key", "img_size")},
                    "device": device,
                    "device_name": name,
                    "dtype": dtype,
                    "batch": batch,
                    "which": which,
                    "headline": which == headline,
                    "median_ms": s["median_ms"],
                    "p90_ms": s["p90_ms"],
                    "bare_median_ms": bare["median_ms"],
                    "bare_p90_ms": bare["p90_ms"],
                    "n": s.get("n"),
                    "ratio": ratio,
                    "spread": spread,
                    "noisy": noisy,
                    "within_noise": within,
                }
            )
    out = pd.DataFrame(rows, columns=list(LATENCY_COLUMNS))
    for name, dtype in LATENCY_COLUMNS.items():
        out[name] = out[name].astype("object").where(out[name].notna(), None).astype(dtype)
    return out


def noise_flags(ratio: float, spread: float) -> tuple[bool, bool]:
    """(noisy, within_noise) of one latency ratio and its spread, by the rule ``latency_frame`` states."""
    noisy = bool(spread > NOISE_SPREAD)
    return noisy, bool(not noisy and abs(ratio - 1) <= spread - 1)
