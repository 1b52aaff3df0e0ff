"""The public API: apply a method, count, save, load and merge its delta."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vpeft.errors import DataError, VpeftError
from vpeft.layers.delta import Delta
from vpeft.methods import METHODS, Method
from vpeft.methods._base import head_parameters
from vpeft.results.store import atomic_path

DELTA_FORMAT = "vpeft.delta/1"
WEIGHTS_ATTR = "vpeft_weights"  # where the model's weights came from, set by mark_weights


def list_methods() -> list[str]:
    """The registered method names, sorted."""
    return METHODS.names()


def applied_method(model: nn.Module) -> Method | None:
    """The method applied to ``model`` by ``apply_method``, or None."""
    return model.__dict__.get("vpeft_method")


def apply_method(model: nn.Module, name: str, **config: Any) -> nn.Module:
    """Inject method ``name`` into ``model`` in place, freeze all but its delta and the head.

    ``config`` holds the method's config fields (e.g. ``r=8`` for LoRA); unknown names raise an
    error listing the valid ones. Returns the same module.
    """
    method = METHODS.get(name).from_kwargs(**config)
    previous = applied_method(model)
    if previous is not None:
        raise VpeftError(f"the model already has {previous.name!r} applied; create a fresh backbone for {name!r}")
    method.inject(model)
    model.train(model.training)  # injected modules start in training mode; follow the model's
    model.vpeft_method = method
    model.requires_grad_(False)
    for p in trainable_parameters(model).values():
        p.requires_grad_(True)
    return model


def _method(model: nn.Module) -> Method:
    method = applied_method(model)
    if method is None:
        raise VpeftError("no vpeft method is applied to this model (or it was merged); call vpeft.apply_method first")
    return method


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The delta plus the head, found structurally from the applied method."""
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, p in [*_method(model).delta_parameters(model), *head_parameters(model)]:
        if id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


@dataclasses.dataclass(frozen=True)
class ParamCount:
    trainable: int
    trainable_excl_head: int
    total: int


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable (delta + head), trainable without the head, and all parameters of ``model``.

    For a model with no method applied, trainable means ``requires_grad``.
    """
    total = sum(p.numel() for p in model.parameters())
    head = {id(p) for _, p in head_parameters(model)}
    if applied_method(model) is not None:
        params = list(trainable_parameters(model).values())
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    excl = sum(p.numel() for p in params if id(p) not in head)
    return ParamCount(trainable=trainable, trainable_excl_head=excl, total=total)


def delta_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the trainable tensors (the delta and the head), detached, under the model's names."""
    return {name: p.detach() for name, p in trainable_parameters(model).items()}


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


class MissingDeltaError(DataError, FileNotFoundError):
    """No delta file at the path: a DataError, and a FileNotFoundError for callers that catch that."""


def save_delta(model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the delta and its metadata (method, config, backbone, weights) to a safetensors file, atomically.

    The file appears complete or not at all (temp file, fsync, rename) and with the usual mode (umask).
    """
    method = _method(model)
    tensors, config = method.export_delta(model, delta_state_dict(model))
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    meta = {
        "format": DELTA_FORMAT,
        "method": method.name,
        "config": json.dumps(config),
        "backbone": backbone_name(model) or "",
        "weights": weights_source(model) or "",
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

    A missing, empty, truncated or foreign file raises DataError naming the path and the problem.
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
    return tensors, info


def load_delta(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a delta file onto ``model``, applying its method first if the model has none."""
    tensors, info = read_delta(path)
    method = applied_method(model)
    if method is None:
        apply_method(model, info["method"], **info["config"])
    elif (
        method.name != info["method"]
        or method.config_dict() != METHODS.get(info["method"]).from_kwargs(**info["config"]).config_dict()
    ):
        raise VpeftError(
            f"{path} holds a {info['method']} delta with config {info['config']}, but the model has "
            f"{method.name} with {method.config_dict()} applied; load it onto a fresh backbone"
        )
    ours = backbone_name(model)
    if info["backbone"] and ours and info["backbone"].split(".")[0] != ours.split(".")[0]:
        warnings.warn(f"{path} was trained on {info['backbone']}, loading onto {ours}", stacklevel=2)
    params = trainable_parameters(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise VpeftError(f"{path} does not match the model's delta: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in tensors.items():
        p = params[name]
        if p.shape != t.shape:
            hint = " (create the model with the same num_classes)" if "head" in name else ""
            raise VpeftError(f"{path}: {name} has shape {tuple(t.shape)}, the model {tuple(p.shape)}{hint}")
        with torch.no_grad():
            p.copy_(t)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold a mergeable delta into the backbone's weights: plain timm modules, same outputs.

    Non-mergeable methods raise NotMergeableError listing those that are.
    """
    method = _method(model)
    method.merge(model)
    leftover = [n for n, m in model.named_modules() if isinstance(m, Delta)]
    assert not leftover, f"{method.name}.merge left delta modules behind: {leftover}"
    del model.vpeft_method
    return model
