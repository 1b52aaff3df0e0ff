"""The method contract: a config dataclass plus a class that injects, lists and merges a delta.

Adding a method is one file here (a ``Method`` subclass registered by ``@METHODS.register``) plus
``conf/method/<name>.yaml`` whose fields are the config's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from vpeft.errors import ConfigError, NotMergeableError, UnknownNameError, UnsupportedModelError
from vpeft.layers.delta import Delta
from vpeft.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")

SUPPORTED = "timm VisionTransformer models (vit_*, deit_*, vit_*_dinov2 and their register variants)"


@dataclasses.dataclass
class MethodConfig:
    """A method's knobs. Subclasses add fields with defaults and validate in ``__post_init__``."""


class Method:
    """Base class of every method. Instances hold a validated config."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    mergeable: ClassVar[bool] = False
    merge_atol: ClassVar[float] = 1e-5  # fp32 tolerance between merged and unmerged outputs
    # config fields added after delta files were first written, with the value such an older file implies
    # (a file without the field was trained without what it switches on)
    legacy_defaults: ClassVar[dict[str, Any]] = {}
    # why runs of this method cannot share a training step with others (vpeft.engine.packed); "" : they can
    runs_alone: ClassVar[str] = ""
    # config fields that runs packed together may differ in: fixed scales their layers hold as Delta.per_run
    per_run_config: ClassVar[tuple[str, ...]] = ()
    # whether its delta reads the frozen host weights itself (DoRA's norms), so training keeps them in float32
    reads_frozen_weights: ClassVar[bool] = False

    def __init__(self, config: MethodConfig):
        self.config = config

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Method:
        fields = {f.name: f for f in dataclasses.fields(cls.Config)}
        for key, value in kwargs.items():
            if key not in fields:
                raise UnknownNameError(f"{cls.name} config field", key, list(fields))
            _check_scalar(cls.name, key, str(fields[key].type), value)
        try:
            return cls(cls.Config(**kwargs))
        except (TypeError, ValueError) as e:  # a value of the wrong kind that the checks above let through
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{cls.name}: invalid config {kwargs}: {e}") from None

    def config_dict(self) -> dict[str, Any]:
        """The config as plain JSON values (tuples become lists), as records and delta files hold it."""
        return json.loads(json.dumps(dataclasses.asdict(self.config)))

    def inject(self, model: nn.Module) -> None:
        """Add the delta modules to ``model`` in place; raise UnsupportedModelError if it can't."""

    def delta_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """The delta, excluding the head: by default the parameters of every ``Delta`` module."""
        for prefix, module in model.named_modules():
            if isinstance(module, Delta):
                for name, p in module.delta_parameters():
                    yield f"{prefix}.{name}" if prefix else name, p

    def export_delta(
        self, model: nn.Module, tensors: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors and config a delta file holds, given the trainable ``tensors``.

        By default both as they are. A method that trains through a reparameterisation (prefix
        tuning's MLP) returns the materialised delta and the config that loads it as such.
        """
        return tensors, self.config_dict()

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        """An extra term the training loop adds to each step's task loss (AdaLoRA's); None: none."""
        return None

    def on_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called by the training loop after each optimizer step, gradients still present.

        ``step`` counts the optimizer steps done (1 after the first), ``total_steps`` those of the run.
        """

    def merge(self, model: nn.Module) -> None:
        """Fold the delta into the frozen weights and remove the delta modules."""
        raise NotMergeableError(
            f"{self.name} cannot be merged into the backbone's weights (its delta changes the "
            f"computation, not just the weights); mergeable methods: {', '.join(mergeable_methods())}"
        )


_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_scalar(method: str, key: str, annotation: str, value: Any) -> None:
    """A field annotated int / float / bool / str (optionally ``| None``) gets a value of that kind."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return
    allowed = tuple(t for k in kinds for t in _SCALARS.get(k, ()))
    if not allowed or len(allowed) != sum(len(_SCALARS.get(k, ())) for k in kinds if k != "None"):
        return  # a container or another type: the config's own checks apply
    if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
        names = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
        wanted = " or ".join(names[k] for k in kinds if k != "None") + (" or null" if "None" in kinds else "")
        raise ConfigError(f"method.{key} of {method} must be {wanted}, got {value!r}")


def register(name: str):
    """Class decorator: register a Method under ``name`` (also its config file and result name)."""

    def decorator(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name)(cls)

    return decorator


def mergeable_methods() -> list[str]:
    return [n for n in METHODS.names() if METHODS.get(n).mergeable]


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``condition``: the one-line validation of config fields."""
    if not condition:
        raise ConfigError(message)


# -- the timm ViT structure methods rely on -------------------------------------------------------


def require(obj: Any, path: str, method: str, kind: type | tuple[type, ...] = nn.Module) -> Any:
    """Resolve dotted ``path`` on ``obj`` or raise an error naming what is missing."""
    cur = obj
    for part in path.split("."):
        if not hasattr(cur, part):
            raise UnsupportedModelError(
                f"{method} needs `{path}` but {type(obj).__name__} has no `{part}`; supported: {SUPPORTED}"
            )
        cur = getattr(cur, part)
    if not isinstance(cur, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise UnsupportedModelError(
            f"{method} needs `{path}` to be a {names}, found {type(cur).__name__}; supported: {SUPPORTED}"
        )
    return cur


def vit_blocks(model: nn.Module, method: str, parts: tuple[str, ...] = ()) -> list[nn.Module]:
    """The transformer blocks, each checked to have ``parts`` (e.g. ``attn.qkv``)."""
    blocks = require(model, "blocks", method, nn.Sequential)
    if len(blocks) == 0:
        raise UnsupportedModelError(f"{method} needs at least one block; {type(model).__name__} has none")
    for i, block in enumerate(blocks):
        for part in parts:
            require(block, part, f"{method} (block {i})")
    return list(blocks)


def embed_dim(model: nn.Module, method: str) -> int:
    dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", None)
    if not isinstance(dim, int):
        raise UnsupportedModelError(f"{method} needs `embed_dim` on the model; supported: {SUPPORTED}")
    return dim


def final_norm(model: nn.Module) -> nn.Module | None:
    """The last normalisation before the head: ``norm``, or ``fc_norm`` for average-pooled ViTs."""
    for name in ("norm", "fc_norm"):
        module = getattr(model, name, None)
        if module is not None and not isinstance(module, nn.Identity):
            return module
    return None


def head_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The classifier's parameters (tuple heads, as DeiT's distillation head, included)."""
    get = getattr(model, "get_classifier", None)
    if get is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no get_classifier(); vpeft needs a timm classifier model"
        )
    heads = get()
    heads = heads if isinstance(heads, tuple) else (heads,)
    ids = {id(p) for h in heads for p in h.parameters()}
    for name, p in model.named_parameters():
        if id(p) in ids:
            yield name, p
