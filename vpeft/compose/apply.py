"""From a (merged) task vector back to a model, and each task's own head onto it."""

from __future__ import annotations

import copy
import dataclasses
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vpeft.compose.errors import IncompatibleDeltasError
from vpeft.compose.merging import merge_vectors
from vpeft.compose.vectors import (
    TaskDelta,
    TaskVector,
    _same_backbone,
    as_task,
    load_body,
    task_head,
    task_vector,
)
from vpeft.core import applied_method, apply_method, backbone_name
from vpeft.errors import ConfigError, VpeftError
from vpeft.methods._base import head_parameters


def _parameter(model: nn.Module, name: str) -> nn.Parameter:
    """``model``'s parameter ``name``; a bias that merging gives a bias-free layer (SSF) is created as zeros."""
    params = dict(model.named_parameters())
    if name in params:
        return params[name]
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    weight = getattr(module, "weight", None)
    if leaf == "bias" and getattr(module, "bias", False) is None and isinstance(weight, nn.Parameter):
        zeros = torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype)
        module.bias = nn.Parameter(zeros, requires_grad=weight.requires_grad)
        return module.bias
    raise IncompatibleDeltasError(f"the task vector changes {name}, which this backbone does not have")


def apply_vector(backbone: nn.Module, vector: TaskVector, inplace: bool = False) -> nn.Module:
    """A model with ``vector`` applied to the bare ``backbone`` (a copy unless ``inplace``).

    Weight space: every parameter becomes base + change (computed in float32, stored in the parameter's
    dtype); the result is a plain timm model, as ``vpeft.merge`` gives. Delta space: the vector's method
    is applied with its config and its tensors, added to its origin (the method's identity), loaded as the
    delta. The classifier is the backbone's
    until ``put_head`` sets a task's.
    """
    if applied_method(backbone) is not None:
        raise VpeftError(
            f"the backbone has {applied_method(backbone).name} applied; apply task vectors to a fresh backbone"
        )
    if not _same_backbone(vector.backbone, backbone_name(backbone)):
        raise IncompatibleDeltasError(
            f"the task vector belongs to {vector.backbone}, the backbone given is {backbone_name(backbone)}"
        )
    model = backbone if inplace else copy.deepcopy(backbone)
    if vector.space == "delta":
        if vector.config is None:
            raise VpeftError("a delta-space vector needs its method's config")
        apply_method(model, vector.method, **vector.config)
        body = {k: t + vector.origin[k].to(t.device) if k in vector.origin else t for k, t in vector.tensors.items()}
        load_body(model, body, ", ".join(vector.sources) or "the task vector")
        return model
    heads = {n for n, _ in head_parameters(model)}
    with torch.no_grad():
        for name in vector.keys():
            if name in heads:
                raise IncompatibleDeltasError(f"the task vector changes the classifier ({name}); heads are not merged")
            p = _parameter(model, name)
            change = vector.tensors.get(name)
            factors = vector.low_rank.get(name)
            if factors is not None:
                product = factors.dense().to(p.device)
                change = product if change is None else change.to(p.device) + product
            if tuple(change.shape) != tuple(p.shape):
                shapes = f"{tuple(change.shape)}, the parameter {tuple(p.shape)}"
                raise IncompatibleDeltasError(f"the task vector's change to {name} has shape {shapes}")
            p.copy_((p.float() + change.to(p.device)).to(p.dtype))
    return model


def _fits(current: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor]) -> bool:
    return set(current) == set(head) and all(current[k].shape == v.shape for k, v in head.items())


def put_head(model: nn.Module, head: Mapping[str, torch.Tensor]) -> nn.Module:
    """Set ``model``'s classifier to a task's ``head`` (from ``task_head``), in place.

    A head with another number of classes replaces the classifier (timm's ``reset_classifier``), on the
    model's device and dtype.
    """
    current = dict(head_parameters(model))
    if not _fits(current, head):
        weights = [v for k, v in sorted(head.items()) if v.ndim == 2]
        if not weights or not hasattr(model, "reset_classifier"):
            raise IncompatibleDeltasError(f"the head {sorted(head)} does not fit the classifier {sorted(current)}")
        ref = next((p for n, p in model.named_parameters() if n not in current), None)
        model.reset_classifier(weights[0].shape[0])
        classifiers = model.get_classifier()
        for c in classifiers if isinstance(classifiers, tuple) else (classifiers,):
            if ref is not None:
                c.to(device=ref.device, dtype=ref.dtype)
        current = dict(head_parameters(model))
        if not _fits(current, head):
            raise IncompatibleDeltasError(
                f"the head {sorted(head)} does not fit the model's classifier {sorted(current)}"
            )
    with torch.no_grad():
        for name, t in head.items():
            current[name].copy_(t)
    return model


@dataclasses.dataclass
class MergedTasks:
    """N tasks merged into one backbone: the model (shared), the merged vector, and each task's delta and head."""

    model: nn.Module
    vector: TaskVector
    tasks: list[TaskDelta]
    heads: list[dict[str, torch.Tensor]]

    def model_for(self, task: int) -> nn.Module:
        """The merged model with task ``task``'s head (the same module, its classifier swapped in place)."""
        if isinstance(task, bool) or not isinstance(task, numbers.Integral) or not 0 <= task < len(self.heads):
            raise ConfigError(
                f"task must be an index in 0..{len(self.heads) - 1} (the order of the deltas merged), got {task!r}"
            )
        return put_head(self.model, self.heads[int(task)])


def merge_tasks(
    backbone: nn.Module,
    deltas: Sequence[TaskDelta | str | os.PathLike],
    algorithm: str,
    space: str = "weights",
    factored: bool = True,
    **params: Any,
) -> MergedTasks:
    """Read N deltas, build their vectors in ``space``, merge them with ``algorithm`` and ``params``, and apply
    the result to a copy of ``backbone``. Every head is read first, so a headless delta fails before any work."""
    tasks = [as_task(d) for d in deltas]
    heads = [task_head(t, backbone) for t in tasks]
    vectors = [task_vector(t, backbone, space, factored) for t in tasks]
    merged = merge_vectors(vectors, algorithm, **params)
    return MergedTasks(apply_vector(backbone, merged), merged, tasks, heads)
