"""AdaptFormer: a scaled bottleneck in parallel with each block's MLP (Chen et al., 2022)."""

from __future__ import annotations

import dataclasses
import math

import torch
from timm.models.vision_transformer import Block
from torch import nn

from vpeft.errors import UnsupportedModelError
from vpeft.layers import Bottleneck
from vpeft.methods._base import SUPPORTED, Method, MethodConfig, check, embed_dim, register, vit_blocks


@dataclasses.dataclass
class AdaptFormerConfig(MethodConfig):
    bottleneck: int = 64
    scale: float = 0.1
    learnable_scale: bool = False  # a trained scalar per block, starting at 1.0 as the official code
    dropout: float = 0.1

    def __post_init__(self):
        check(
            isinstance(self.bottleneck, int) and self.bottleneck > 0,
            f"adaptformer bottleneck must be a positive integer, got {self.bottleneck!r}",
        )
        check(0 <= self.dropout < 1, f"adaptformer dropout must be in [0, 1), got {self.dropout!r}")
        check(
            math.isfinite(self.scale) and self.scale > 0,
            f"adaptformer scale must be a finite number > 0, got {self.scale!r}",
        )


class AdaptFormerBlock(nn.Module):
    """A timm ``Block`` whose children keep their names, plus ``adapter`` beside the MLP.

    As the official code: the adapter reads the hidden state after the attention residual (before
    norm2) and its output joins the MLP branch's (after layer scale and drop path) before the
    residual sum.
    """

    def __init__(self, block: Block, adapter: Bottleneck):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.adapter = adapter

    def forward(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), **attn_kwargs)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) + self.adapter(x)


@register("adaptformer")
class AdaptFormer(Method):
    Config = AdaptFormerConfig
    per_run_config = ("scale",)

    def inject(self, model: nn.Module) -> None:
        cfg: AdaptFormerConfig = self.config
        blocks = vit_blocks(model, "adaptformer")
        dim = embed_dim(model, "adaptformer")
        for i, block in enumerate(blocks):
            if type(block) is not Block:
                raise UnsupportedModelError(
                    f"adaptformer rewrites timm's pre-norm Block; block {i} is a {type(block).__name__}; "
                    f"supported: {SUPPORTED}"
                )
            weight = block.mlp.fc1.weight
            adapter = Bottleneck(
                dim,
                cfg.bottleneck,
                nn.ReLU,
                cfg.dropout,
                cfg.scale,
                cfg.learnable_scale,
                device=weight.device,
                dtype=weight.dtype,
            )
            model.blocks[i] = AdaptFormerBlock(block, adapter)
