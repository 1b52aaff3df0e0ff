"""FLOPs of one forward pass, counted by torch.utils.flop_counter (matmuls, convolutions, attention)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vpeft.bench._common import model_device, resolve_input_size


@dataclasses.dataclass(frozen=True)
class FlopReport:
    """FLOPs of a batch-1 forward at ``input_size``; one multiply-add counts as 2 FLOPs (MACs = FLOPs / 2).

    ``by_op`` splits the count per aten operator. ``baseline_flops`` and ``ratio`` compare with a
    bare backbone when one was given. Element-wise work (norms, activations, softmax) is not counted,
    as in every FLOP table of the field.
    """

    flops: int
    macs: int
    input_size: tuple[int, int, int]
    by_op: dict[str, int]
    baseline_flops: int | None = None
    ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        return d


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Q K^T plus A V, 2 FLOPs per multiply-add, key/value heads broadcast to the query's (GQA)."""
    b, h, s_q, d = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    return 2 * b * h * s_q * s_k * (d + d_v)


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """dQ, dK, dV and the recomputed scores: twice the forward's matmuls."""
    return 2 * _sdpa_flops(query_shape, key_shape, value_shape)


# torch counts the CUDA attention kernels; the CPU flash kernels that timm's fused attention reaches
# on a CPU have no formula there, so their FLOPs would silently go missing.
_EXTRA_FORMULAS = {
    op: formula
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_flops),
        ("_scaled_dot_product_fused_attention_overrideable", _sdpa_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_backward_flops),
    )
    if (op := getattr(torch.ops.aten, name, None)) is not None
}


def count_flops(model: nn.Module, input_size: tuple[int, int, int]) -> tuple[int, dict[str, int]]:
    """Total FLOPs and FLOPs per operator of ``model`` on one image, in eval mode, without gradients."""
    device = model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.zeros(1, *input_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
            model(x)
    finally:
        model.train(was_training)
    by_op = {str(op): int(n) for op, n in sorted(counter.get_flop_counts().get("Global", {}).items(), key=str)}
    return int(counter.get_total_flops()), by_op


def measure_flops(
    model: nn.Module, input_size: Sequence[int] | int | None = None, baseline: nn.Module | None = None
) -> FlopReport:
    """FLOPs of ``model`` (prompts and adapters included) and, with ``baseline``, the ratio to it.

    Works on models created on the meta device (no memory, no compute), as well as on real ones.
    """
    size = resolve_input_size(model, input_size)
    flops, by_op = count_flops(model, size)
    base = count_flops(baseline, size)[0] if baseline is not None else None
    return FlopReport(
        flops=flops,
        macs=flops // 2,
        input_size=size,
        by_op=by_op,
        baseline_flops=base,
        ratio=flops / base if base else None,
    )
