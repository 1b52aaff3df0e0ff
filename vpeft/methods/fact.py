"""FacT: factor-tuning, every weight update of the ViT drawn from factors shared across blocks.

Jie and Deng, "FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer", AAAI 2023
(arXiv:2212.03145), and its reference code (github.com/JieShibo/PETL-ViT, ``FacT/fact_tt.py`` and
``FacT/fact_tk.py``). The updates of q, k, v, o (``attn.proj``) and of the MLP's ``fc1``, ``fc2`` of
every block are tensorised into one ``d x d`` slice each (the MLP matrices, ``m = hidden / d`` times
wider, into ``m`` slices each) and factorised with a shared ``U`` (``d -> r``, nn.Linear's default
init) and ``V`` (``r -> d``, zero init, so the model is the backbone at init):

* ``variant: tt`` (FacT-TT, tensor train): ``dW = s * V Sigma U`` with a trained ``r x r`` core per
  slice (per block: q, k, v, o, and ``m r x r`` for fc1, ``r x m r`` for fc2).
* ``variant: tk`` (FacT-TK, Tucker): the cores are ``C x_3 P[:, slot]`` with a shared ``r x r x r``
  core ``C`` and a shared ``r x (depth (4 + 2 m))`` factor ``P`` (both Xavier-uniform), one column
  per slice, in the code's order (per block: q, k, v, o, then ``m`` fc1 and ``m`` fc2 slices). For
  fc1 and fc2 the code reshapes the ``r x r x m`` cores to ``r x m r`` (``FacTc[:, :, :4].reshape(dim,
  4 * dim)``), so each of fc1's ``m`` chunks reads ``r`` consecutive entries of that interleaved
  layout rather than one slot's slice; followed here, so a FacT-TK delta computes what the code's does.

As in the code, each update is computed factor by factor on the layer's input with dropout (0.1) on
the core's output (``V dropout(Sigma U x)``), scaled by ``s`` and added to the layer's output; fc1's
``m r`` core outputs become its ``m`` chunks of ``d`` hidden units, fc2's input chunks are each
projected by ``U`` before its core. The updates are linear in the weights, so merging adds
``dW`` to each layer's weight.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.errors import UnsupportedModelError
from vpeft.layers import attach, attached, detach
from vpeft.layers.delta import Delta, OutputDelta
from vpeft.methods._base import SUPPORTED, Method, MethodConfig, check, embed_dim, register, require, vit_blocks

VARIANTS = ("tt", "tk")
LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@dataclasses.dataclass
class FacTConfig(MethodConfig):
    variant: str = "tt"  # tt: FacT-TT, tk: FacT-TK
    rank: int = 8
    scale: float = 1.0  # s, chosen per task in the paper (0.01 ... 100)
    dropout: float = 0.1  # on the cores' outputs, as the reference code

    def __post_init__(self):
        check(self.variant in VARIANTS, f"fact variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        check(
            isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
            f"fact rank must be a positive integer, got {self.rank!r}",
        )
        check(0 <= self.dropout < 1, f"fact dropout must be in [0, 1), got {self.dropout!r}")
        check(
            math.isfinite(self.scale) and self.scale > 0, f"fact scale must be a finite number > 0, got {self.scale!r}"
        )


def _linear_init(t: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default weight init (Kaiming-uniform, a = sqrt(5)), as the code's bias-free layers."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class FacTFactors(Delta):
    """The factors every block shares: ``U`` ``[r, d]``, ``V`` ``[d, r]``; for TK also ``C`` ``[r, r, r]``, ``P``."""

    def __init__(self, dim: int, rank: int, variant: str, slots: int, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim, self.rank, self.variant = dim, rank, variant
        self.U = nn.Parameter(_linear_init(torch.empty(rank, dim, **dd)))
        self.V = nn.Parameter(torch.zeros(dim, rank, **dd))
        if variant == "tk":
            self.C = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, rank, rank, **dd)))
            self.P = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, slots, **dd)))

    def tucker(self, start: int, count: int) -> torch.Tensor:
        """``C @ P[:, start:start + count]``: ``[r, r, count]``, slice ``j`` the core of slot ``start + j``."""
        return self.C @ self.P[:, start : start + count]

    def extra_repr(self) -> str:
        return f"variant={self.variant}, dim={self.dim}, rank={self.rank}"


class FacTSite(OutputDelta):
    """The update of one layer of one block: ``kind`` is qkv, proj, fc1 or fc2.

    ``cores()`` gives each slice's core ``M`` in the form ``t = M u`` (``u = U x``): TT's are parameters
    here, TK's are computed from the shared ``C`` and ``P`` at this layer's slots.
    """

    per_run = ("scale",)

    def __init__(self, factors: FacTFactors, kind: str, mult: int, slot: int, scale: float, dropout: float):
        super().__init__()
        self.__dict__["factors"] = factors  # shared: a plain reference, its parameters belong to model.fact
        self.kind, self.mult, self.slot, self.scale = kind, mult, slot, scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        r = factors.rank
        if factors.variant == "tt":
            w = factors.U
            dd = {"device": w.device, "dtype": w.dtype}
            shapes = {"qkv": {"q": (r, r), "k": (r, r), "v": (r, r)}, "proj": {"o": (r, r)}}
            shapes |= {"fc1": {"fc1": (mult * r, r)}, "fc2": {"fc2": (r, mult * r)}}
            for name, shape in shapes[kind].items():
                self.register_parameter(name, nn.Parameter(_linear_init(torch.empty(*shape, **dd))))

    def cores(self) -> list[torch.Tensor]:
        f, r, m = self.factors, self.factors.rank, self.mult
        if f.variant == "tt":
            names = {"qkv": ("q", "k", "v"), "proj": ("o",), "fc1": ("fc1",), "fc2": ("fc2",)}[self.kind]
            return [getattr(self, n) for n in names]
        if self.kind in ("qkv", "proj"):
            c = f.tucker(self.slot, 3 if self.kind == "qkv" else 1)
            return [c[:, :, j].t() for j in range(c.shape[-1])]  # the code's u @ c_j
        c = f.tucker(self.slot, m).reshape(r, m * r)  # the code's FacTc[:, :, :4].reshape(dim, 4 * dim)
        return [c.t()] if self.kind == "fc1" else [c]  # fc1: u @ c; fc2: u_chunks @ c.t()

    def forward(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        f, r, m = self.factors, self.factors.rank, self.mult
        U, V = f.U.to(inp.dtype), f.V.to(inp.dtype)
        cores = [c.to(inp.dtype) for c in self.cores()]
        if self.kind == "fc2":
            u = F.linear(inp.unflatten(-1, (m, f.dim)), U).flatten(-2)  # each chunk of d hidden units by U
            delta = F.linear(self.dropout(F.linear(u, cores[0])), V)
        else:
            u = F.linear(inp, U)
            if self.kind == "fc1":  # m r core outputs -> m chunks of d hidden units
                delta = F.linear(self.dropout(F.linear(u, cores[0])).unflatten(-1, (m, r)), V).flatten(-2)
            else:
                delta = torch.cat([F.linear(self.dropout(F.linear(u, c)), V) for c in cores], dim=-1)
        return out + (delta * self.scale).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``dW`` of the host layer (float32): ``s V M U`` per slice, placed as the forward pass places it."""
        f, r, m = self.factors, self.factors.rank, self.mult
        U, V = f.U.float(), f.V.float()
        cores = [c.float() for c in self.cores()]
        if self.kind == "fc1":
            w = torch.cat([V @ cores[0][i * r : (i + 1) * r] @ U for i in range(m)], dim=0)
        elif self.kind == "fc2":
            w = torch.cat([V @ cores[0][:, i * r : (i + 1) * r] @ U for i in range(m)], dim=1)
        else:
            w = torch.cat([V @ c @ U for c in cores], dim=0)
        return w * self.scale

    def extra_repr(self) -> str:
        return f"kind={self.kind}, slot={self.slot}, scale={self.scale:g}"


@register("fact")
class FacT(Method):
    Config = FacTConfig
    per_run_config = ("scale",)
    mergeable = True
    merge_atol = 1e-5

    def inject(self, model: nn.Module) -> None:
        cfg: FacTConfig = self.config
        d = embed_dim(model, self.name)
        blocks = vit_blocks(model, self.name, LAYERS)
        layers = []
        for i, block in enumerate(blocks):
            where = f"{self.name} (block {i})"
            qkv, proj, fc1, fc2 = (require(block, p, where, nn.Linear) for p in LAYERS)
            hidden = fc1.out_features
            if qkv.out_features != 3 * d or proj.out_features != d or hidden % d or fc2.in_features != hidden:
                raise UnsupportedModelError(
                    f"{where} needs qkv {d} -> {3 * d}, proj {d} -> {d} and an MLP {d} -> k*{d} -> {d}; found "
                    f"qkv -> {qkv.out_features}, proj -> {proj.out_features}, fc1 -> {hidden}, fc2 {fc2.in_features} "
                    f"->; supported: {SUPPORTED}"
                )
            layers.append((qkv, proj, fc1, fc2, hidden // d))
        mults = {m for *_, m in layers}
        if len(mults) != 1:
            raise UnsupportedModelError(f"{self.name} shares its factors across blocks: MLP widths differ ({mults})")
        m = mults.pop()
        per_block = 4 + 2 * m  # slots: q, k, v, o, m fc1 slices, m fc2 slices
        w = blocks[0].attn.qkv.weight
        factors = FacTFactors(d, cfg.rank, cfg.variant, per_block * len(blocks), device=w.device, dtype=w.dtype)
        model.add_module("fact", factors)
        for i, (qkv, proj, fc1, fc2, _) in enumerate(layers):
            base = i * per_block
            for host, kind, slot in ((qkv, "qkv", base), (proj, "proj", base + 3), (fc1, "fc1", base + 4)):
                attach(host, "fact", FacTSite(factors, kind, m, slot, cfg.scale, cfg.dropout))
            attach(fc2, "fact", FacTSite(factors, "fc2", m, base + 4 + m, cfg.scale, cfg.dropout))

    def merge(self, model: nn.Module) -> None:
        sites = list(attached(model, FacTSite))
        with torch.no_grad():
            updates = [(host, name, site.delta_weight()) for host, name, site in sites]
            for host, name, dw in updates:
                host.weight.add_(dw.to(host.weight.dtype))
                detach(host, name)
        if "fact" in model._modules:
            del model._modules["fact"]
