"""A model's pre-logit features: what its classifier head reads (timm's ``forward_head(..., pre_logits=True)``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vpeft.engine.loop import Normalizer, autocast, resolve_amp
from vpeft.progress import progress as progress_bar


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int = 256,
    amp: str = "auto",
    progress: bool = False,
    desc: str = "features",
) -> torch.Tensor:
    """Pre-logit features [N, D] (float32, on the CPU) of a uint8 split [N, 3, H, W], in eval mode.

    Prompts, adapters and every other delta act as in the model's own forward: only the head is left out."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise TypeError(f"{type(model).__name__} is not a timm model with forward_features / forward_head")
    amp = resolve_amp(amp, device)
    normalize = Normalizer(mean, std, device)
    was_training = model.training
    model.eval()
    out = []
    total = math.ceil(len(images) / batch_size)
    try:
        for start in progress_bar(range(0, len(images), batch_size), desc=desc, unit="batch", total=total,
                                  enabled=progress):  # fmt: skip
            x = normalize(images[start : start + batch_size].to(device, non_blocking=True))
            with autocast(amp, device):
                f = model.forward_head(model.forward_features(x), pre_logits=True)
            out.append(f.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)
