"""LoRA on timm ViTs: low-rank updates of q and v inside the fused qkv layer by default.

Two ways to adapt attention's fused ``attn.qkv`` (one Linear d -> 3d in timm):

* ``q``, ``k``, ``v``: the paper's (Hu et al., 2022) separate updates of the thirds, each with its
  own A (r x d) and B (d x r); ``[q, v]`` leaves k untouched.
* ``qkv``: one update of the whole fused layer with a shared A (r x d) and B (3d x r), the variant
  NOAH's LoRA row and Hugging Face peft (``target_modules=["qkv"]``) train; it adapts k too and
  has d x r fewer parameters per block than ``[q, k, v]``. It cannot be combined with q, k or v.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from vpeft.layers import LoRA, attach, attached, detach
from vpeft.methods._base import Method, MethodConfig, check, register, require, vit_blocks

# target -> (layer inside a block, which third of the fused qkv output, or None for all of it)
TARGETS: dict[str, tuple[str, int | None]] = {
    "q": ("attn.qkv", 0),
    "k": ("attn.qkv", 1),
    "v": ("attn.qkv", 2),
    "qkv": ("attn.qkv", None),  # the whole fused layer, one shared A
    "proj": ("attn.proj", None),
    "fc1": ("mlp.fc1", None),
    "fc2": ("mlp.fc2", None),
}


@dataclasses.dataclass
class LoRAConfig(MethodConfig):
    r: int = 8
    alpha: float | None = None  # None: alpha = r, so the update's scale alpha / r is 1
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        self.alpha = float(self.r if self.alpha is None else self.alpha)
        check(isinstance(self.r, int) and self.r > 0, f"lora r must be a positive integer, got {self.r!r}")
        check(0 <= self.dropout < 1, f"lora dropout must be in [0, 1), got {self.dropout!r}")
        check(
            math.isfinite(self.alpha) and self.alpha > 0,
            f"lora alpha must be a finite number > 0 (the update's scale is alpha / r), got {self.alpha!r}",
        )
        check(len(self.targets) > 0, f"lora targets must name at least one of {list(TARGETS)}")
        check(len(set(self.targets)) == len(self.targets), f"lora targets repeat a name: {list(self.targets)}")
        for t in self.targets:
            check(t in TARGETS, f"unknown lora target {t!r}; valid targets: {', '.join(TARGETS)}")
        thirds = [t for t in self.targets if t in ("q", "k", "v")]
        check(
            "qkv" not in self.targets or not thirds,
            f"lora targets cannot combine qkv (one update of the whole fused attn.qkv) with {', '.join(thirds)} "
            "(updates of its thirds): choose [qkv] or any of q, k, v",
        )


@register("lora")
class LoRAMethod(Method):
    Config = LoRAConfig
    per_run_config = ("alpha",)
    mergeable = True
    merge_atol = 1e-5

    def inject(self, model: nn.Module) -> None:
        cfg: LoRAConfig = self.config
        hosts = sorted({TARGETS[t][0] for t in cfg.targets})
        for i, block in enumerate(vit_blocks(model, "lora")):
            for path in hosts:
                host = require(block, path, f"lora (block {i})", nn.Linear)
                thirds = [TARGETS[t][1] for t in cfg.targets if TARGETS[t][0] == path]
                if thirds == [None]:
                    segments = {path.rsplit(".", 1)[1]: (0, host.out_features)}
                else:
                    size = host.out_features // 3
                    names = {0: "q", 1: "k", 2: "v"}
                    segments = {names[j]: (j * size, (j + 1) * size) for j in thirds}
                attach(
                    host,
                    "lora",
                    LoRA(
                        host.in_features,
                        host.out_features,
                        segments,
                        cfg.r,
                        cfg.alpha,
                        cfg.dropout,
                        device=host.weight.device,
                        dtype=host.weight.dtype,
                    ),
                )

    def merge(self, model: nn.Module) -> None:
        for host, name, lora in list(attached(model, LoRA)):
            with torch.no_grad():
                host.weight.add_(lora.delta_weight().to(host.weight.dtype))
            detach(host, name)
