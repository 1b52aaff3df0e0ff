"""One (backbone, method) measured end to end, and the cost dict a run record stores."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vpeft.bench._common import as_device, check_dtype, device_name, method_info, positive_int, resolve_input_size
from vpeft.bench.flops import FlopReport, measure_flops
from vpeft.bench.latency import LatencyReport, default_dtypes, default_iterations, measure_latency
from vpeft.bench.params import ParamReport, measure_params
from vpeft.bench.training import TrainReport, measure_training, measure_training_isolated
from vpeft.core import count_parameters
from vpeft.errors import ConfigError, UnknownNameError, check_value, shown

log = logging.getLogger("vpeft")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to measure and how long. None means the device's default (see ``resolved``).

    Built by the run harness from ``conf/bench/default.yaml``; ``latency: false`` leaves latency out
    (quick runs), ``train_steps: 0`` leaves the training measurement out.
    """

    latency: bool = True
    batches: tuple[int, ...] | None = None  # (1, 64) on CUDA, (1, 8) on CPU
    dtypes: tuple[str, ...] | None = None  # fp32 + bf16 on CUDA, fp32 on CPU
    warmup: int | None = None  # 50 on CUDA, 3 on CPU
    iters: int | None = None  # 100 on CUDA, 10 on CPU
    flops: bool = True
    train_steps: int | None = None  # 20 on CUDA, 3 on CPU; 0: no training measurement
    train_warmup: int | None = None  # 5 on CUDA, 1 on CPU
    train_batch: int | None = None  # 64 on CUDA, 8 on CPU
    train_dtype: str | None = None  # bf16 on CUDA, fp32 on CPU
    # CPU: train in a fresh process so peak memory is the method's own (a process's peak RSS only grows);
    # on CUDA the allocator's peak is reset per measurement instead. None: true on CPU, false on CUDA
    train_isolate: bool | None = None

    def __post_init__(self) -> None:
        check_value("bench.latency", self.latency, "bool", example=True)
        check_value("bench.flops", self.flops, "bool", example=True)
        check_value("bench.train_isolate", self.train_isolate, "bool", optional=True, example=True)
        for name in ("batches", "dtypes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value):
                example = "[1,8]" if name == "batches" else "[fp32]"
                raise ConfigError(f"bench.{name} must be a non-empty list or null, got {shown(value)}; "
                                  f"set bench.{name}={example}, for example")  # fmt: skip
        if self.batches is not None:
            object.__setattr__(self, "batches", tuple(positive_int(b, "bench.batches[]") for b in self.batches))
        if self.dtypes is not None:
            object.__setattr__(self, "dtypes", tuple(check_dtype(d) for d in self.dtypes))
        for name in ("warmup", "train_steps", "train_warmup"):
            if getattr(self, name) is not None:
                positive_int(getattr(self, name), f"bench.{name}", allow_zero=True)
        for name in ("iters", "train_batch"):
            if getattr(self, name) is not None:
                positive_int(getattr(self, name), f"bench.{name}")
        if self.train_dtype is not None:
            check_dtype(self.train_dtype)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], ignore: Sequence[str] = ("only",)) -> BenchConfig:
        """From a config mapping; keys in ``ignore`` belong to the harness, unknown keys are an error."""
        valid = [f.name for f in dataclasses.fields(cls)]
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key in ignore:
                continue
            if key not in valid:
                raise UnknownNameError("bench config field", key, valid)
            listed = key in ("batches", "dtypes") and isinstance(value, Sequence) and not isinstance(value, str)
            kwargs[key] = tuple(value) if listed else value
        return cls(**kwargs)

    def resolved(self, device: torch.device | str) -> BenchConfig:
        """Every None replaced by the default of ``device``'s kind."""
        device = torch.device(device)
        cuda = device.type == "cuda"
        warmup, iters = default_iterations(device)
        pick = {
            "batches": (1, 64) if cuda else (1, 8),
            "dtypes": default_dtypes(device),
            "warmup": warmup,
            "iters": iters,
            "train_steps": 20 if cuda else 3,
            "train_warmup": 5 if cuda else 1,
            "train_batch": 64 if cuda else 8,
            "train_dtype": "bf16" if cuda else "fp32",
            "train_isolate": not cuda,
        }
        return dataclasses.replace(self, **{k: v for k, v in pick.items() if getattr(self, k) is None})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["batches"] = list(self.batches) if self.batches is not None else None
        d["dtypes"] = list(self.dtypes) if self.dtypes is not None else None
        return d


@dataclasses.dataclass(frozen=True)
class BenchReport:
    """Everything measured for one (backbone, method) on one device."""

    method: str | None
    method_config: dict[str, Any] | None
    mergeable: bool
    input_size: tuple[int, int, int]
    device: str
    device_name: str
    params: ParamReport
    backbone_params: int | None  # all parameters of the bare backbone (with the same head)
    flops: FlopReport | None
    latency: LatencyReport | None
    training: TrainReport | None
    config: BenchConfig

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "method_config": self.method_config,
            "mergeable": self.mergeable,
            "input_size": list(self.input_size),
            "device": self.device,
            "device_name": self.device_name,
            "params": {**self.params.to_dict(), "backbone_total": self.backbone_params},
            "flops": self.flops.to_dict() if self.flops else None,
            "latency": self.latency.to_dict() if self.latency else None,
            "latency_overhead": self.latency.headline() if self.latency else None,
            "training": self.training.to_dict() if self.training else None,
            "config": self.config.to_dict(),
        }


def benchmark(
    model: nn.Module,
    bare: nn.Module | None,
    input_size: Sequence[int] | int | None,
    device: torch.device | str | None,
    cfg: BenchConfig | None = None,
) -> BenchReport:
    """Parameters, FLOPs, latency (bare / unmerged / merged) and training cost of ``model``.

    ``bare`` is the backbone without any method, with the same head, measured in the same process;
    it is the reference of the FLOP and latency ratios (None: no ratios). The model is left as it
    was, apart from being moved to ``device``.
    """
    device = as_device(device, model)
    cfg = (cfg or BenchConfig()).resolved(device)
    size = resolve_input_size(model, input_size)
    method, method_config, mergeable = method_info(model)
    if bare is not None:
        bare.to(device)
    model.to(device)
    params = measure_params(model)
    if cfg.flops:
        log.info("bench: counting FLOPs")
    flops = measure_flops(model, size, baseline=bare) if cfg.flops else None
    latency = None
    if cfg.latency:
        latency = measure_latency(model, size, cfg.batches, cfg.dtypes, cfg.warmup, cfg.iters, device, baseline=bare)
    training = None
    if cfg.train_steps:
        isolate = cfg.train_isolate and device.type == "cpu"
        log.info(
            "bench: %d training steps at batch %d (%s)%s", cfg.train_steps, cfg.train_batch, cfg.train_dtype,
            " in a fresh process (its own peak memory)" if isolate else "",
        )  # fmt: skip
        if isolate:
            training = measure_training_isolated(
                model, size, cfg.train_batch, cfg.train_steps, cfg.train_warmup, cfg.train_dtype
            )
        else:
            training = measure_training(
                model, size, cfg.train_batch, cfg.train_steps, cfg.train_warmup, device, cfg.train_dtype
            )
    return BenchReport(
        method=method,
        method_config=method_config,
        mergeable=mergeable,
        input_size=size,
        device=device.type,
        device_name=device_name(device),
        params=params,
        backbone_params=count_parameters(bare).total if bare is not None else None,
        flops=flops,
        latency=latency,
        training=training,
        config=cfg,
    )


def to_record_cost(report: BenchReport) -> dict[str, Any]:
    """The keys a run record adds under ``cost``: delta size, FLOPs, latency and the flat headline overhead.

    ``latency_overhead`` is the headline variant's median latency over the bare backbone's at the
    first dtype and batch (fp32, batch 1 by default); ``latency_overhead_at`` says which.
    """
    lat = report.latency
    return {
        "delta_bytes": report.params.delta_bytes,
        "flops": report.flops.to_dict() if report.flops else None,
        "latency": lat.to_dict() if lat else None,
        "latency_overhead": lat.headline() if lat else None,
        "latency_overhead_at": (
            {"variant": lat.headline_variant, "dtype": lat.dtypes[0], "batch": lat.batches[0]} if lat else None
        ),
    }


def cost_summary(
    model: nn.Module,
    bare: nn.Module | None,
    input_size: Sequence[int] | int | None,
    device: torch.device | str | None,
    cfg: BenchConfig | None = None,
) -> dict[str, Any]:
    """``to_record_cost`` of a benchmark without the training part (a run measures its own training)."""
    cfg = dataclasses.replace(cfg or BenchConfig(), train_steps=0)
    return to_record_cost(benchmark(model, bare, input_size, device, cfg))
