"""Training throughput and peak memory: AdamW steps on the trainable parameters, synthetic batches."""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.bench._common import (
    as_device,
    autocast,
    check_dtype,
    device_name,
    positive_int,
    require_real,
    resolve_input_size,
    synchronize,
    versions,
)
from vpeft.core import applied_method, trainable_parameters
from vpeft.errors import ConfigError

PEAK_MEM_KINDS = ("cuda_max_allocated", "cpu_peak_rss")


@dataclasses.dataclass(frozen=True)
class TrainReport:
    """Images per second over the timed steps, and the peak memory of the whole measurement.

    ``peak_mem_kind`` says what the memory number is: ``cuda_max_allocated`` (tensors the caching
    allocator handed out since the reset: weights, activations, gradients, optimizer state) or
    ``cpu_peak_rss`` (the process's peak resident set since it started: an upper bound that also
    holds everything the process did before).
    """

    images_per_s: float
    seconds: float
    steps: int
    warmup: int
    batch_size: int
    dtype: str
    input_size: tuple[int, int, int]
    trainable: int
    peak_mem_mb: float
    peak_mem_kind: str
    device: str
    device_name: str
    torch: str
    timm: str
    compiled: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        return d


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    if applied_method(model) is not None:
        return trainable_parameters(model)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _peak_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "cpu_peak_rss"


def measure_training(
    model: nn.Module,
    input_size: Sequence[int] | int | None = None,
    batch_size: int | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    device: torch.device | str | None = None,
    dtype: str | None = None,
    lr: float = 1e-3,
    seed: int = 0,
    compile: bool = False,
    input_grad: bool = False,
) -> TrainReport:
    """Time ``steps`` optimizer steps after ``warmup`` untimed ones, then put the model back as it was.

    Defaults: on CUDA batch 64, 20 steps after 5, bf16 autocast (what training runs use); on CPU
    batch 8, 3 steps after 1, fp32. The trainable tensors and buffers are restored afterwards, the
    gradients cleared and the train/eval mode reset, so the model leaves unchanged.

    ``compile`` times ``torch.compile(model)`` (compilation happens in the warm-up steps).
    ``input_grad`` makes the input require a gradient, so a model with every weight frozen still
    back-propagates through all its activations: the floor of what any delta that sits inside the
    backbone costs to train.
    """
    require_real(model, "measure_training")
    device = as_device(device, model)
    cuda = device.type == "cuda"
    batch_size = positive_int(batch_size if batch_size is not None else (64 if cuda else 8), "batch_size")
    steps = positive_int(steps if steps is not None else (20 if cuda else 3), "steps")
    warmup = positive_int(warmup if warmup is not None else (5 if cuda else 1), "warmup", allow_zero=True)
    dtype = check_dtype(dtype if dtype is not None else ("bf16" if cuda else "fp32"))
    size = resolve_input_size(model, input_size)
    num_classes = getattr(model, "num_classes", 0)
    if not isinstance(num_classes, int) or num_classes <= 0:
        raise ConfigError("measure_training needs a classifier head: create the model with num_classes > 0")
    params = _trainable(model)
    if not params and not input_grad:
        raise ConfigError("the model has no trainable parameters; apply a method (vpeft.apply_method) first")

    model.to(device)
    # what training will change, kept on the host so the copy adds nothing to the GPU's peak
    saved_params = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
    saved_buffers = {n: b.detach().to("cpu", copy=True) for n, b in model.named_buffers()}
    was_training = model.training
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch_size, *size, generator=g).to(device).requires_grad_(input_grad)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr) if params else None
    forward = torch.compile(model) if compile else model

    def step() -> None:
        with autocast(dtype, device):
            loss = F.cross_entropy(forward(x).float(), y)
        loss.backward()
        x.grad = None
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    try:
        if cuda:
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        model.train()
        with torch.enable_grad():
            for _ in range(warmup):
                step()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize(device)
            seconds = time.perf_counter() - start
        peak, kind = _peak_mb(device)
    finally:
        if optimizer is not None:
            optimizer.state.clear()
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved_params[n])
                p.grad = None
            for n, b in model.named_buffers():
                b.copy_(saved_buffers[n])
        model.train(was_training)
    return TrainReport(
        images_per_s=batch_size * steps / seconds,
        seconds=seconds,
        steps=steps,
        warmup=warmup,
        batch_size=batch_size,
        dtype=dtype,
        input_size=size,
        trainable=sum(p.numel() for p in params.values()),
        peak_mem_mb=peak,
        peak_mem_kind=kind,
        device=device.type,
        device_name=device_name(device),
        compiled=compile,
        **versions(),
    )
