"""Adapter+: a bottleneck adapter after each block with channel-wise scaling and Houlsby init.

Steitz and Roth, "Adapters Strike Back", CVPR 2024 (arXiv:2406.06820), and its reference code
(github.com/visinf/adapter_plus: ``adapter_plus/vit_adapter.py``, ``conf/adapter/adapter_plus.yaml``).
The paper's best configuration, Adapter+, is the Post-Adapter: after the block's FFN and its
residual sum, the block output ``x`` becomes

    x + s * drop_path(W_up GELU(W_down x + b_down) + b_up)

with a trained scaling vector ``s`` (one per channel, initialised to ones), no layer norm inside the
adapter, biases, both projections initialised as Houlsby et al. (truncated normal, std 0.01, cut at
two standard deviations; zero biases) and stochastic depth 0.1 on the adapter branch during
training (the code's ``drop_path``; no dropout). As the up-projection does not start at zero the
model differs slightly from the backbone at init. The GELU makes it non-mergeable.
"""

from __future__ import annotations

import dataclasses

import torch
from timm.layers import DropPath
from torch import nn

from vpeft.layers import attach
from vpeft.layers.adapter import ACTIVATIONS
from vpeft.layers.delta import OutputDelta
from vpeft.methods._base import Method, MethodConfig, check, embed_dim, register, vit_blocks

HOULSBY_STD = 0.01  # the paper's value (the code notes Houlsby's own code used 0.001)


@dataclasses.dataclass
class AdapterPlusConfig(MethodConfig):
    bottleneck: int = 8
    act: str = "gelu"
    drop_path: float = 0.1  # stochastic depth on the adapter branch, as the code's base_adapter.yaml

    def __post_init__(self):
        check(
            isinstance(self.bottleneck, int) and not isinstance(self.bottleneck, bool) and self.bottleneck > 0,
            f"adapter_plus bottleneck must be a positive integer, got {self.bottleneck!r}",
        )
        check(self.act in ACTIVATIONS, f"adapter_plus act must be one of {', '.join(ACTIVATIONS)}, got {self.act!r}")
        check(0 <= self.drop_path < 1, f"adapter_plus drop_path must be in [0, 1), got {self.drop_path!r}")


class PostAdapter(OutputDelta):
    """Rewrites a block's output ``x`` as ``x + scaling * drop_path(up(act(down(x))))``."""

    def __init__(self, dim: int, bottleneck: int, act: str, drop_path: float, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.down = nn.Linear(dim, bottleneck, **dd)
        self.act = ACTIVATIONS[act]()
        self.up = nn.Linear(bottleneck, dim, **dd)
        self.scaling = nn.Parameter(torch.ones(dim, **dd))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        for layer in (self.down, self.up):
            nn.init.trunc_normal_(layer.weight, std=HOULSBY_STD, a=-2 * HOULSBY_STD, b=2 * HOULSBY_STD)
            nn.init.zeros_(layer.bias)

    def forward(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h = self.drop_path(self.up(self.act(self.down(out))))
        return out + (h * self.scaling.to(h.dtype)).to(out.dtype)


@register("adapter_plus")
class AdapterPlus(Method):
    Config = AdapterPlusConfig

    def inject(self, model: nn.Module) -> None:
        cfg: AdapterPlusConfig = self.config
        dim = embed_dim(model, self.name)
        for block in vit_blocks(model, self.name):
            weight = next(block.parameters())
            adapter = PostAdapter(dim, cfg.bottleneck, cfg.act, cfg.drop_path, device=weight.device, dtype=weight.dtype)
            attach(block, "adapter_plus", adapter)
