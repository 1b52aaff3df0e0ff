"""Visual prompts: learned tokens inserted after a ViT's prefix tokens (Jia et al., 2022)."""

from __future__ import annotations

import math

import torch
from torch import nn

from vpeft.layers import noise
from vpeft.layers.delta import Delta


class PromptedBlocks(nn.Sequential, Delta):
    """A ViT's block stack with prompts, keeping the blocks under their own names.

    The first block sees ``[prefix, prompts, patches]``. With ``deep`` every later block gets a
    fresh set that replaces the previous block's prompt outputs; otherwise (shallow) the prompts
    flow through. The prompt tokens are removed after the last block, so they never reach the
    final norm's pooled output (class token or average of patch tokens).
    """

    def __init__(
        self,
        blocks: nn.Sequential,
        num_prefix_tokens: int,
        num_tokens: int,
        dim: int,
        patch_size: tuple[int, int],
        deep: bool,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, block in blocks.named_children():
            self.add_module(name, block)
        self.num_prefix_tokens, self.num_tokens, self.deep = num_prefix_tokens, num_tokens, deep
        self.dropout = dropout  # a float, not a module: the Sequential must hold blocks only
        self.noise_site = 0  # its draws are keyed (vpeft.layers.noise), one per prompt set
        sets = len(blocks) if deep else 1
        self.prompt_embeddings = nn.Parameter(torch.empty(sets, num_tokens, dim, device=device, dtype=dtype))
        bound = math.sqrt(6.0 / float(3 * patch_size[0] * patch_size[1] + dim))  # VPT's init
        nn.init.uniform_(self.prompt_embeddings, -bound, bound)

    def delta_parameters(self):
        return self.named_parameters(recurse=False)

    def _prompts(self, i: int, x: torch.Tensor) -> torch.Tensor:
        p = self.prompt_embeddings[i].to(x.dtype).expand(x.shape[0], -1, -1)
        return noise.dropout(p, self.dropout, self.training, self.noise_site, sub=i) if self.dropout > 0 else p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, n = self.num_prefix_tokens, self.num_tokens
        for i, block in enumerate(self):
            if i == 0:
                x = torch.cat([x[:, :p], self._prompts(0, x), x[:, p:]], dim=1)
            elif self.deep:
                x = torch.cat([x[:, :p], self._prompts(i, x), x[:, p + n :]], dim=1)
            x = block(x)
        return torch.cat([x[:, :p], x[:, p + n :]], dim=1)

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, deep={self.deep}, dropout={self.dropout}"
