"""Shared pieces of the measurements: dtypes, devices, input sizes, synchronisation."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vpeft.core import applied_method
from vpeft.env import device_name as device_name  # the suites name a device as records do
from vpeft.errors import ConfigError

# name -> autocast dtype (None: plain fp32, no autocast)
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_dtype(name: str) -> str:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return name


def autocast(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision the way inference and training run it: torch.autocast, weights stay fp32."""
    dtype = DTYPES[check_dtype(name)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def model_device(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


def as_device(device: torch.device | str | None, model: nn.Module) -> torch.device:
    """The device to measure on: the one given, else the model's."""
    if device is None:
        return model_device(model)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no CUDA GPU; measure on device='cpu'")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def require_real(model: nn.Module, what: str) -> None:
    if model_device(model).type == "meta":
        raise ConfigError(f"{what} runs the model for real; create it on 'cpu' or 'cuda', not on the meta device")


def resolve_input_size(model: nn.Module, input_size: Sequence[int] | int | None) -> tuple[int, int, int]:
    """(channels, height, width): from ``input_size`` (C,H,W | H,W | side) or the model's patch embedding."""
    if input_size is None:
        pe = getattr(model, "patch_embed", None)
        size = getattr(pe, "img_size", None)
        proj = getattr(pe, "proj", None)
        if size is None:
            raise ConfigError("pass input_size=(3, H, W): the model has no patch_embed.img_size to read it from")
        return (int(getattr(proj, "in_channels", 3)), int(size[0]), int(size[1]))
    if isinstance(input_size, int):
        return (3, input_size, input_size)
    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        return (3, *size)
    if len(size) != 3 or min(size) <= 0:
        raise ConfigError(f"input_size must be (C, H, W), (H, W) or an int, got {input_size!r}")
    return size  # type: ignore[return-value]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def versions() -> dict[str, Any]:
    import timm

    return {"torch": torch.__version__, "timm": timm.__version__}


def method_info(model: nn.Module) -> tuple[str | None, dict[str, Any] | None, bool]:
    """(method name, its config, whether it merges) of the applied method; (None, None, False) if none."""
    method = applied_method(model)
    if method is None:
        return None, None, False
    return method.name, method.config_dict(), bool(method.mergeable)


def positive_int(value: Any, name: str, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value
