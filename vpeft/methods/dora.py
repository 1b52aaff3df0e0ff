"""DoRA: weight-decomposed low-rank adaptation on the layers LoRA targets.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024 (arXiv:2402.09353), eq. (5):

    W' = m * (W0 + B A) / ||W0 + B A||_c

``||.||_c`` is the norm of each output channel's weight vector (over the input dimension: one row of
a PyTorch ``[out, in]`` weight), ``m`` a trained magnitude per output channel initialised to
``||W0||_c``, and ``B A`` LoRA's update with its scale ``alpha / r`` (B zero, so W' = W0 at init).

Targets, rank, alpha and dropout are LoRA's (``vpeft.methods.lora``): on timm's fused ``attn.qkv``
each adapted third (q, v by default) gets its own magnitude and normalisation, the other rows stay
as they are. ``detach_norm`` (default true) treats the norm as a constant in the backward pass, as
the paper's section 4.3 proposes to save memory and as Hugging Face peft's implementation
(``peft.tuners.lora.dora.DoraLinearLayer``) always does; false back-propagates through it. The
forward pass is the same either way, and so is the merged weight ``m * V / ||V||_c``.

Computed as peft does, on the frozen layer's output ``out = W0 x + b``:
``out + (g - 1) * (out - b) + g * (B A x) * alpha / r`` with ``g = m / ||W0 + B A alpha / r||_c``
(with dropout active in training the ``W0 x`` term is recomputed on the dropped-out input, as peft).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.layers import LoRA, attach, attached, detach
from vpeft.layers.delta import OutputDelta
from vpeft.methods._base import Method, register
from vpeft.methods.lora import LoRAConfig, LoRAMethod


@dataclasses.dataclass
class DoRAConfig(LoRAConfig):
    detach_norm: bool = True  # the paper's section 4.3 and peft: no gradient through ||W0 + BA||_c


def _row_norm(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(weight, dim=1)


class DoRA(OutputDelta):
    """DoRA on the output segments of one linear layer, adopting a freshly initialised ``LoRA``'s factors.

    Parameters: ``A.<seg>`` ``[r, in]``, ``B.<seg>`` ``[rows, r]`` (LoRA's), ``m.<seg>`` ``[rows]``.
    The host layer is held as a plain reference (its weight is read, never trained).
    """

    per_run = ("scaling",)

    def __init__(self, host: nn.Linear, lora: LoRA, detach_norm: bool = True):
        super().__init__()
        self.__dict__["host"] = host
        self.in_features, self.out_features, self.r = lora.in_features, lora.out_features, lora.r
        self.scaling = lora.scaling
        self.segments = dict(lora.segments)
        self.A, self.B, self.dropout = lora.A, lora.B, lora.dropout
        self.detach_norm = detach_norm
        with torch.no_grad():
            self.m = nn.ParameterDict(
                {
                    s: nn.Parameter(_row_norm(host.weight[a:b].float()).to(host.weight.dtype))
                    for s, (a, b) in self.segments.items()
                }
            )

    def identity_values(self) -> dict[str, torch.Tensor]:
        """``m = ||W0||`` per row (with B = 0) leaves the layer unchanged; A and B's value is zero."""
        return {f"m.{s}": _row_norm(self.host.weight[a:b].float()) for s, (a, b) in self.segments.items()}

    def direction(self, s: str) -> torch.Tensor:
        """``V = W0 + B A alpha / r`` of segment ``s``, in float32."""
        a, b = self.segments[s]
        w = self.host.weight[a:b].float()
        return w + self.scaling * (self.B[s].float() @ self.A[s].float())

    def gain(self, s: str) -> torch.Tensor:
        """``m / ||V||_c`` of segment ``s`` (float32), the norm detached when ``detach_norm``."""
        with torch.autocast(self.host.weight.device.type, enabled=False):
            norm = _row_norm(self.direction(s))
        if self.detach_norm:
            norm = norm.detach()
        return self.m[s].float() / norm

    def merged_weight(self, s: str) -> torch.Tensor:
        """``m * V / ||V||_c``: the rows of segment ``s`` that merging writes into the host (float32)."""
        v = self.direction(s)
        return (self.m[s].float() / _row_norm(v)).unsqueeze(1) * v

    def forward(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        x = self.dropout(inp)
        dropped = self.training and not isinstance(self.dropout, nn.Identity)
        pieces, pos = [], 0
        for s, (a, b) in self.segments.items():
            if a > pos:
                pieces.append(out[..., pos:a])
            o = out[..., a:b]
            if dropped:
                base = F.linear(x, self.host.weight[a:b].to(x.dtype))
            elif self.host.bias is not None:
                base = o - self.host.bias[a:b].to(o.dtype)
            else:
                base = o
            low = F.linear(F.linear(x, self.A[s]), self.B[s]) * self.scaling
            g = self.gain(s)
            pieces.append((o + (g - 1).to(o.dtype) * base + g.to(o.dtype) * low.to(o.dtype)).to(out.dtype))
            pos = b
        if pos < self.out_features:
            pieces.append(out[..., pos:])
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, segments={self.segments}, detach_norm={self.detach_norm}"


@register("dora")
class DoRAMethod(Method):
    Config = DoRAConfig
    per_run_config = ("alpha",)
    mergeable = True
    reads_frozen_weights = True  # the column norms of W0 + scale B A, in float32
    merge_atol = 1e-5

    def inject(self, model: nn.Module) -> None:
        cfg: DoRAConfig = self.config
        lora_fields = {f.name for f in dataclasses.fields(LoRAConfig)}
        lora_cfg = LoRAConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in lora_fields})
        LoRAMethod(lora_cfg).inject(model)  # LoRA's targets and factor init; each LoRA is then wrapped
        for host, name, lora in list(attached(model, LoRA)):
            detach(host, name)
            attach(host, "dora", DoRA(host, lora, cfg.detach_norm))

    def merge(self, model: nn.Module) -> None:
        for host, name, dora in list(attached(model, DoRA)):
            with torch.no_grad():
                for s, (a, b) in dora.segments.items():
                    host.weight[a:b] = dora.merged_weight(s).to(host.weight.dtype)
            detach(host, name)
