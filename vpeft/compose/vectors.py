"""Task vectors: what a delta changes, in the backbone's weight space or in the delta's own space.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023: a task vector is
``tau = theta_finetuned - theta_pretrained``; vectors add, negate and scale, and
``theta_base + lambda * sum_t tau_t`` is a model. For a mergeable method (``vpeft.merge`` folds it
into the weights) ``tau`` is exactly the change merging makes; LoRA's is also kept as its factors,
so sums of LoRA vectors stay low-rank and exact. For every method the delta's own tensors (prompts,
adapter weights, LoRA's A and B) form a second space, ``"delta"``: combining there is a different
operation (averaging two prompt sets is not adding two weight updates), so every vector says which
space it lives in and the two never mix.

In delta space a vector is the change from the method's identity, ``tau = theta - theta_id``, where
``theta_id`` is the value at which the delta leaves the backbone unchanged (``Delta.identity_values``:
1 for IA3's and SSF's scales, DoRA's magnitudes at the backbone's row norms, 0 for everything else), and
a merged vector is applied as ``theta_id + tau``. Task arithmetic of IA3 vectors thus adds the changes
``l - 1`` (the TIES paper's convention for IA3), not the raw scales, which would sum to about N.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vpeft.compose.errors import IncompatibleDeltasError, MissingHeadError
from vpeft.core import (
    _method,
    applied_method,
    apply_method,
    backbone_name,
    check_finite,
    delta_state_dict,
    read_delta,
    weights_conflict,
    weights_source,
)
from vpeft.core import merge as merge_model
from vpeft.errors import ConfigError, NotMergeableError, UnknownNameError, UnsupportedModelError, VpeftError
from vpeft.layers import Delta, LoRA, attached, detach
from vpeft.methods import METHODS, mergeable_methods
from vpeft.methods._base import head_parameters

SPACES = ("delta", "weights")
# what a vector of each space holds, for records and pages
SPACE_MEANINGS = {
    "weights": "the change merging the delta makes to the backbone's weights",
    "delta": "the delta's own tensors as changes from the method's identity (1 for IA3 and SSF scales, "
    "0 for shifts, factors, adapters and prompts), merged and added back to it",
}


@dataclasses.dataclass(frozen=True)
class TaskDelta:
    """One task's delta in memory: the tensors of a delta file (delta and head) and how they were made."""

    tensors: Mapping[str, torch.Tensor]
    method: str
    config: Mapping[str, Any]
    backbone: str | None = None  # as ``vpeft.core.backbone_name``: architecture, with the timm tag when known
    source: str = "<memory>"  # the file it came from, for messages and records
    weights: str | None = None  # as ``vpeft.core.weights_source``: the weights it was trained on, when known

    @classmethod
    def from_model(cls, model: nn.Module, source: str = "<memory>") -> TaskDelta:
        """The delta a model with a method applied would save (``vpeft.save_delta``'s tensors and config)."""
        method = _method(model)
        tensors, config = method.export_delta(model, delta_state_dict(model))
        tensors = {k: v.detach().clone() for k, v in tensors.items()}
        return cls(tensors, method.name, config, backbone_name(model), source, weights_source(model))


def read_task(path: str | os.PathLike) -> TaskDelta:
    """A delta file as a TaskDelta; a missing file raises ``vpeft.core.MissingDeltaError`` (a DataError)."""
    tensors, info = read_delta(path)
    return TaskDelta(tensors, info["method"], info["config"], info["backbone"], os.fspath(path), info["weights"])


def as_task(delta: TaskDelta | str | os.PathLike) -> TaskDelta:
    """A file read (``read_delta`` checks it), or a delta in memory checked as a file is: no NaN, no inf."""
    if not isinstance(delta, TaskDelta):
        return read_task(delta)
    check_finite(delta.tensors, delta.source)
    return delta


def check_scale(c: float) -> float:
    """A scaling coefficient as a float: a finite real number (not a string, a bool or NaN)."""
    if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c):
        raise ConfigError(f"a task vector's scale must be a finite number, got {c!r}")
    return float(c)


@dataclasses.dataclass(frozen=True)
class LowRank:
    """A weight update kept as factors, ``B @ A``; B carries LoRA's ``alpha / r``.

    Sums concatenate the factors (``B_1 A_1 + B_2 A_2 = [B_1 B_2] [A_1; A_2]``), so they stay exact
    and cost ``(out + in) * rank`` instead of ``out * in`` until materialised.
    """

    B: torch.Tensor  # (out, rank)
    A: torch.Tensor  # (rank, in)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.B.shape[0], self.A.shape[1]))

    def dense(self) -> torch.Tensor:
        return self.B @ self.A

    def __add__(self, other: LowRank) -> LowRank:
        return LowRank(torch.cat([self.B, other.B], dim=1), torch.cat([self.A, other.A], dim=0))

    def scale(self, c: float) -> LowRank:
        return LowRank(self.B * c, self.A)


def _same_backbone(a: str | None, b: str | None) -> bool:
    """Unknown matches anything; the architecture must match, and the timm tag when both have one."""
    if not a or not b:
        return True
    (arch_a, _, tag_a), (arch_b, _, tag_b) = a.partition("."), b.partition(".")
    return arch_a == arch_b and (not tag_a or not tag_b or tag_a == tag_b)


@dataclasses.dataclass(frozen=True)
class TaskVector:
    """A task vector in ``space`` ``"weights"`` (changes to backbone parameters, by their names) or
    ``"delta"`` (the delta's own tensors, by their names; ``config`` is the method's).

    In weight space a parameter's change is ``tensors[name]`` plus ``low_rank[name].dense()``, either
    absent meaning zero. Vectors add (``a + b``), negate (``-a``), subtract and scale (``c * a``); both
    operands must share space, method and backbone. Tensors are float32 on the backbone's device.
    """

    space: str
    method: str
    tensors: Mapping[str, torch.Tensor]
    low_rank: Mapping[str, LowRank] = dataclasses.field(default_factory=dict)
    config: Mapping[str, Any] | None = None
    backbone: str | None = None
    sources: tuple[str, ...] = ()
    origin: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # delta space: theta_id (absent: 0)

    def __post_init__(self):
        if self.space not in SPACES:
            raise UnknownNameError("task vector space", self.space, SPACES)
        if self.low_rank and self.space != "weights":
            raise VpeftError("low-rank factors belong to weight-space vectors only")
        if self.origin and self.space != "delta":
            raise VpeftError("an origin (the method's identity values) belongs to delta-space vectors only")

    def keys(self) -> list[str]:
        return sorted(set(self.tensors) | set(self.low_rank))

    def numel(self) -> int:
        """Numbers stored: dense entries plus factor entries."""
        return sum(t.numel() for t in self.tensors.values()) + sum(
            f.A.numel() + f.B.numel() for f in self.low_rank.values()
        )

    def materialize(self) -> TaskVector:
        """The same vector with every low-rank update made dense (for element-wise algorithms)."""
        if not self.low_rank:
            return self
        out = dict(self.tensors)
        for name, f in self.low_rank.items():
            out[name] = out[name] + f.dense() if name in out else f.dense()
        return dataclasses.replace(self, tensors=out, low_rank={})

    def dense_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.materialize().tensors)

    def scale(self, c: float) -> TaskVector:
        c = check_scale(c)
        return dataclasses.replace(
            self,
            tensors={k: v * c for k, v in self.tensors.items()},
            low_rank={k: f.scale(c) for k, f in self.low_rank.items()},
        )

    def __add__(self, other: TaskVector) -> TaskVector:
        return add(self, other)

    def __neg__(self) -> TaskVector:
        return self.scale(-1.0)

    def __sub__(self, other: TaskVector) -> TaskVector:
        return add(self, other.scale(-1.0))

    def __mul__(self, c: float) -> TaskVector:
        return self.scale(c)

    __rmul__ = __mul__


def check_compatible(vectors: list[TaskVector]) -> None:
    """Raise IncompatibleDeltasError unless the vectors can be combined: same space, method and backbone,
    and in delta space the same config and tensor shapes (the deltas must be the same kind of object)."""
    if not vectors:
        raise VpeftError("no task vectors to combine")
    first = vectors[0]

    def who(v: TaskVector) -> str:
        return ", ".join(v.sources) or "a vector"

    for v in vectors[1:]:
        if v.space != first.space:
            raise IncompatibleDeltasError(
                f"cannot combine a {first.space}-space vector ({who(first)}) with a {v.space}-space one ({who(v)}): "
                "weight updates and delta tensors are different things; build both with the same space="
            )
        if v.method != first.method:
            raise IncompatibleDeltasError(
                f"cannot combine deltas of different methods: {first.method} ({who(first)}) and {v.method} "
                f"({who(v)}); merge deltas of one method at a time"
            )
        if not _same_backbone(first.backbone, v.backbone):
            raise IncompatibleDeltasError(
                f"cannot combine deltas of different backbones: {first.backbone} ({who(first)}) and {v.backbone} "
                f"({who(v)}); a task vector is a change to one backbone's weights"
            )
        if first.space == "delta":
            if dict(v.config or {}) != dict(first.config or {}):
                raise IncompatibleDeltasError(
                    f"cannot combine {first.method} deltas with different configs in delta space: "
                    f"{dict(first.config or {})} ({who(first)}) and {dict(v.config or {})} ({who(v)})"
                )
            if set(v.tensors) != set(first.tensors):
                diff = sorted(set(v.tensors) ^ set(first.tensors))
                raise IncompatibleDeltasError(f"the deltas of {who(first)} and {who(v)} differ in tensors {diff[:5]}")
        for name in set(v.tensors) & set(first.tensors):
            if v.tensors[name].shape != first.tensors[name].shape:
                raise IncompatibleDeltasError(
                    f"{name} has shape {tuple(first.tensors[name].shape)} in {who(first)} and "
                    f"{tuple(v.tensors[name].shape)} in {who(v)}"
                )


def add(a: TaskVector, b: TaskVector) -> TaskVector:
    """``a + b``: element-wise in both spaces; weight-space low-rank factors concatenate (exact)."""
    check_compatible([a, b])
    tensors = dict(a.tensors)
    for name, t in b.tensors.items():
        tensors[name] = tensors[name] + t if name in tensors else t
    low_rank = dict(a.low_rank)
    for name, f in b.low_rank.items():
        low_rank[name] = low_rank[name] + f if name in low_rank else f
    config = a.config if dict(a.config or {}) == dict(b.config or {}) else None
    sources = (*a.sources, *b.sources)
    return TaskVector(a.space, a.method, tensors, low_rank, config, a.backbone or b.backbone, sources, a.origin)


def negate(v: TaskVector) -> TaskVector:
    """``-v``: forgetting a task (Ilharco et al., sec. 3)."""
    return v.scale(-1.0)


def scale(v: TaskVector, c: float) -> TaskVector:
    return v.scale(c)


# -- from a delta to its vector --------------------------------------------------------------------


def head_names(backbone: nn.Module) -> list[str]:
    """The classifier's parameter names on ``backbone``: the part of a delta file that is not the delta."""
    names = [n for n, _ in head_parameters(backbone)]
    if not names:
        raise UnsupportedModelError(
            f"{type(backbone).__name__} has no classifier parameters; create the backbone with num_classes > 0 "
            "(any number: each task's head replaces it)"
        )
    return names


def split_head(delta: TaskDelta, backbone: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(delta tensors, head tensors) of a task's delta."""
    heads = set(head_names(backbone))
    body = {k: v for k, v in delta.tensors.items() if k not in heads}
    head = {k: v for k, v in delta.tensors.items() if k in heads}
    return body, head


def check_backbone(delta: TaskDelta, backbone: nn.Module) -> None:
    if applied_method(backbone) is not None:
        raise VpeftError(
            f"the backbone has {applied_method(backbone).name} applied; task vectors are relative to the bare "
            "pretrained backbone: pass a fresh one"
        )
    ours = backbone_name(backbone)
    if not _same_backbone(delta.backbone, ours):
        raise IncompatibleDeltasError(
            f"{delta.source} was trained on {delta.backbone}, the backbone given is {ours}; task vectors are "
            "changes to the backbone the delta was trained on"
        )
    conflict = weights_conflict(delta.weights, weights_source(backbone))
    if conflict:
        raise IncompatibleDeltasError(
            f"{delta.source} was {conflict} (the backbone given): task vectors are changes to the weights the delta "
            "was trained on"
        )


def load_body(model: nn.Module, body: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy a delta's tensors (head excluded) into a model with its method applied; names and shapes must match."""
    params = dict(_method(model).delta_parameters(model))
    missing, unexpected = sorted(set(params) - set(body)), sorted(set(body) - set(params))
    if missing or unexpected:
        raise IncompatibleDeltasError(
            f"{source} does not match the {_method(model).name} delta on this backbone: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, t in body.items():
            p = params[name]
            if p.shape != t.shape:
                raise IncompatibleDeltasError(
                    f"{source}: {name} has shape {tuple(t.shape)}, this backbone's {tuple(p.shape)}"
                )
            p.copy_(t)


def identity_values(
    backbone: nn.Module, method: str, config: Mapping[str, Any], names: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The method's identity value of each delta tensor in ``names`` that has a non-zero one, float32 on the
    backbone's device: read from the method's layers (``Delta.identity_values``) applied to a copy of ``backbone``."""
    model = apply_method(copy.deepcopy(backbone), method, **config)
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, Delta):
            for leaf, value in module.identity_values().items():
                key = f"{path}.{leaf}" if path else leaf
                if key in names:
                    out[key] = value.detach().to(torch.float32).clone()
    return out


def task_vector(
    delta: TaskDelta | str | os.PathLike, backbone: nn.Module, space: str = "weights", factored: bool = True
) -> TaskVector:
    """The task vector of ``delta`` (a TaskDelta or a delta file) relative to the bare ``backbone``.

    ``space="weights"``: for mergeable methods, the change merging makes to each backbone parameter
    (merged minus base, float32; parameters left unchanged are omitted), LoRA's as its factors when
    ``factored`` (exactly the update merging adds). ``space="delta"``: the delta's own tensors minus the
    method's identity values (``identity_values``), kept as the vector's ``origin``. The head is never
    part of the vector (``task_head`` gives it). ``backbone`` is not modified.
    """
    if space not in SPACES:
        raise UnknownNameError("task vector space", space, SPACES)
    delta = as_task(delta)
    check_backbone(delta, backbone)
    body, _ = split_head(delta, backbone)
    name = delta.backbone or backbone_name(backbone)
    device = next(backbone.parameters()).device
    if space == "delta":
        origin = identity_values(backbone, delta.method, delta.config, body)
        tensors = {k: v.detach().to(device=device, dtype=torch.float32) - origin.get(k, 0.0) for k, v in body.items()}
        return TaskVector("delta", delta.method, tensors, {}, dict(delta.config), name, (delta.source,), origin)
    method = METHODS.get(delta.method)
    if not method.mergeable:
        raise NotMergeableError(
            f"{delta.method} has no weight-space task vector: its delta changes the computation, not the weights "
            f"({delta.source}); mergeable methods: {', '.join(mergeable_methods())}; use space='delta' for "
            "its own tensors"
        )
    tuned = apply_method(copy.deepcopy(backbone), delta.method, **delta.config)
    load_body(tuned, body, delta.source)
    low_rank: dict[str, LowRank] = {}
    if factored:
        module_names = {id(m): n for n, m in tuned.named_modules()}
        for host, child, lora in list(attached(tuned, LoRA)):
            weight = f"{module_names[id(host)]}.weight"
            low_rank[weight] = LowRank(lora._b().detach().float(), lora._a().detach().float())
            detach(host, child)
    merge_model(tuned)
    base = dict(backbone.named_parameters())
    heads = set(head_names(backbone))
    tensors = {}
    with torch.no_grad():
        for pname, p in tuned.named_parameters():
            if pname in heads:
                continue
            if pname not in base:  # a bias merging added to a bias-free layer (SSF): the base's is zero
                tensors[pname] = p.detach().float().clone()
            elif not torch.equal(p, base[pname]):
                tensors[pname] = p.detach().float() - base[pname].detach().float()
    return TaskVector("weights", delta.method, tensors, low_rank, dict(delta.config), name, (delta.source,))


def task_head(delta: TaskDelta | str | os.PathLike, backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The task's classification head from its delta, by the backbone's classifier names.

    Heads are never merged: each task keeps its own on the merged backbone (``put_head``).
    """
    delta = as_task(delta)
    names = head_names(backbone)
    _, head = split_head(delta, backbone)
    missing = sorted(set(names) - set(head))
    if missing:
        raise MissingHeadError(
            f"{delta.source} has no classification head (missing {missing}); its task cannot be evaluated on a "
            "merged backbone: save the delta with vpeft.save_delta, which keeps the head"
        )
    return head
