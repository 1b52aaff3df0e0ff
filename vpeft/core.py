"""The public API: apply a method, count, save, load and merge its delta."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vpeft.errors import DataError, VpeftError
from vpeft.layers.delta import Delta
from vpeft.methods import METHODS, Method
from vpeft.methods._base import head_parameters
from vpeft.methods._delta_file import (
    DELTA_FORMAT,
    WEIGHTS_ATTR,
    MissingDeltaError,
    NonFiniteDeltaError,
    backbone_name,
    check_finite,
    mark_weights,
    read_delta,
    weights_conflict,
    weights_key,
    weights_source,
    write_delta,
)

__all__ = [  # the delta file's format and the model's marks live in vpeft.methods._delta_file
    "DELTA_FORMAT", "WEIGHTS_ATTR", "MissingDeltaError", "NonFiniteDeltaError", "ParamCount", "applied_method",
    "apply_method", "backbone_name", "check_finite", "count_parameters", "delta_state_dict", "list_methods",
    "load_delta", "mark_weights", "merge", "read_delta", "save_delta", "trainable_parameters", "weights_conflict",
    "weights_key", "weights_source",
]  # fmt: skip


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


def save_delta(model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the delta and its metadata (method, config, backbone, weights) to a safetensors file, atomically.

    The file appears complete or not at all (temp file, fsync, rename) and with the usual mode (umask).
    """
    method = _method(model)
    tensors, config = method.export_delta(model, delta_state_dict(model))
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    return write_delta(path, tensors, method.name, config, backbone_name(model), weights_source(model), extra)


def load_delta(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a delta file onto ``model``, applying its method first if the model has none."""
    tensors, info = read_delta(path)
    conflict = weights_conflict(info["weights"], weights_source(model))
    if conflict:
        raise DataError(
            f"{path} was {conflict} (the model's): load it onto a backbone with the weights it was trained on"
        )
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
