"""RepAdapter: linear grouped adapters before the attention and the MLP, re-parameterised away.

Luo et al., "Towards Efficient Visual Adaption via Structural Re-parameterization", arXiv:2302.08106
(2023), and its reference code (github.com/luogen1996/RepAdapter, ``repadapter.py``):

    f(x) = x + s * (W_u (W_d x + b_d) + b_u)

``W_d`` a dense ``d -> h`` projection (Xavier-uniform, zero bias), ``W_u`` a group-wise ``h -> d``
projection (``groups`` blocks, zero init, zero bias; a ``Conv1d(h, d, 1, groups=2)`` in the code),
no non-linearity in between, dropout 0.1 on the hidden units during training, and a fixed scale
``s`` chosen per task. The code's "repblock" variant (its VTAB-1k results) applies one adapter to
``norm1``'s output, the input of the attention's ``qkv``, and one to ``norm2``'s output, the input of
the MLP's ``fc1``; here each is a delta on that norm's output (which feeds only that layer).

Being linear, f folds into the layer that follows: ``W (I + s W_u W_d) x + W s (W_u b_d + b_u) + b``,
so merging rewrites ``qkv`` and ``fc1`` (weights and biases; a bias-free ``qkv`` gains one) and the
model is the plain backbone again.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from vpeft.errors import UnsupportedModelError
from vpeft.layers import attach, attached, detach
from vpeft.layers.delta import OutputDelta
from vpeft.methods._base import SUPPORTED, Method, MethodConfig, check, register, require, vit_blocks

# adapter site (a norm) -> the linear layer its output feeds, which the adapter folds into
SITES: dict[str, str] = {"norm1": "attn.qkv", "norm2": "mlp.fc1"}


@dataclasses.dataclass
class RepAdapterConfig(MethodConfig):
    dim: int = 8  # hidden width h (the code's ``dim``)
    groups: int = 2  # groups of the up-projection (the code's RepAdapter default)
    scale: float = 1.0  # s, chosen per task in the paper (the code's configs: 0.1 ... 10)
    dropout: float = 0.1

    def __post_init__(self):
        check(
            isinstance(self.dim, int) and not isinstance(self.dim, bool) and self.dim > 0,
            f"repadapter dim must be a positive integer, got {self.dim!r}",
        )
        check(
            isinstance(self.groups, int) and not isinstance(self.groups, bool) and self.groups > 0,
            f"repadapter groups must be a positive integer, got {self.groups!r}",
        )
        check(self.dim % self.groups == 0, f"repadapter dim ({self.dim}) must be a multiple of groups ({self.groups})")
        check(0 <= self.dropout < 1, f"repadapter dropout must be in [0, 1), got {self.dropout!r}")
        check(
            math.isfinite(self.scale) and self.scale > 0,
            f"repadapter scale must be a finite number > 0, got {self.scale!r}",
        )


class RepAdapter(OutputDelta):
    """``out + s * (up(dropout(down(out))))`` with a group-wise ``up``: ``[d, h / groups]`` per output channel."""

    per_run = ("scale",)

    def __init__(self, features: int, dim: int, groups: int, scale: float, dropout: float, device=None, dtype=None):
        super().__init__()
        if features % groups:
            raise ValueError(f"the width {features} is not a multiple of groups={groups}")
        dd = {"device": device, "dtype": dtype}
        self.features, self.dim, self.groups, self.scale = features, dim, groups, scale
        self.down = nn.Linear(features, dim, **dd)
        self.up_weight = nn.Parameter(torch.zeros(features, dim // groups, **dd))
        self.up_bias = nn.Parameter(torch.zeros(features, **dd))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def up_dense(self) -> torch.Tensor:
        """The group-wise up-projection as a dense block-diagonal ``[d, h]`` matrix."""
        g, d, h = self.groups, self.features, self.dim
        blocks = self.up_weight.view(g, d // g, h // g)
        return torch.block_diag(*blocks.unbind(0))

    def forward(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.down(out))
        g = self.groups
        # grouped 1x1 conv: group i of the hidden units feeds group i of the output channels
        hg = h.unflatten(-1, (g, self.dim // g))  # [..., g, h/g]
        wg = self.up_weight.view(g, self.features // g, self.dim // g).to(h.dtype)  # [g, d/g, h/g]
        u = torch.einsum("...gk,gok->...go", hg, wg).flatten(-2) + self.up_bias.to(h.dtype)
        return out + (u * self.scale).to(out.dtype)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, c)`` with ``f(x) = M x + c`` (float32): ``M = I + s W_u W_d``, ``c = s (W_u b_d + b_u)``."""
        up = self.up_dense().float()
        m = torch.eye(self.features, device=up.device) + self.scale * up @ self.down.weight.float()
        c = self.scale * (up @ self.down.bias.float() + self.up_bias.float())
        return m, c

    def extra_repr(self) -> str:
        return f"features={self.features}, dim={self.dim}, groups={self.groups}, scale={self.scale:g}"


def fold_input_affine(host: nn.Linear, m: torch.Tensor, c: torch.Tensor) -> None:
    """Fold ``x -> M x + c`` on the inputs of ``host``: ``W' = W M``, ``b' = W c + b`` (a bias is added if none)."""
    with torch.no_grad():
        w = host.weight.float()
        bias = w @ c + (host.bias.float() if host.bias is not None else 0.0)
        host.weight.copy_((w @ m).to(host.weight.dtype))
        if host.bias is None:
            host.bias = nn.Parameter(bias.to(host.weight.dtype), requires_grad=False)
        else:
            host.bias.copy_(bias.to(host.bias.dtype))


@register("repadapter")
class RepAdapterMethod(Method):
    Config = RepAdapterConfig
    per_run_config = ("scale",)
    mergeable = True
    merge_atol = 1e-5

    def _sites(self, model: nn.Module) -> list[tuple[nn.Module, nn.Linear]]:
        """(norm, the linear layer it feeds) for every site of every block, checked."""
        parts = tuple(SITES) + tuple(SITES.values())
        pairs = []
        for i, block in enumerate(vit_blocks(model, self.name, parts)):
            for norm_path, linear_path in SITES.items():
                norm = require(block, norm_path, f"{self.name} (block {i})")
                linear = require(block, linear_path, f"{self.name} (block {i})", nn.Linear)
                if isinstance(norm, nn.Identity):
                    raise UnsupportedModelError(
                        f"{self.name} (block {i}) adapts `{norm_path}`'s output, which is an Identity; "
                        f"supported: {SUPPORTED}"
                    )
                pairs.append((norm, linear))
        return pairs

    def inject(self, model: nn.Module) -> None:
        cfg: RepAdapterConfig = self.config
        for norm, linear in self._sites(model):
            adapter = RepAdapter(
                linear.in_features,
                cfg.dim,
                cfg.groups,
                cfg.scale,
                cfg.dropout,
                device=linear.weight.device,
                dtype=linear.weight.dtype,
            )
            attach(norm, "repadapter", adapter)

    def merge(self, model: nn.Module) -> None:
        pairs = {id(norm): linear for norm, linear in self._sites(model)}
        for norm, name, adapter in list(attached(model, RepAdapter)):
            m, c = adapter.affine()
            fold_input_affine(pairs[id(norm)], m, c)
            detach(norm, name)
