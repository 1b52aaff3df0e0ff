"""The run record: one self-describing JSON per (backbone, method, dataset, protocol, seed, config).

A run's identity is decided here: the names records give a dataset and a backbone, the compute it ran
on (device type and precision), and the part of the resolved config that is hashed (everything but
``NOT_HASHED``), so a rerun finds its record.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from vpeft.files import path_part

SCHEMA_VERSION = 1
STATUSES = ("ok", "failed", "interrupted")
PROTOCOLS = ("tune", "final")
# Config keys that never change a run's result: left out of its hash, so reruns find it.
NOT_HASHED = (
    "paths", "logger", "bench", "save_delta", "skip_finished", "device", "hparams", "sweep", "jobs_per_gpu", "job",
    "merge", "probe", "sequential", "pack", "pack_job", "stop_after", "halving",
    "tuned_by",
)  # fmt: skip
NOT_HASHED_TRAINER = ("progress", "data_on_device", "eval_batch_size", "compile_mode")  # how, not what, it computes
# The compute every record was made on before records named theirs: a record without ``compute`` was made on it,
# and it stays out of the hash, so that those records (results/runs) keep their names and hashes.
LEGACY_COMPUTE = "cpu-fp32"

_OPT_INT = (int, type(None))
_OPT_FLOAT = (float, int, type(None))
_OPT_STR = (str, type(None))
# key -> type(s) every record must carry; nested dicts list their own required keys. Numbers may be
# null in failed or interrupted runs; an ok run must have them (checked in `validate`).
REQUIRED: dict[str, Any] = {
    "schema_version": int,
    "status": str,
    "error": _OPT_STR,
    "method": str,
    "method_config": dict,
    "dataset": str,
    "data_source": _OPT_STR,
    "backbone": str,
    "protocol": str,
    "seed": int,
    "config_hash": str,
    "metrics": {"train_loss": _OPT_FLOAT, "top1": _OPT_FLOAT, "eval_split": _OPT_STR},
    "params": {"trainable": _OPT_INT, "trainable_excl_head": _OPT_INT, "total": _OPT_INT},
    "cost": {"train_seconds": _OPT_FLOAT, "train_images_per_s": _OPT_FLOAT, "peak_mem_mb": _OPT_FLOAT},
    "env": {
        "device": str,
        "device_name": str,
        "torch": str,
        "timm": str,
        "vpeft": str,
        "git_sha": _OPT_STR,
        "git_dirty": (bool, type(None)),
    },
    "config": dict,
    "overrides": list,
}
OK_REQUIRES = [("metrics", "top1"), ("metrics", "train_loss"), ("metrics", "eval_split")] + [
    ("params", k) for k in ("trainable", "trainable_excl_head", "total")
]


class RecordError(ValueError):
    """A record that does not follow the schema."""


def _check(obj: dict, spec: dict, where: str) -> None:
    for key, kind in spec.items():
        if key not in obj:
            raise RecordError(f"{where}: missing key {key!r}")
        if isinstance(kind, dict):
            if not isinstance(obj[key], dict):
                raise RecordError(f"{where}.{key}: expected an object")
            _check(obj[key], kind, f"{where}.{key}")
        elif not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):
            raise RecordError(f"{where}.{key}: {obj[key]!r} is not {kind}")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def validate(record: dict[str, Any]) -> dict[str, Any]:
    """Raise RecordError unless ``record`` follows the schema; return it."""
    if not isinstance(record, dict):  # JSON null, a number, a string or an array: no field to check
        raise RecordError(f"record: expected a JSON object, got {type(record).__name__} {_short(record)}")
    _check(record, REQUIRED, "record")
    if record["schema_version"] != SCHEMA_VERSION:
        raise RecordError(f"record: schema_version {record['schema_version']} is not {SCHEMA_VERSION}")
    if record["status"] not in STATUSES:
        raise RecordError(f"record.status: {record['status']!r} is not one of {STATUSES}")
    if record["protocol"] not in PROTOCOLS:
        raise RecordError(f"record.protocol: {record['protocol']!r} is not one of {PROTOCOLS}")
    if record["status"] == "ok":
        for group, key in OK_REQUIRES:
            if record[group][key] is None:
                raise RecordError(f"record: status ok without {group}.{key}")
        if not math.isfinite(record["metrics"]["train_loss"]):
            raise RecordError(f"record.metrics.train_loss: {record['metrics']['train_loss']!r} in a run recorded ok")
    elif not record["error"]:
        raise RecordError(f"record: status {record['status']} needs an error message")
    if not isinstance(record.get("compute", LEGACY_COMPUTE), str):
        raise RecordError(f"record.compute: {record['compute']!r} is not a string such as 'cuda-bf16'")
    top1 = record["metrics"]["top1"]
    if top1 is not None and not (math.isfinite(top1) and 0 <= top1 <= 100):  # averaging it would skew every mean
        raise RecordError(f"record.metrics.top1: {top1!r} is not a top-1 accuracy (a percentage in [0, 100])")
    return record


def compute_id(device_type: str, amp: str) -> str:
    """What a run computes on: 'cpu-fp32', 'cuda-bf16', ... (``amp`` as resolved: bf16 or none)."""
    return f"{device_type}-{'bf16' if amp == 'bf16' else 'fp32'}"


def hashed_config(config: dict[str, Any], compute: str | None = None) -> dict[str, Any]:
    """The part of a resolved run config that decides the result: all but ``NOT_HASHED`` (and the trainer's
    ``NOT_HASHED_TRAINER``), with the ``compute`` it runs on unless that is ``LEGACY_COMPUTE``. ``config_hash``
    of it names the run."""
    out = {k: v for k, v in config.items() if k not in NOT_HASHED}
    if isinstance(out.get("trainer"), dict):
        out["trainer"] = {k: v for k, v in out["trainer"].items() if k not in NOT_HASHED_TRAINER}
    if compute is not None and compute != LEGACY_COMPUTE:
        out["compute"] = compute
    return out


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of the config that decides a run's result (paths and logging excluded)."""
    blob = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def dataset_id(ds: dict[str, Any]) -> str:
    """The name records and leaderboards use: the task name, or a folder's own name."""
    if ds.get("id"):
        return str(ds["id"])
    if ds["name"] in ("folder", "imagefolder"):
        return Path(str(ds["root"])).resolve().name
    return str(ds["name"])


def backbone_id(bb: dict[str, Any]) -> str:
    """timm name, marked when its weights are not timm's own (offline source, local checkpoint, none)."""
    name = str(bb["name"])
    if bb.get("offline"):
        return f"{name}+{bb['offline']}"
    if bb.get("checkpoint"):
        return f"{name}+ckpt-{Path(str(bb['checkpoint'])).stem}"
    if not bb.get("pretrained", True):
        return f"{name}+random"
    return name


def record_path(root: str | Path, record_or_keys: dict[str, Any]) -> Path:
    """``<root>/<dataset>/<backbone>/<method>/<protocol>-seed<seed>-<config hash>.json``, always inside ``root``:
    a name that would lead out of it ('..') is a RecordError naming the field."""
    r = record_or_keys
    parts = {key: path_part(str(r[key])) for key in ("dataset", "backbone", "method")}
    for key, part in parts.items():
        if part.strip(".") == "":  # '.' and '..' name a folder, not a run's own one
            raise RecordError(f"record {key} {r[key]!r} is not a name a folder can have (it leads outside {root})")
    path = Path(root).joinpath(*parts.values(), f"{r['protocol']}-seed{r['seed']}-{r['config_hash']}.json")
    # compared as written, not resolved: a symlinked folder under the root is a choice, not an escape
    if os.path.commonpath([os.path.normpath(root), os.path.normpath(path)]) != os.path.normpath(root):
        raise RecordError(f"record path {path} is not inside {root}")
    return path
