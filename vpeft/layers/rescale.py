"""Learned rescaling vectors on slices of a layer's output (IA3, Liu et al., 2022)."""

from __future__ import annotations

import torch
from torch import nn

from vpeft.layers.delta import OutputDelta


class Rescale(OutputDelta):
    """Multiplies the output channels of each segment ``s`` by a learned vector, ones elsewhere.

    One segment covers a whole layer (the MLP's hidden activation); on timm's fused ``attn.qkv``
    the segments ``k`` and ``v`` are its second and third thirds, so queries are left alone. The
    vectors start at one, so the layer is unchanged at init; each is a parameter named after its
    segment (``attn.qkv.ia3.k``).
    """

    def __init__(self, features: int, segments: dict[str, tuple[int, int]], device=None, dtype=None):
        super().__init__()
        self.features = features
        self.segments = dict(sorted(segments.items(), key=lambda kv: kv[1][0]))
        pos = 0
        for name, (start, end) in self.segments.items():
            if not pos <= start < end <= features:
                raise ValueError(f"segment {name!r} = {(start, end)} overlaps or exceeds {features} channels")
            pos = end
            self.register_parameter(name, nn.Parameter(torch.ones(end - start, device=device, dtype=dtype)))

    def scale(self) -> torch.Tensor:
        """The full-length vector: the segments' parameters at their channels, ones elsewhere."""
        pieces, pos = [], 0
        for name, (start, end) in self.segments.items():
            p = getattr(self, name)
            if start > pos:
                pieces.append(p.new_ones(start - pos))
            pieces.append(p)
            pos = end
        if pos < self.features:
            pieces.append(pieces[-1].new_ones(self.features - pos))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def forward(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out * self.scale().to(out.dtype)

    def identity_values(self) -> dict[str, torch.Tensor]:
        return {name: torch.ones_like(getattr(self, name)) for name in self.segments}

    def extra_repr(self) -> str:
        return f"features={self.features}, segments={self.segments}"


def fold_input_scale(host: nn.Linear, scale: torch.Tensor) -> None:
    """Fold ``x -> x * scale`` on the input features of ``host`` into its weight's columns.

    ``host(x * s) = (W diag(s)) x + b``: only the weight changes, the bias does not.
    """
    if not isinstance(host, nn.Linear):
        raise TypeError(f"cannot fold an input scale into {type(host).__name__}: it is not an nn.Linear")
    if scale.shape != (host.in_features,):
        raise ValueError(f"scale has shape {tuple(scale.shape)}, {type(host).__name__} has {host.in_features} inputs")
    with torch.no_grad():
        w = host.weight.to(torch.float32) * scale.detach().to(torch.float32).view(1, -1)
        host.weight.copy_(w.to(host.weight.dtype))
