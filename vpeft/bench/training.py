"""Training throughput and peak memory: AdamW steps on the trainable parameters, synthetic batches."""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import vpeft  # the package's own folder goes on the measuring process's path; its methods unpickle the model
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
from vpeft.errors import ConfigError, VpeftError
from vpeft.progress import progress

PEAK_MEM_KINDS = ("cuda_max_allocated", "cpu_peak_rss", "cpu_peak_rss_isolated")


@dataclasses.dataclass(frozen=True)
class TrainReport:
    """Images per second over the timed steps, and the peak memory of the whole measurement.

    ``peak_mem_kind`` says what the memory number is: ``cuda_max_allocated`` (tensors the caching
    allocator handed out since the reset: weights, activations, gradients, optimizer state) or
    ``cpu_peak_rss`` (the process's peak resident set since it started: an upper bound that also
    holds everything the process did before) or ``cpu_peak_rss_isolated`` (the peak resident set of
    a fresh process that loaded only this model and ran only this measurement, see
    ``measure_training_isolated``; ``base_mem_mb`` is that process's resident set before the model
    arrived: Python, torch and vpeft).
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
    base_mem_mb: float | None = None

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
        with torch.enable_grad(), progress(desc="measuring training cost", total=warmup + steps, unit="step") as bar:
            for _ in range(warmup):
                step()
                bar.update()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
                bar.update()
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


def _proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux) in MiB; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**10
    except (OSError, ValueError, IndexError):
        pass
    return None


def _rss_mb() -> float:
    """The resident set now (Linux: VmRSS; elsewhere the peak so far, an upper bound)."""
    now = _proc_status_mb("VmRSS")
    return now if now is not None else _peak_mb(torch.device("cpu"))[0]


def _own_peak_mb() -> float | None:
    """This process's own peak resident set (Linux: VmHWM, the high-water mark of its memory map, which
    starts afresh at exec). Not ``ru_maxrss``: Linux carries the forking parent's resident set into the
    child's across exec, so a child of a large process would report at least the parent's size."""
    return _proc_status_mb("VmHWM")


def _child_main(argv: Sequence[str]) -> None:
    """In the fresh process: load the model, measure, write the report as JSON (argv: model, out, threads, kwargs)."""
    import json

    model_path, out_path, threads, kwargs = argv[0], argv[1], int(argv[2]), json.loads(argv[3])
    torch.set_num_threads(threads)
    base = _rss_mb()
    model = torch.load(model_path, weights_only=False, mmap=True)  # no transient second copy of the weights
    os.unlink(model_path)  # the parent's copy on disk is no longer needed
    report = measure_training(model, device="cpu", **kwargs)
    peak = _own_peak_mb()
    if peak is not None:
        report = dataclasses.replace(report, peak_mem_mb=peak)
    report = dataclasses.replace(report, peak_mem_kind="cpu_peak_rss_isolated", base_mem_mb=base)
    with open(out_path, "w") as f:
        json.dump(report.to_dict(), f)


def measure_training_isolated(
    model: nn.Module,
    input_size: Sequence[int] | int | None = None,
    batch_size: int | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    dtype: str | None = None,
    lr: float = 1e-3,
    seed: int = 0,
    compile: bool = False,
    input_grad: bool = False,
) -> TrainReport:
    """``measure_training`` on the CPU in a fresh process, so its peak memory is this method's alone.

    A process's peak resident set only grows: measured in-process, a sweep reports its largest method
    for every method after it. Here the model goes through a file (a pipe would hold a second copy of
    the weights) to a new Python process (``sys.executable``, so nothing of the caller's main script is
    re-run) with as many threads as this one; its own high-water mark (VmHWM) is the peak of importing torch, loading
    the model and training it, nothing else. The caller's model is not touched. It costs a few seconds
    more than in-process (the new process imports torch).
    """
    import json
    import subprocess

    require_real(model, "measure_training_isolated")
    size = list(resolve_input_size(model, input_size))
    kwargs = dict(input_size=size, batch_size=batch_size, steps=steps, warmup=warmup, dtype=dtype, lr=lr)
    kwargs.update(seed=seed, compile=compile, input_grad=input_grad)
    with tempfile.TemporaryDirectory(prefix="vpeft-train-") as tmp:
        model_path, out_path = os.path.join(tmp, "model.pt"), os.path.join(tmp, "report.json")
        torch.save(model, model_path)
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(vpeft.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        code = "import sys; from vpeft.bench.training import _child_main; _child_main(sys.argv[1:])"
        argv = [model_path, out_path, str(torch.get_num_threads()), json.dumps(kwargs)]
        with progress(desc="measuring training cost (in a fresh process)", total=1, unit="process") as bar:
            done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
            bar.update()
        if done.returncode != 0 or not os.path.exists(out_path):
            why = "killed (out of memory?)" if done.returncode < 0 else f"exit status {done.returncode}"
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise VpeftError(
                f"the training measurement's own process failed: {why}; bench.train_isolate=false measures "
                f"in-process, a smaller bench.train_batch needs less memory\n{tail}"
            )
        with open(out_path) as f:
            d = json.load(f)
    d["input_size"] = tuple(d["input_size"])
    return TrainReport(**d)
