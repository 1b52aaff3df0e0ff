"""What training speed means against the hardware: FLOPs of one training step and the GPU's bf16 peak.

``train_step_flops`` counts a forward and backward pass with torch.utils.flop_counter, so the
count follows the method: a frozen weight adds no weight-gradient matmul, a prompt adds tokens.
Achieved TFLOP/s = FLOPs per image x images/s; its share of the GPU's dense bf16 peak says how
much of the matrix units a training step really uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vpeft.bench._common import model_device, resolve_input_size
from vpeft.bench.flops import _EXTRA_FORMULAS

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched
# against torch.cuda.get_device_name() in this order (the first substring that matches wins).
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM5 / HBM3
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 6000 Ada", 364.2),
    ("RTX A6000", 154.8),
    ("RTX 3090", 71.0),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name, or None where it is not in the table (or a CPU)."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def train_step_flops(model: nn.Module, input_size: Sequence[int] | int | None = None, batch: int = 2) -> int:
    """FLOPs per image of one training step (forward + backward) of ``model`` as it is configured.

    Only what needs a gradient is differentiated: the weight gradients of frozen parameters are
    never computed, so they are not counted. The optimizer update (elementwise) is left out.
    Counted on ``batch`` images on the model's device and divided by the batch.
    """
    size = resolve_input_size(model, input_size)
    device = model_device(model)
    x = torch.zeros(batch, *size, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    if not any(p.requires_grad for p in model.parameters()):
        x.requires_grad_(True)  # a frozen backbone still back-propagates to its activations
    was_training = model.training
    model.train()
    try:
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
            F.cross_entropy(model(x).float(), y).backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return int(counter.get_total_flops()) // batch


def sequence_length(model: nn.Module, input_size: Sequence[int] | int | None = None) -> int:
    """Tokens the first transformer block sees on one image (prefix tokens and prompts included)."""
    size = resolve_input_size(model, input_size)
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError("sequence_length needs a timm ViT (a model with .blocks)")
    seen: list[int] = []
    handle = blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *size, device=model_device(model)))
    finally:
        handle.remove()
        model.train(was_training)
    return seen[0]
