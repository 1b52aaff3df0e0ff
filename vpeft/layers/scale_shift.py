"""SSF: a learned per-channel scale and shift after a layer (Lian et al., 2022)."""

from __future__ import annotations

import torch
from torch import nn

from vpeft.layers.delta import OutputDelta


class ScaleShift(OutputDelta):
    """``out * scale + shift`` along the channel axis (last for tokens, 1 for NCHW conv maps)."""

    def __init__(self, dim: int, channel_axis: int = -1, init: str = "normal", device=None, dtype=None):
        super().__init__()
        self.channel_axis = channel_axis
        self.scale = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.shift = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
        if init == "normal":  # as the SSF code: scale ~ N(1, 0.02), shift ~ N(0, 0.02)
            nn.init.normal_(self.scale, mean=1.0, std=0.02)
            nn.init.normal_(self.shift, std=0.02)
        elif init != "identity":
            raise ValueError(f"init must be 'normal' or 'identity', got {init!r}")

    def identity_values(self) -> dict[str, torch.Tensor]:
        return {"scale": torch.ones_like(self.scale)}  # the shift's is zero

    def _view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.channel_axis in (-1, ndim - 1):
            return t
        return t.view(-1, *([1] * (ndim - 1 - self.channel_axis)))

    def forward(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # in the layer's dtype: under bf16 autocast an fp32 scale would promote every activation it
        # touches to fp32 (twice the memory, a cast back before the next matmul); one fused kernel
        scale = self._view(self.scale, out.ndim).to(out.dtype)
        return torch.addcmul(self._view(self.shift, out.ndim).to(out.dtype), out, scale)


def fold_affine(host: nn.Module, scale: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """Fold ``y -> y * scale + shift`` on output channels into ``host``'s weight and bias.

    Works for Linear, Conv and LayerNorm alike: each keeps output channels on axis 0 of ``weight``.
    A host without a bias gets one (the merged model stays a plain timm module).
    """
    weight = getattr(host, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise TypeError(f"cannot fold a scale into {type(host).__name__}: it has no weight to scale")
    with torch.no_grad():
        s = scale.detach().to(torch.float32)
        w = weight.to(torch.float32) * s.view(-1, *([1] * (weight.ndim - 1)))
        weight.copy_(w.to(weight.dtype))
        if shift is None and host.bias is None:
            return
        bias = host.bias.to(torch.float32) * s if host.bias is not None else torch.zeros_like(s)
        if shift is not None:
            bias = bias + shift.detach().to(torch.float32)
        if host.bias is None:
            host.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=False)
        else:
            host.bias.copy_(bias.to(host.bias.dtype))
