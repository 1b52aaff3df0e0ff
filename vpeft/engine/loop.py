"""The training loop of a VTAB-1k run.

Every split arrives as one uint8 tensor already at the backbone's input size, so an epoch is a
random permutation and a few index gathers: no DataLoader, no decoding. Images are normalised on
the device. Losses and correct counts accumulate on the device; the host reads them once per
epoch, so a step never waits for the GPU. Progress is per batch and says what runs ("training epoch
3/8"), a line every half minute when stderr is a log rather than a terminal (``vpeft.progress``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch import nn

from vpeft.errors import ConfigError, RunFailed, check_value, shown
from vpeft.layers import noise
from vpeft.methods._base import Method
from vpeft.progress import progress as progress_bar


class DivergedError(RunFailed, FloatingPointError):
    """The training loss became NaN or infinite."""


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 64
    warmup_epochs: int | None = None  # None: a tenth of the epochs (the VTAB-1k recipe's 10 of 100), rounded
    warmup_lr: float = 1e-7  # learning rate at the start of warm-up
    min_lr: float = 1e-5  # end of the cosine schedule
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    eval_batch_size: int = 256
    amp: str = "auto"  # auto: bf16 autocast on CUDA, none on CPU; or "bf16" / "none"
    compile: bool = False  # torch.compile the model's training step (one shape: the last batch padded; eval eager)
    compile_mode: str = "default"  # torch.compile's mode: default | reduce-overhead (CUDA graphs) | max-autotune
    eval_every: int = 0  # also evaluate every n epochs (a flagged extra; the last epoch is the result)
    data_on_device: str = "auto"  # auto: move the uint8 splits to the GPU when they fit; or "yes" / "no"
    progress: bool = True

    def __post_init__(self):
        """Every field checked as the config gives it, so that a bad value stops the run before it starts."""
        for name in ("epochs", "batch_size", "eval_batch_size"):
            check_value(f"trainer.{name}", getattr(self, name), "integer", low=1, example=getattr(TrainConfig, name))
        if self.amp not in ("auto", "bf16", "none"):
            raise ConfigError(f"trainer.amp must be auto, bf16 or none, got {shown(self.amp)}; set trainer.amp=auto")
        if self.data_on_device not in ("auto", "yes", "no"):
            raise ConfigError(
                f"trainer.data_on_device must be auto, yes or no, got {shown(self.data_on_device)}; "
                "set trainer.data_on_device=auto"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(
                f"trainer.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {shown(self.compile_mode)}; "
                "set trainer.compile_mode=default"
            )
        for name in ("compile", "progress"):
            check_value(f"trainer.{name}", getattr(self, name), "bool", example=getattr(TrainConfig, name))
        for name in ("warmup_lr", "min_lr"):
            check_value(f"trainer.{name}", getattr(self, name), low=0, example=getattr(TrainConfig, name))
        check_value("trainer.label_smoothing", self.label_smoothing, low=0, high=1, high_open=True, example=0.1)
        check_value("trainer.grad_clip", self.grad_clip, low=0, low_open=True, optional=True, example=1.0)
        check_value("trainer.eval_every", self.eval_every, "integer", low=0, example=0)
        if self.warmup_epochs is None:
            self.warmup_epochs = int(self.epochs / 10 + 0.5)
        if (
            isinstance(self.warmup_epochs, bool)
            or not isinstance(self.warmup_epochs, int)
            or not 0 <= self.warmup_epochs <= self.epochs
        ):
            raise ConfigError(
                f"trainer.warmup_epochs must be an integer in [0, epochs={self.epochs}], "
                f"got {shown(self.warmup_epochs)}; leave it unset (null) for a tenth of the epochs"
            )


@dataclasses.dataclass
class EpochStats:
    epoch: int
    train_loss: float
    lr: float
    images_per_s: float
    eval_top1: float | None = None
    seconds: float | None = None  # the epoch's training wall time (in a pack: the run's share, wall / K)


@dataclasses.dataclass
class TrainResult:
    train_loss: float  # mean loss of the last epoch
    top1: float  # on the evaluated split, after the last epoch (the reported number)
    eval_loss: float
    epochs: list[EpochStats]
    train_seconds: float
    eval_seconds: float
    train_images_per_s: float
    peak_mem_mb: float
    peak_mem_kind: str  # "cuda_max_allocated" | "cpu_peak_rss"
    amp: str
    best_epoch_top1: float | None = None  # flagged extra: best over periodic evaluations (test-set selection)
    best_epoch: int | None = None


@dataclasses.dataclass
class Resume:
    """Where a run stopped at a rung (``train(stop_after=...)``) goes on from: after ``epoch`` epochs of its
    schedule, with the history and best periodic evaluation so far (its model's trainable tensors and its
    optimizer's state restored by the caller)."""

    epoch: int
    history: list[EpochStats]
    best: tuple[float, int] | None = None


class Normalizer:
    """uint8 [N,3,H,W] -> (x/255 - mean) / std in ``dtype`` (the model's: float32, or float64 for exact checks),
    on the device."""

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], device: torch.device, dtype: torch.dtype = torch.float32
    ):
        self.dtype = dtype
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=device, dtype=dtype))).view(1, 3, 1, 1)
        self.shift = (
            -torch.tensor(mean, device=device, dtype=dtype) / torch.tensor(std, device=device, dtype=dtype)
        ).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, images.to(self.dtype), self.scale)


def at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: bf16 (autocast) raised to float32; float32 and float64 as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def input_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype the model computes in (its first floating parameter's): what its input is cast to."""
    for p in model.parameters():
        if p.is_floating_point():
            return torch.float64 if p.dtype == torch.float64 else torch.float32
    return torch.float32


def resolve_amp(amp: str, device: torch.device) -> str:
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "none"
    return amp


def autocast(amp: str, device: torch.device):
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _place(images: torch.Tensor, device: torch.device, policy: str) -> torch.Tensor:
    """Keep a split on the GPU when it fits comfortably, else in pinned host memory."""
    if device.type != "cuda" or policy == "no":
        return images
    if policy == "auto":
        free, _ = torch.cuda.mem_get_info(device)
        if images.numel() > 0.25 * free:
            return images.pin_memory()
    return images.to(device, non_blocking=True)


def _batches(
    n: int, batch_size: int, generator: torch.Generator | None, device: torch.device
) -> Iterator[torch.Tensor]:
    """Index batches on ``device`` (where the images live): one host-to-device copy per epoch."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from order.to(device).split(batch_size)


@contextlib.contextmanager
def frozen_in(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Frozen ``nn.Linear`` / ``nn.Conv*`` weights and biases held in ``dtype`` inside the block, their float32
    tensors put back after it.

    Autocast casts them to its dtype at every call and caches no cast of a tensor that needs no gradient,
    so a step would cast every frozen weight again (ViT-B: 86 M values, about 100 kernels). Held in bf16
    they are what autocast would compute with, so the results are the same, bit for bit. Norms, position
    embeddings, deltas and heads stay as they are; a method that reads its host's frozen weight itself
    (DoRA's column norms) keeps them all in float32.
    """
    method = getattr(model, "vpeft_method", None)
    if method is not None and method.reads_frozen_weights:
        yield
        return
    kept: list[tuple[nn.Parameter, torch.Tensor]] = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            for name in ("weight", "bias"):
                p = getattr(module, name, None)
                if isinstance(p, nn.Parameter) and not p.requires_grad and p.dtype == torch.float32:
                    kept.append((p, p.data))
                    p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, data in kept:
            p.data = data


def fuse(optimizer: torch.optim.Optimizer) -> None:
    """Adam and AdamW over CUDA tensors take their fused kernel (one launch for all tensors, not one per tensor and
    operation), unless the caller chose an implementation; the update rule is the same."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or optimizer.state:
        return
    groups = optimizer.param_groups
    if all(g.get("fused") is None and g.get("foreach") is None and not g.get("differentiable") for g in groups) and all(
        p.is_cuda and p.is_floating_point() for g in groups for p in g["params"]
    ):
        for g in groups:
            g["fused"] = True


def step_keys(seeds: Sequence[int], steps: int, device: torch.device) -> torch.Tensor:
    """``[steps, runs, 2]`` int64 keys ``(seed, step)`` of every step, made once on the device."""
    seed = torch.tensor(list(seeds), dtype=torch.int64)
    step = torch.arange(steps, dtype=torch.int64)
    keys = torch.stack(torch.broadcast_tensors(seed[None, :], step[:, None]), dim=-1)
    return keys.to(device)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss_kb / (2**20 if sys.platform == "darwin" else 2**10), "cpu_peak_rss"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int = 256,
    amp: str = "auto",
    progress: bool = False,
    desc: str = "evaluating",
) -> tuple[float, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` on a uint8 split."""
    amp = resolve_amp(amp, device)
    normalize = Normalizer(mean, std, device, input_dtype(model))
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    labels = labels.to(images.device)
    batches = _batches(len(labels), batch_size, None, images.device)
    total = math.ceil(len(labels) / batch_size)
    for idx in progress_bar(batches, desc=desc, unit="batch", total=total, enabled=progress):
        x = normalize(images[idx].to(device, non_blocking=True))
        y = labels[idx].to(device, non_blocking=True)
        with autocast(amp, device):
            logits = model(x)
        correct += (logits.argmax(-1) == y).sum()
        loss_sum += F.cross_entropy(at_least_fp32(logits), y, reduction="sum").double()
    model.train(was_training)
    n = max(len(labels), 1)
    return 100.0 * correct.item() / n, loss_sum.item() / n


def train(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    eval_images: torch.Tensor,
    eval_labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    seed: int = 0,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    resume: Resume | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train the trainable parameters of ``model`` and evaluate it after the last epoch.

    ``optimizer`` holds the parameters to train (the caller decides which). A NaN or infinite
    epoch loss raises DivergedError; the learning rate follows linear warm-up then cosine decay,
    updated every step. Under bf16 autocast the frozen weights are held in bf16 meanwhile (``frozen_in``).

    ``stop_after`` ends training after that epoch of the schedule (a rung of successive halving: the same
    learning-rate curve, evaluated there); ``resume`` continues such a run from where it stopped, its model
    and optimizer restored by the caller: the data order, learning rate and dropout masks go on exactly as
    if the run had never stopped.
    """
    model.to(device)
    held = frozen_in(model, torch.bfloat16) if resolve_amp(config.amp, device) == "bf16" else contextlib.nullcontext()
    with held:
        return _train(model, train_images, train_labels, eval_images, eval_labels, optimizer, config, mean, std,
                      device, seed, on_epoch_end, resume, stop_after)  # fmt: skip


def _train(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    eval_images: torch.Tensor,
    eval_labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    seed: int,
    on_epoch_end: Callable[[EpochStats], None] | None,
    resume: Resume | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    cfg = config
    first = resume.epoch if resume is not None else 0
    last = cfg.epochs if stop_after is None else stop_after
    if not 0 <= first < last <= cfg.epochs:
        raise ValueError(f"cannot train epochs {first + 1}..{last} of a {cfg.epochs}-epoch schedule")
    method = getattr(model, "vpeft_method", None)  # the applied method's training hooks (vpeft.methods._base)
    if (first or last < cfg.epochs) and method is not None and type(method).on_step is not Method.on_step:
        raise ConfigError(f"{method.name} keeps per-step state outside its tensors (on_step), so its runs cannot "
                          "stop at a rung and resume; tune it on the full grid")  # fmt: skip
    amp = resolve_amp(cfg.amp, device)
    model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fuse(optimizer)
    step_model = torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model
    normalize = Normalizer(mean, std, device, input_dtype(model))
    images = _place(train_images, device, cfg.data_on_device)
    eval_images = _place(eval_images, device, cfg.data_on_device)
    labels = train_labels.to(images.device)
    n = len(labels)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=cfg.epochs * steps_per_epoch,
        lr_min=cfg.min_lr,
        warmup_t=cfg.warmup_epochs * steps_per_epoch,
        warmup_lr_init=cfg.warmup_lr,
        t_in_epochs=False,
    )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    generator = torch.Generator().manual_seed(seed)
    history: list[EpochStats] = list(resume.history) if resume is not None else []
    best: tuple[float, int] | None = resume.best if resume is not None else None
    step = first * steps_per_epoch
    for _ in range(first):  # the data orders of the epochs already trained, drawn again
        torch.randperm(n, generator=generator)
    if step:
        scheduler.step_update(step)
    total_steps = cfg.epochs * steps_per_epoch
    drawing, _ = noise.counter_based(model)  # dropout and drop path masks: f(seed, step, site, position)
    keys = step_keys([seed], total_steps, device) if drawing else None
    model.train()
    bar = progress_bar(desc=f"training epoch {first + 1}/{cfg.epochs}", total=(last - first) * steps_per_epoch,
                       unit="batch", enabled=cfg.progress)  # fmt: skip
    _sync(device)
    start = time.perf_counter()
    for epoch in range(first, last):
        bar.set_description(f"training epoch {epoch + 1}/{cfg.epochs}", refresh=False)
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for idx in _batches(n, cfg.batch_size, generator, images.device):
            b = len(idx)
            if cfg.compile and b < cfg.batch_size:  # one shape for the compiled step: the last batch padded with
                idx = torch.cat([idx, idx[:1].expand(cfg.batch_size - b)])  # repeats that the loss leaves out
            x = normalize(images[idx].to(device, non_blocking=True))
            y = labels[idx[:b]].to(device, non_blocking=True)
            with autocast(amp, device), noise.keyed(keys[step, 0]) if keys is not None else contextlib.nullcontext():
                logits = step_model(x)[:b]
            loss = F.cross_entropy(at_least_fp32(logits), y, label_smoothing=cfg.label_smoothing)
            reg = method.regularization(model) if method is not None else None
            optimizer.zero_grad(set_to_none=True)
            (loss if reg is None else loss + reg).backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            step += 1
            if method is not None:
                method.on_step(model, step, total_steps)  # gradients still present
            scheduler.step_update(step)
            loss_sum += loss.detach().double() * b
            bar.update()
        epoch_loss = loss_sum.item() / n  # the one host sync of the epoch
        if not math.isfinite(epoch_loss):
            raise DivergedError(
                f"training diverged: loss is {epoch_loss} in epoch {epoch + 1}; lower optim.lr or set trainer.grad_clip"
            )
        stats = EpochStats(
            epoch=epoch + 1,
            train_loss=epoch_loss,
            lr=optimizer.param_groups[0]["lr"],
            images_per_s=n / (time.perf_counter() - epoch_start),
            seconds=time.perf_counter() - epoch_start,
        )
        if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < last:
            stats.eval_top1, _ = evaluate(model, eval_images, eval_labels, mean, std, device, cfg.eval_batch_size, amp)
            if best is None or stats.eval_top1 > best[0]:
                best = (stats.eval_top1, epoch + 1)
            model.train()
        history.append(stats)
        bar.set_postfix(loss=f"{epoch_loss:.4f}", img_s=f"{stats.images_per_s:.0f}", refresh=False)
        if on_epoch_end is not None:
            on_epoch_end(stats)
    bar.close()
    _sync(device)
    train_seconds = time.perf_counter() - start
    eval_start = time.perf_counter()
    top1, eval_loss = evaluate(
        model, eval_images, eval_labels, mean, std, device, cfg.eval_batch_size, amp, progress=cfg.progress
    )
    _sync(device)
    eval_seconds = time.perf_counter() - eval_start
    return train_result(cfg, history, top1, eval_loss, best, train_seconds, eval_seconds, n, amp, device,
                        epochs=last - first)  # fmt: skip


def train_result(
    cfg: TrainConfig,
    history: list[EpochStats],
    top1: float,
    eval_loss: float,
    best: tuple[float, int] | None,
    train_seconds: float,
    eval_seconds: float,
    n: int,
    amp: str,
    device: torch.device,
    epochs: int | None = None,
) -> TrainResult:
    """A run's result once its last evaluation is in: that top-1 on the last epoch trained and, with
    ``eval_every``, in the best of the periodic ones (a flagged extra, never the reported number).
    ``epochs``: how many this call trained (all of the schedule unless it resumed or stopped at a rung)."""
    history[-1].eval_top1 = top1
    end = history[-1].epoch
    if cfg.eval_every:
        best = max(best or (top1, end), (top1, end))
    peak, kind = peak_memory_mb(device)
    return TrainResult(
        train_loss=history[-1].train_loss,
        top1=top1,
        eval_loss=eval_loss,
        epochs=history,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        train_images_per_s=(cfg.epochs if epochs is None else epochs) * n / train_seconds,
        peak_mem_mb=peak,
        peak_mem_kind=kind,
        amp=amp,
        best_epoch_top1=best[0] if best else None,
        best_epoch=best[1] if best else None,
    )
