"""Houlsby adapters: a serial bottleneck after the attention and after the MLP of every block.

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019: each sub-layer's
output ``h`` (after its projection back to the model width) becomes ``h + up(act(down(h)))``
before the residual sum; ``up`` starts at zero, so the model is the backbone at init.

The adapter-tuned model also trains the layer normalisation parameters (the paper's Figure 2):
the reference code (github.com/google-research/adapter-bert) puts every LayerNorm's variables in a
``layer_norm`` collection (``modeling.py``, ``layer_norm``) and its optimizer trains the collections
``adapters``, ``layer_norm`` and ``head`` (``optimization.py``, ``create_optimizer``). Here, with
``train_layernorm: true`` (the default), the LayerNorms of every adapted block (``norm1`` and
``norm2``, weight and bias: ``4 d`` per block) train with the adapters and are part of the delta,
saved under the backbone's own names (``blocks.<i>.norm1.weight``); the final norm stays frozen.
``train_layernorm: false`` trains the adapters only, as AdapterHub's ``adapters`` library does
(it keeps the pretrained LayerNorms frozen).

``adapter_pfeiffer`` shares the adapter but keeps the adapters-only config (``AdapterConfig``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

from torch import nn

from vpeft.errors import UnsupportedModelError
from vpeft.layers import SerialAdapter, attach
from vpeft.layers.adapter import ACTIVATIONS
from vpeft.methods._base import (
    SUPPORTED,
    Method,
    MethodConfig,
    check,
    embed_dim,
    register,
    require,
    vit_blocks,
)

NORMS = ("norm1", "norm2")  # the LayerNorms of a block that train with its adapters (train_layernorm)


@dataclasses.dataclass
class AdapterConfig(MethodConfig):
    bottleneck: int = 8
    act: str = "gelu"

    def __post_init__(self):
        check(
            isinstance(self.bottleneck, int) and not isinstance(self.bottleneck, bool) and self.bottleneck > 0,
            f"adapter bottleneck must be a positive integer, got {self.bottleneck!r}",
        )
        check(self.act in ACTIVATIONS, f"adapter act must be one of {', '.join(ACTIVATIONS)}, got {self.act!r}")


@dataclasses.dataclass
class HoulsbyConfig(AdapterConfig):
    train_layernorm: bool = True  # the blocks' LayerNorms train too, as the reference code; false: adapters only

    def __post_init__(self):
        super().__post_init__()
        check(
            isinstance(self.train_layernorm, bool),
            f"adapter_houlsby train_layernorm must be true or false, got {self.train_layernorm!r}",
        )


def block_norms(model: nn.Module, method: str) -> Iterator[tuple[str, nn.LayerNorm]]:
    """(path, module) of every block's ``norm1`` and ``norm2``, each checked to be an affine LayerNorm."""
    for i, block in enumerate(vit_blocks(model, method)):
        for name in NORMS:
            norm = require(block, name, f"{method} (block {i})")
            if not isinstance(norm, nn.LayerNorm) or not isinstance(norm.weight, nn.Parameter) or norm.bias is None:
                raise UnsupportedModelError(
                    f"{method} with train_layernorm needs blocks.{i}.{name} to be a LayerNorm with weight and bias, "
                    f"found {type(norm).__name__}; set train_layernorm=false to train the adapters only; "
                    f"supported: {SUPPORTED}"
                )
            yield f"blocks.{i}.{name}", norm


@register("adapter_houlsby")
class HoulsbyAdapter(Method):
    Config = HoulsbyConfig
    legacy_defaults = {"train_layernorm": False}  # files from before the field trained the adapters only
    sites: ClassVar[tuple[str, ...]] = ("attn", "mlp")  # the sub-layers whose output gets an adapter

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Config" not in cls.__dict__:
            cls.Config = AdapterConfig  # a subclass (Pfeiffer's) trains its adapters only unless it says otherwise

    def trains_layernorm(self) -> bool:
        return bool(getattr(self.config, "train_layernorm", False))

    def inject(self, model: nn.Module) -> None:
        cfg: AdapterConfig = self.config
        dim = embed_dim(model, self.name)
        blocks = vit_blocks(model, self.name, self.sites)
        if self.trains_layernorm():
            list(block_norms(model, self.name))  # check every norm before the model changes
        for i, block in enumerate(blocks):
            for site in self.sites:
                host = require(block, site, f"{self.name} (block {i})")
                weight = next(host.parameters())
                adapter = SerialAdapter(dim, cfg.bottleneck, cfg.act, device=weight.device, dtype=weight.dtype)
                attach(host, "adapter", adapter)

    def delta_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """The adapters, then (``train_layernorm``) each block's ``norm1`` / ``norm2`` weight and bias."""
        yield from super().delta_parameters(model)
        if self.trains_layernorm():
            for path, norm in block_norms(model, self.name):
                yield f"{path}.weight", norm.weight
                yield f"{path}.bias", norm.bias
