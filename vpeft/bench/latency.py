"""Inference latency of the bare backbone, the model as trained (unmerged) and merged, timed alike.

The protocol: eval mode, ``torch.inference_mode``, random inputs, every variant in the same process
and on the same device; ``warmup`` untimed calls, then ``iters`` timed calls per (dtype, batch).
Each call is timed alone: the device is synchronised before it starts and after it ends (CUDA
events on a GPU, ``time.perf_counter`` on a CPU), so a time is one call's latency with its launch
overhead included. The variants take turns call by call, in a rotating order, so drift in the
machine's speed (clocks, other processes) hits all of them alike. bf16 runs through
``torch.autocast``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from vpeft.bench._common import (
    as_device,
    autocast,
    check_dtype,
    device_name,
    method_info,
    positive_int,
    require_real,
    resolve_input_size,
    synchronize,
    versions,
)
from vpeft.core import merge
from vpeft.errors import ConfigError
from vpeft.progress import progress

log = logging.getLogger("vpeft")

VARIANTS = ("bare", "unmerged", "merged")
GPU_WARMUP, GPU_ITERS = 50, 100
CPU_WARMUP, CPU_ITERS = 2, 5  # a CPU call takes far longer; bench.warmup / bench.iters give the full protocol


def default_dtypes(device: torch.device) -> tuple[str, ...]:
    """fp32 and bf16 on a GPU; fp32 only on a CPU (bf16 there only when asked for)."""
    return ("fp32", "bf16") if device.type == "cuda" else ("fp32",)


def default_iterations(device: torch.device) -> tuple[int, int]:
    """(warm-up, timed) calls: 50/100 on a GPU, 2/5 on a CPU where one call takes far longer."""
    return (GPU_WARMUP, GPU_ITERS) if device.type == "cuda" else (CPU_WARMUP, CPU_ITERS)


@dataclasses.dataclass(frozen=True)
class LatencyStat:
    """Milliseconds per call of one (variant, dtype, batch)."""

    variant: str
    dtype: str
    batch: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    n: int


@dataclasses.dataclass(frozen=True)
class Overhead:
    """``ratio`` = median latency of ``variant`` / median latency of the bare backbone (1.0: no cost)."""

    variant: str
    dtype: str
    batch: int
    ratio: float


@dataclasses.dataclass(frozen=True)
class LatencyReport:
    results: tuple[LatencyStat, ...]
    overhead: tuple[Overhead, ...]
    headline_variant: str  # merged where the method allows it, else unmerged
    method: str | None
    mergeable: bool
    batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    warmup: int
    iters: int
    input_size: tuple[int, int, int]
    device: str
    device_name: str
    timer: str
    torch: str
    timm: str
    threads: int
    float32_matmul_precision: str

    def stat(self, variant: str, dtype: str, batch: int) -> LatencyStat | None:
        for s in self.results:
            if (s.variant, s.dtype, s.batch) == (variant, dtype, batch):
                return s
        return None

    def ratio(self, variant: str, dtype: str, batch: int) -> float | None:
        for o in self.overhead:
            if (o.variant, o.dtype, o.batch) == (variant, dtype, batch):
                return o.ratio
        return None

    def headline(self, dtype: str | None = None, batch: int | None = None) -> float | None:
        """The headline variant's overhead at (dtype, batch); by default the first of each (fp32, batch 1)."""
        return self.ratio(self.headline_variant, dtype or self.dtypes[0], batch or self.batches[0])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["results"] = [dataclasses.asdict(s) for s in self.results]
        d["overhead"] = [dataclasses.asdict(o) for o in self.overhead]
        for key in ("batches", "dtypes", "input_size"):
            d[key] = list(d[key])
        return d


def _time_one(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    warmup: int,
    iters: int,
    device: torch.device,
    tick: Callable[[], Any] | None = None,
) -> dict[str, list[float]]:
    """Milliseconds of ``iters`` calls of each function, taking turns in a rotating order after ``warmup``;
    ``tick()`` after each call (progress)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
            if tick is not None:
                tick()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iters):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(_time_one(fns[name], device))
            if tick is not None:
                tick()
    return times


def _stat(variant: str, dtype: str, batch: int, ms: list[float]) -> LatencyStat:
    return LatencyStat(
        variant=variant,
        dtype=dtype,
        batch=batch,
        median_ms=float(statistics.median(ms)),
        p90_ms=float(np.percentile(ms, 90)),
        mean_ms=float(statistics.fmean(ms)),
        min_ms=float(min(ms)),
        n=len(ms),
    )


def measure_latency(
    model: nn.Module,
    input_size: Sequence[int] | int | None = None,
    batches: Sequence[int] = (1, 64),
    dtypes: Sequence[str] | None = None,
    warmup: int | None = None,
    iters: int | None = None,
    device: torch.device | str | None = None,
    baseline: nn.Module | None = None,
    merged: nn.Module | bool | None = None,
    seed: int = 0,
) -> LatencyReport:
    """Median and p90 latency of the variants per (dtype, batch), and their overhead over ``baseline``.

    ``baseline`` is the bare backbone (same architecture and head, no method); without it there are
    no overhead ratios. ``merged``: None merges a deep copy when the applied method is mergeable,
    False leaves the merged variant out, a module is timed as the merged variant. ``dtypes`` default
    to fp32 + bf16 on CUDA and fp32 on CPU; ``warmup``/``iters`` to 50/100 on CUDA and 3/10 on CPU.
    The models are moved to ``device`` (default: the model's) and left in the mode they were in.
    """
    require_real(model, "measure_latency")
    device = as_device(device, model)
    dtypes = tuple(check_dtype(d) for d in (dtypes if dtypes is not None else default_dtypes(device)))
    batches = tuple(positive_int(b, "batch") for b in batches)
    if not batches or not dtypes:
        raise ConfigError("measure_latency needs at least one batch size and one dtype")
    w_default, i_default = default_iterations(device)
    warmup = positive_int(warmup if warmup is not None else w_default, "warmup", allow_zero=True)
    iters = positive_int(iters if iters is not None else i_default, "iters")
    size = resolve_input_size(model, input_size)
    method, _, mergeable = method_info(model)

    if merged is None:
        merged = merge(copy.deepcopy(model)) if mergeable else None
    elif merged is False:
        merged = None
    elif merged is True:
        raise ConfigError("merged=True is ambiguous: pass None (merge a copy if possible), False, or a merged model")
    variants: dict[str, nn.Module] = {}
    if baseline is not None:
        require_real(baseline, "measure_latency (baseline)")
        variants["bare"] = baseline
    variants["unmerged"] = model
    if merged is not None:
        variants["merged"] = merged
    modes = {name: m.training for name, m in variants.items()}
    for m in variants.values():
        m.to(device).eval()

    g = torch.Generator(device="cpu").manual_seed(seed)
    results: list[LatencyStat] = []
    n_cases = len(dtypes) * len(batches)
    calls = n_cases * len(variants) * (warmup + iters)
    bar = progress(desc=f"measuring latency ({'/'.join(variants)})", total=calls, unit="call")
    try:
        with torch.inference_mode():
            for dtype in dtypes:
                for batch in batches:
                    log.info(
                        "latency %d/%d: %s, batch %d, %s: %d warm-up + %d timed calls each",
                        len(results) // len(variants) + 1, n_cases, dtype, batch, "/".join(variants), warmup, iters,
                    )  # fmt: skip
                    x = torch.randn(batch, *size, generator=g).to(device)

                    def call(m: nn.Module, x: torch.Tensor = x, dtype: str = dtype) -> Any:
                        with autocast(dtype, device):
                            return m(x)

                    fns = {name: (lambda m=m: call(m)) for name, m in variants.items()}
                    bar.set_description(f"measuring latency ({'/'.join(variants)}, {dtype}, batch {batch})", False)
                    times = time_interleaved(fns, warmup, iters, device, tick=bar.update)
                    results += [_stat(name, dtype, batch, times[name]) for name in variants]
    finally:
        bar.close()
        for name, m in variants.items():
            m.train(modes[name])

    overhead: list[Overhead] = []
    if "bare" in variants:
        bare = {(s.dtype, s.batch): s.median_ms for s in results if s.variant == "bare"}
        for s in results:
            if s.variant != "bare":
                overhead.append(Overhead(s.variant, s.dtype, s.batch, s.median_ms / bare[(s.dtype, s.batch)]))
    return LatencyReport(
        results=tuple(results),
        overhead=tuple(overhead),
        headline_variant="merged" if "merged" in variants else "unmerged",
        method=method,
        mergeable=mergeable,
        batches=batches,
        dtypes=dtypes,
        warmup=warmup,
        iters=iters,
        input_size=size,
        device=device.type,
        device_name=device_name(device),
        timer="cuda_event" if device.type == "cuda" else "perf_counter",
        threads=torch.get_num_threads(),
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        **versions(),
    )
