"""Reusable delta modules; methods compose them."""

from vpeft.layers.adapter import SerialAdapter
from vpeft.layers.bottleneck import Bottleneck
from vpeft.layers.delta import Delta, OutputDelta, attach, attached, detach
from vpeft.layers.fusion import AdapterFusion, FrozenAdapter
from vpeft.layers.lora import LoRA
from vpeft.layers.prefix import PrefixAttention, PrefixEncoder
from vpeft.layers.prompts import PromptedBlocks
from vpeft.layers.rescale import Rescale, fold_input_scale
from vpeft.layers.scale_shift import ScaleShift, fold_affine

__all__ = [
    "AdapterFusion",
    "Bottleneck",
    "Delta",
    "FrozenAdapter",
    "LoRA",
    "OutputDelta",
    "PrefixAttention",
    "PrefixEncoder",
    "PromptedBlocks",
    "Rescale",
    "ScaleShift",
    "SerialAdapter",
    "attach",
    "attached",
    "detach",
    "fold_affine",
    "fold_input_scale",
]
