"""The delta file and the marks on a model it records: which backbone, whose weights.

``vpeft.core.save_delta`` / ``read_delta`` are the public names. The format lives beside the methods
because a method reads delta files too: AdapterFusion fuses the adapters of earlier runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vpeft.errors import DataError, VpeftError
from vpeft.files import atomic_path
from vpeft.methods._base import METHODS

DELTA_FORMAT = "vpeft.delta/1"
WEIGHTS_ATTR = "vpeft_weights"  # where the model's weights came from, set by mark_weights


def backbone_name(model: nn.Module) -> str | None:
    """timm's ``architecture``, with ``.tag`` only when the model is marked as holding that tag's weights.

    timm fills ``pretrained_cfg`` (tag included) for a randomly initialised model too, and keeps its own tag
    when a local checkpoint is loaded, so the tag alone would claim weights that were never loaded. It is kept
    only for models marked (``mark_weights``) as loaded from timm's pretrained weights.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    if arch and tag and str(weights_source(model) or "").startswith("timm:"):
        return f"{arch}.{tag}"
    return arch


def mark_weights(model: nn.Module, weights: str) -> nn.Module:
    """Record where ``model``'s weights came from (``Backbone.weights``: ``timm:<id>``, ``checkpoint:<path>``,
    ``offline:<source>`` or ``random``); delta files name it, and ``backbone_name`` keeps the tag only for timm's."""
    model.__dict__[WEIGHTS_ATTR] = str(weights)
    return model


def weights_source(model: nn.Module) -> str | None:
    """Where ``model``'s weights came from, as marked by ``mark_weights``; None when nobody said."""
    return model.__dict__.get(WEIGHTS_ATTR)


def weights_key(weights: str | None) -> str | None:
    """What identifies a weight source across machines: timm's id, or the offline source's label.

    Random init and local checkpoints (paths differ between machines) cannot be compared: None.
    """
    if not weights or weights == "random" or weights.startswith("checkpoint:"):
        return None
    return weights.split(" (", 1)[0]


def weights_conflict(delta_weights: str | None, model_weights: str | None) -> str | None:
    """The provenance rule of every loader: a delta trained on named weights fits only a model with the same
    (or with weights that cannot be compared). None when they fit, else a sentence naming both."""
    theirs, ours = weights_key(delta_weights), weights_key(model_weights)
    if theirs and ours and theirs != ours:
        return f"trained on weights {theirs}, not {ours}"
    return None


class NonFiniteDeltaError(DataError):
    """A delta holding NaN or infinite values: applying it would silently poison every output."""


def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a delta with a NaN or infinite value, naming ``source`` (its file) and the tensor.

    Every reader of deltas (load_delta, composition, serving, the merge job) comes through here.
    """
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteDeltaError(
                f"{source}: tensor {name} holds {bad} non-finite value{'s' if bad > 1 else ''} (NaN or inf) of "
                f"{t.numel()}: the run that saved it diverged or the file was altered; train it again"
            )


class MissingDeltaError(DataError, FileNotFoundError):
    """No delta file at the path: a DataError, and a FileNotFoundError for callers that catch that."""


def write_delta(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    method: str,
    config: dict[str, Any],
    backbone: str | None,
    weights: str | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a delta file atomically: the file appears complete or not at all (temp file, fsync, rename)."""
    meta = {
        "format": DELTA_FORMAT,
        "method": method,
        "config": json.dumps(config),
        "backbone": backbone or "",
        "weights": weights or "",
        "extra": json.dumps(extra or {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def read_delta(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the decoded metadata of a delta file.

    A missing, empty, truncated or foreign file, or one holding a NaN or infinite value, raises DataError
    naming the path and the problem.
    """
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a delta file" if path.is_dir() else "no delta file"
        raise MissingDeltaError(f"{what} at {path}")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path} is empty (0 bytes), not a delta file: a write or copy was cut off; save it again")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != DELTA_FORMAT:
                raise DataError(
                    f"{path} is not a vpeft delta file (format {meta.get('format')!r}, expected {DELTA_FORMAT})"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except VpeftError:
        raise
    except Exception as e:  # safetensors' header and size checks, torch's allocation: all mean a broken file
        raise DataError(
            f"{path} ({size} bytes) is not a readable safetensors file ({_first_line(e)}): it is truncated "
            "(a write or copy was cut off) or not a delta file"
        ) from e
    try:
        info = {
            "method": meta["method"],
            "config": json.loads(meta["config"]),
            "backbone": meta.get("backbone") or None,
            "weights": meta.get("weights") or None,
            "extra": json.loads(meta.get("extra", "{}")),
        }
        if not isinstance(info["config"], dict) or not isinstance(info["extra"], dict):
            raise ValueError("config and extra must be JSON objects")
        if info["method"] in METHODS:  # a field the file predates: the value that file was trained with
            cls = METHODS.get(info["method"])
            fields = {f.name for f in dataclasses.fields(cls.Config)}
            for key, value in cls.legacy_defaults.items():
                if key in fields:
                    info["config"].setdefault(key, value)
    except (KeyError, ValueError) as e:
        raise DataError(f"{path}: the delta's metadata is broken ({_first_line(e)})") from e
    check_finite(tensors, str(path))
    return tensors, info
