"""Which trainable parameters weight decay applies to.

By default timm's rule, as timm's optimizer factory applies it (SSF and NOAH train through it):
one-dimensional tensors (biases, norm weights, SSF and IA3 scales), names ending in ``.bias`` and the
names the model's ``no_weight_decay()`` lists get no decay; every other trainable tensor decays.
Decaying a scale initialised at 1 pulls it toward 0, i.e. toward switching its channel off.
``decay_1d=True`` decays every trainable tensor alike (vpeft's behaviour before; V-PETL Bench and
PETL_Vision do this). Frozen parameters are never handed to the optimizer.
"""

from __future__ import annotations

from typing import Any

from timm.optim import param_groups_weight_decay
from torch import nn


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """The parameter names (or patterns) the model exempts from weight decay, as timm reads them."""
    get = getattr(model, "no_weight_decay", None)
    return set(get()) if callable(get) else set()


def param_groups(model: nn.Module, weight_decay: float | None, decay_1d: bool = False) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: only trainable tensors, each group with its own weight decay."""
    wd = float(weight_decay or 0.0)
    if decay_1d:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": wd}] if params else []
    return param_groups_weight_decay(model, wd, no_weight_decay_list=no_weight_decay_names(model))
