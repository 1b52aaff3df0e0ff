"""LoRA: a low-rank update B @ A on slices of a linear layer's output (Hu et al., 2022)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.layers.delta import OutputDelta


class LoRA(OutputDelta):
    """Adds ``scaling * B_s @ A_s @ x`` to the output rows of each segment ``s``.

    One segment covers a whole layer (proj, fc1, fc2); on timm's fused ``attn.qkv`` the segments
    ``q``, ``k``, ``v`` are its three thirds, so LoRA on q and v leaves k untouched, as in the paper.
    A is Kaiming-uniform, B zero, so the layer is unchanged at init.
    """

    per_run = ("scaling",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        segments: dict[str, tuple[int, int]],
        r: int,
        alpha: float,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.scaling = alpha / r
        self.segments = dict(sorted(segments.items(), key=lambda kv: kv[1][0]))
        dd = {"device": device, "dtype": dtype}
        self.A = nn.ParameterDict({s: nn.Parameter(torch.empty(r, in_features, **dd)) for s in self.segments})
        self.B = nn.ParameterDict(
            {s: nn.Parameter(torch.zeros(end - start, r, **dd)) for s, (start, end) in self.segments.items()}
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for a in self.A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def _a(self) -> torch.Tensor:
        """A of every segment stacked in segment order (ParameterDict sorts its keys: q, k, v would be k, q, v)."""
        return torch.cat([self.A[s] for s in self.segments]) if len(self.A) > 1 else next(iter(self.A.values()))

    def _b(self) -> torch.Tensor:
        """B of every segment placed at its output rows, block-diagonal over the ranks, times scaling."""
        return self._placed_b() * self.scaling

    def _placed_b(self) -> torch.Tensor:
        """B of every segment placed at its output rows, block-diagonal over the ranks (no scaling); B itself when
        one segment covers every output row (no copy)."""
        if len(self.B) == 1 and next(iter(self.segments.values())) == (0, self.out_features):
            return next(iter(self.B.values()))
        k, rows, pos = len(self.B), [], 0
        for i, (s, (start, end)) in enumerate(self.segments.items()):
            b = self.B[s]
            if start > pos:
                rows.append(b.new_zeros(start - pos, k * self.r))
            rows.append(F.pad(b, (i * self.r, (k - 1 - i) * self.r)))
            pos = end
        if pos < self.out_features:
            rows.append(rows[-1].new_zeros(self.out_features - pos, k * self.r))
        return torch.cat(rows)

    def delta_weight(self) -> torch.Tensor:
        """The full-size update that merging adds to the host's weight."""
        return self._b().float() @ self._a().float()

    def forward(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(inp), self._a())
        scaling = self.scaling
        if isinstance(scaling, torch.Tensor):  # each packed run's own alpha / r (Delta.per_run)
            h, scaling = h * scaling, 1.0
        # out + scaling * h @ B^T as one GEMM whose epilogue scales and adds ``out``: no pass over the output or B
        b = self._placed_b()
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=scaling).view(
            out.shape
        )

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, segments={self.segments}"
