"""Bottleneck adapters: down-projection, non-linearity, up-projection."""

from __future__ import annotations

import math

import torch
from torch import nn

from vpeft.layers.delta import Delta


class Bottleneck(Delta):
    """``scale * up(dropout(act(down(x))))``, with up zero-initialised so it starts at 0.

    ``down`` is Kaiming-uniform with zero bias, as the AdaptFormer code's "lora" init. ``scale`` is
    a fixed float, or a learned scalar starting at 1.0 when ``learnable_scale`` is set.
    """

    per_run = ("scale",)  # when a fixed float

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        act: type[nn.Module] = nn.ReLU,
        dropout: float = 0.0,
        scale: float = 1.0,
        learnable_scale: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.down = nn.Linear(dim, bottleneck, **dd)
        self.act = act()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(bottleneck, dim, **dd)
        if learnable_scale:
            self.scale = nn.Parameter(torch.ones(1, **dd))
        else:
            self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x)))) * self.scale
