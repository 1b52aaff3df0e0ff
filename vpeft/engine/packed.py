"""Packed training: K runs of one method share each training step.

The runs of a sweep share everything but their delta, head, learning rate, weight decay, seed, task and
a method's fixed scale (LoRA's alpha, ``Method.per_run_config``). So one forward and backward serves K
of them: every trainable tensor is stacked ``[K, ...]`` (each fixed scale ``[K]``) and the
model runs under ``torch.func.vmap`` over that stack (``functional_call`` of one template model), so
each run's samples pass through its own delta and head while the frozen weights are read once for
all (a frozen linear layer becomes one GEMM over K x batch rows; the deltas become batched GEMMs).
The loss is the sum of each run's own mean loss, so a run's gradient is exactly what it would be
alone: a ViT mixes no information across samples (LayerNorm is per token, there is no BatchNorm).
Each run keeps its own data order (its seed), learning-rate schedule (timm's cosine, driven through
the run's own optimizer), weight decay and gradient clipping; its optimizer's update is applied to
its slice of the stack with the same arithmetic as ``torch.optim.AdamW`` / ``SGD``. Runs of tasks
with fewer classes get a zero-padded head whose extra logits are -inf (they take no probability and
no gradient). A run whose loss diverges stops learning (learning rate 0) and fails alone; the others
go on. After training every run's model holds its trained tensors and its optimizer its state, as
if ``vpeft.engine.train`` had trained it alone.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.func import functional_call, vmap

from vpeft.core import applied_method
from vpeft.engine.loop import (
    DivergedError,
    EpochStats,
    Normalizer,
    Resume,
    TrainConfig,
    TrainResult,
    _place,
    _sync,
    at_least_fp32,
    autocast,
    frozen_in,
    input_dtype,
    resolve_amp,
    step_keys,
    train_result,
)
from vpeft.errors import ConfigError
from vpeft.layers import noise
from vpeft.methods._base import Method, head_parameters
from vpeft.progress import progress as progress_bar

# the optimizers whose update is reproduced on the stack, and the group options every run must share
_ADAMW_SHARED = ("betas", "eps", "amsgrad", "maximize")
_SGD_SHARED = ("momentum", "dampening", "nesterov", "maximize")


class PackError(ConfigError):
    """Runs that cannot share a training step (the message names what differs and what to do)."""


@dataclasses.dataclass
class PackedRun:
    """One run of a pack, built exactly as a run alone is: its model (method applied, head sized to
    its task), its optimizer over the model's trainable tensors, its splits and its seed."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_images: torch.Tensor
    train_labels: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor
    seed: int = 0
    on_epoch_end: Callable[[EpochStats], None] | None = None


def check_packable(method: Method | None, model: nn.Module) -> None:
    """Raise PackError if runs of ``method`` on ``model`` cannot share a training step, saying why."""
    if method is None:
        raise PackError("a packed run needs a vpeft method applied to its model (vpeft.apply_method)")
    if method.runs_alone:
        raise PackError(f"{method.name} runs cannot be packed: {method.runs_alone}; train them one by one (pack=1)")
    cls = type(method)
    if cls.regularization is not Method.regularization or cls.on_step is not Method.on_step:
        raise PackError(f"{method.name} runs cannot be packed: the method has per-step training hooks")
    _, left = noise.counter_based(model)  # every dropout and drop path keyed by (seed, step, site, position)
    if left:
        shown = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
        raise PackError(
            f"packed runs draw every random number from their own keyed stream, but {shown} draws from torch's "
            "generator (a rate handed to a fused kernel); set it to 0, or train one by one (pack=1)"
        )


class _Group:
    """One parameter group across the pack: the stacked tensors and each run's options for them."""

    def __init__(self, names: list[str], options: list[dict], kind: str, device: torch.device):
        self.names = names
        self.options = options  # per run: the torch param group (its lr changes each step)
        self.kind = kind
        self.weight_decay = torch.tensor(
            [float(o["weight_decay"]) for o in options], dtype=torch.float64, device=device
        )

    def lr(self, active: torch.Tensor) -> torch.Tensor:
        """Each run's current learning rate (0 for runs that stopped)."""
        lrs = torch.tensor([float(o["lr"]) for o in self.options], dtype=torch.float64)
        return lrs.to(active.device) * active


def _per_run(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[K]`` values shaped to broadcast over a stacked ``[K, ...]`` tensor, in its dtype."""
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


class _StackedOptimizer:
    """AdamW or SGD (with momentum) on stacked tensors: torch's update rule, each run with its own lr and wd."""

    def __init__(self, groups: list[_Group], params: dict[str, torch.Tensor], first: torch.optim.Optimizer):
        self.groups, self.params = groups, params
        self.kind = groups[0].kind
        self.opts = first.param_groups[0]
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.step_count = 0

    @torch.no_grad()
    def load(self, runs: Sequence[PackedRun], head: set[str], c_max: int) -> None:
        """Each run's optimizer state (a rung's, restored into its torch optimizer) into its slice of the stack:
        the reverse of ``_write_back``. Every run must hold state for the same tensors, at the same step."""
        steps = set()
        for name in self.params:
            states = [run.optimizer.state.get(dict(run.model.named_parameters())[name]) for run in runs]
            if all(not st for st in states):
                continue
            if not all(states):
                raise PackError(f"some runs of the pack have optimizer state for {name} and some none")
            keys = ("exp_avg", "exp_avg_sq") if self.kind == "adamw" else ("momentum_buffer",)
            stacked = {}
            for key in keys:
                tensors = [st[key].detach().to(self.params[name].device, self.params[name].dtype) for st in states]
                if name in head:
                    tensors = [F.pad(t, (0, 0) * (t.dim() - 1) + (0, c_max - t.shape[0])) for t in tensors]
                stacked[key] = torch.stack(tensors)
            self.state[name] = stacked
            steps.update(int(st["step"]) for st in states if "step" in st)
        if len(steps) > 1:
            raise PackError(f"the runs of a pack resume from different optimizer steps ({sorted(steps)})")
        self.step_count = steps.pop() if steps else 0

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        self.step_count += 1
        for group in self.groups:
            lr = group.lr(active)
            for name in group.names:
                p = self.params[name]
                if p.grad is None:
                    continue
                grad = -p.grad if group.options[0]["maximize"] else p.grad
                if self.kind == "adamw":
                    self._adamw(name, p, grad, lr, group.weight_decay, group.options[0])
                else:
                    self._sgd(name, p, grad, lr, group.weight_decay, group.options[0])

    def _adamw(self, name, p, grad, lr, wd, opts) -> None:
        beta1, beta2 = opts["betas"]
        state = self.state.setdefault(name, {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)})
        m, v = state["exp_avg"], state["exp_avg_sq"]
        p.mul_(_per_run(1 - lr * wd, p))
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = self.step_count
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        step_size = _per_run(lr / bias_correction1, p)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(opts["eps"])
        p.sub_(m.div(denom).mul_(step_size))

    def _sgd(self, name, p, grad, lr, wd, opts) -> None:
        d_p = grad.add(p * _per_run(wd, p)) if bool((wd != 0).any()) else grad
        momentum = opts["momentum"]
        if momentum:
            state = self.state.get(name)
            if state is None:
                buf = torch.clone(d_p).detach()
                self.state[name] = {"momentum_buffer": buf}
            else:
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(d_p, alpha=1 - opts["dampening"])
            d_p = d_p.add(buf, alpha=momentum) if opts["nesterov"] else buf
        p.sub_(d_p * _per_run(lr, p))


def _optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    if type(optimizer) is torch.optim.AdamW:
        return "adamw"
    if type(optimizer) is torch.optim.SGD:
        return "sgd"
    raise PackError(
        f"packed runs train with torch.optim.AdamW or SGD, not {type(optimizer).__name__}; "
        "use optim=adamw or optim=sgd, or train one by one (pack=1)"
    )


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _check_pack(runs: Sequence[PackedRun]) -> tuple[list[str], set[str], str]:
    """The trainable names (in order), the head's names and the optimizer kind; PackError if the runs differ."""
    if not runs:
        raise PackError("a pack needs at least one run")
    first = runs[0]
    method = applied_method(first.model)
    check_packable(method, first.model)
    kind = _optimizer_kind(first.optimizer)
    shared = _ADAMW_SHARED if kind == "adamw" else _SGD_SHARED
    head = {n for n, _ in head_parameters(first.model)}
    trainable = [n for n, p in first.model.named_parameters() if p.requires_grad]
    shapes = {n: p.shape for n, p in first.model.named_parameters()}
    frozen = {n: t for n, t in first.model.state_dict().items() if n not in trainable}
    n_train = len(first.train_labels)

    def shared_config(m: Method) -> dict:
        return {k: v for k, v in m.config_dict().items() if k not in m.per_run_config}

    for i, run in enumerate(runs[1:], start=1):
        other = applied_method(run.model)
        if other is None or other.name != method.name or shared_config(other) != shared_config(method):
            may = f" (they may differ in {', '.join(method.per_run_config)})" if method.per_run_config else ""
            raise PackError(
                f"run {i} of the pack differs from run 0 in its method: "
                f"{other.name if other else None} {other.config_dict() if other else {}} against "
                f"{method.name} {method.config_dict()}; a pack shares one method config{may}"
            )
        names = [n for n, p in run.model.named_parameters() if p.requires_grad]
        if names != trainable:
            raise PackError(f"run {i} of the pack trains other tensors than run 0; a pack shares one trainable set")
        for n, p in run.model.named_parameters():
            if n in trainable and n not in head and p.shape != shapes[n]:
                raise PackError(f"run {i} of the pack has {n} of shape {list(p.shape)}, run 0 {list(shapes[n])}")
        for n, t in run.model.state_dict().items():
            if n not in trainable and not (n in frozen and frozen[n].shape == t.shape and torch.equal(frozen[n], t)):
                raise PackError(
                    f"run {i} of the pack has another frozen {n} than run 0: packed runs share one backbone "
                    "(the same backbone config and weights)"
                )
        if len(run.train_labels) != n_train:
            raise PackError(
                f"run {i} of the pack has {len(run.train_labels)} training images, run 0 {n_train}: "
                "packed runs take the same number of steps (one split size)"
            )
        if _optimizer_kind(run.optimizer) != kind:
            raise PackError(
                f"run {i} of the pack trains with {type(run.optimizer).__name__}, run 0 with "
                f"{type(first.optimizer).__name__}; a pack shares one optimizer"
            )
        b = first.optimizer.param_groups[0]
        for a in run.optimizer.param_groups:
            for key in shared:
                if a.get(key) != b.get(key):
                    raise PackError(
                        f"run {i} of the pack has optim {key}={a.get(key)!r}, run 0 {b.get(key)!r}; "
                        f"packed runs' optimizers may differ in lr and weight_decay only"
                    )
    for i, run in enumerate(runs):
        if kind == "adamw" and run.optimizer.param_groups[0].get("amsgrad"):
            raise PackError(f"run {i}: packed AdamW does not implement amsgrad; set optim.amsgrad=false or pack=1")
        if any(g.get("differentiable") or g.get("capturable") for g in run.optimizer.param_groups):
            raise PackError(f"run {i}: packed runs need optimizers without differentiable or capturable")
    return trainable, head, kind


def _groups(runs: Sequence[PackedRun], trainable: list[str], kind: str, device: torch.device) -> list[_Group]:
    """The trainable tensors grouped by which param group holds them in each run's optimizer.

    Runs may group differently (a run with weight decay 0 has one group, timm's rule gives the others
    two; optim.decay_1d changes the rule): each tensor takes, per run, the lr and weight decay of the
    group that holds it there.
    """
    where = []
    for i, run in enumerate(runs):
        names = _param_names(run.model)
        held = {names[id(p)]: g for g, group in enumerate(run.optimizer.param_groups) for p in group["params"]}
        if sorted(held) != sorted(trainable):
            raise PackError(f"the optimizer of run {i} of the pack does not hold exactly its model's trainable tensors")
        where.append(held)
    patterns: dict[tuple[int, ...], list[str]] = {}
    for name in trainable:
        patterns.setdefault(tuple(held[name] for held in where), []).append(name)
    return [
        _Group(names, [run.optimizer.param_groups[g] for run, g in zip(runs, pattern, strict=True)], kind, device)
        for pattern, names in patterns.items()
    ]


def _cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, valid: torch.Tensor | None, classes: torch.Tensor, smoothing: float
) -> torch.Tensor:
    """Each run's mean cross-entropy ``[K]`` over its own classes (logits ``[K, n, C]``)."""
    k, n, c = logits.shape
    if valid is None:  # every run has all C classes: torch's own loss
        per_sample = F.cross_entropy(logits.reshape(k * n, c), y.reshape(k * n), reduction="none",
                                     label_smoothing=smoothing)  # fmt: skip
        return per_sample.view(k, n).mean(1)
    logp = torch.log_softmax(logits.masked_fill(~valid[:, None, :], float("-inf")), dim=-1)
    nll = -logp.gather(-1, y[..., None]).squeeze(-1)
    if smoothing:
        smooth = -logp.masked_fill(~valid[:, None, :], 0.0).sum(-1) / classes[:, None].to(logp.dtype)
        nll = (1 - smoothing) * nll + smoothing * smooth
    return nll.mean(1)


def train_packed(
    runs: Sequence[PackedRun],
    config: TrainConfig,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    resumes: Sequence[Resume | None] | None = None,
    stop_after: int | None = None,
) -> list[TrainResult | DivergedError]:
    """Train the runs together; return each run's result (as ``vpeft.engine.train`` gives it) or its error.

    Every run's model ends with its trained tensors and its optimizer with its state. Training time is
    the pack's wall time divided by K (each run's share); images per second are per run on that share.
    ``stop_after`` and ``resumes`` are ``train``'s, for every run of the pack at once (successive halving's
    survivors of one rung): the pack stops after that epoch of the schedule, and goes on from the epoch all its
    runs stopped at, their models and optimizers holding the rung's state (from a pack or from a run alone).
    """
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        # on CPU attention has no batching rule: torch loops over the runs, and says so
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
        return _train_packed(runs, config, mean, std, device, stack, resumes, stop_after)


def _train_packed(
    runs: Sequence[PackedRun],
    config: TrainConfig,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    stack: contextlib.ExitStack,
    resumes: Sequence[Resume | None] | None,
    stop_after: int | None,
) -> list[TrainResult | DivergedError]:
    cfg = config
    trainable, head, kind = _check_pack(runs)
    resumes = list(resumes) if resumes is not None else [None] * len(runs)
    starts = {r.epoch if r is not None else 0 for r in resumes}
    if len(resumes) != len(runs) or len(starts) > 1:
        raise PackError("the runs of a pack resume from one epoch (one resume per run, each at the same rung)")
    first = starts.pop()
    last = cfg.epochs if stop_after is None else stop_after
    if not 0 <= first < last <= cfg.epochs:
        raise ValueError(f"cannot train epochs {first + 1}..{last} of a {cfg.epochs}-epoch schedule")
    amp = resolve_amp(cfg.amp, device)
    k = len(runs)
    classes = [len(_head_rows(r.model, head)) for r in runs]
    c_max = max(classes)
    template = runs[0].model
    if classes[0] != c_max and hasattr(template, "reset_classifier"):
        # the template holds a head as wide as the pack's widest (the runs' own heads are stacked below), so that
        # a compiled step serves every pack of that width, whichever run comes first
        template = copy.deepcopy(template)
        with torch.random.fork_rng(devices=[]):
            template.reset_classifier(c_max)
    template.to(device)
    if amp == "bf16":  # frozen weights held in bf16 while the pack trains and evaluates (loop.frozen_in)
        stack.enter_context(frozen_in(template, torch.bfloat16))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    params: dict[str, torch.Tensor] = {}
    for name in trainable:
        tensors = [dict(r.model.named_parameters())[name].detach().to(device) for r in runs]
        if name in head:  # zero rows for the classes a run's task does not have
            tensors = [F.pad(t, (0, 0) * (t.dim() - 1) + (0, c_max - t.shape[0])) for t in tensors]
        params[name] = torch.stack(tensors).requires_grad_(True)
    groups = _groups(runs, trainable, kind, device)
    optimizer = _StackedOptimizer(groups, params, runs[0].optimizer)
    if first:
        optimizer.load(runs, head, c_max)  # the rung's optimizer state, each run's into its slice
    # each run's fixed scales (LoRA's alpha / r, ...) as [K] tensors the template reads in place of its floats
    inputs = {**params, **_per_run_values(runs, template, device, stack)}
    n_classes = torch.tensor(classes, device=device)
    valid = None if len(set(classes)) == 1 else torch.arange(c_max, device=device)[None, :] < n_classes[:, None]

    # data: each distinct split placed once; a step gathers every run's batch with one index
    train_x, train_y, offsets = _concat([(r.train_images, r.train_labels) for r in runs], device, cfg.data_on_device)
    normalize = Normalizer(mean, std, device, input_dtype(template))
    n = len(runs[0].train_labels)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    schedulers = [
        CosineLRScheduler(
            r.optimizer,
            t_initial=total_steps,
            lr_min=cfg.min_lr,
            warmup_t=cfg.warmup_epochs * steps_per_epoch,
            warmup_lr_init=cfg.warmup_lr,
            t_in_epochs=False,
        )
        for r in runs
    ]
    generators = [torch.Generator().manual_seed(r.seed) for r in runs]
    for g in generators:  # the data orders of the epochs already trained, drawn again
        for _ in range(first):
            torch.randperm(n, generator=g)
    step = first * steps_per_epoch
    if step:
        for s in schedulers:
            s.step_update(step)
    drawing = noise.number_sites(template)  # check_packable keyed the template's stochastic modules
    keys = step_keys([r.seed for r in runs], total_steps, device) if drawing else None
    active = torch.ones(k, dtype=torch.float64, device=device)
    failed: dict[int, DivergedError] = {}
    histories: list[list[EpochStats]] = [list(r.history) if r is not None else [] for r in resumes]
    best: list[tuple[float, int] | None] = [r.best if r is not None else None for r in resumes]

    batched = _batched(template, in_dims=(0, 0, 0 if keys is not None else None))
    step_batched = torch.compile(batched, mode=cfg.compile_mode) if cfg.compile else batched
    template.train()
    bar = progress_bar(desc=f"training {k} packed runs, epoch {first + 1}/{cfg.epochs}",
                       total=(last - first) * steps_per_epoch, unit="batch", enabled=cfg.progress)  # fmt: skip
    _sync(device)
    start = time.perf_counter()
    for epoch in range(first, last):
        bar.set_description(f"training {k} packed runs, epoch {epoch + 1}/{cfg.epochs}", refresh=False)
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
        orders = [torch.randperm(n, generator=g) + o for g, o in zip(generators, offsets, strict=True)]
        order = torch.stack(orders).to(train_x.device)  # [K, n]: run k's permutation of its own split
        for idx in order.split(cfg.batch_size, dim=1):
            b = idx.shape[1]
            if cfg.compile and b < cfg.batch_size:  # one shape for the compiled step: padded, left out of the loss
                idx = torch.cat([idx, idx[:, :1].expand(-1, cfg.batch_size - b)], dim=1)
            flat = idx.reshape(-1)
            x = normalize(train_x[flat].to(device, non_blocking=True)).view(k, idx.shape[1], *train_x.shape[1:])
            y = train_y[idx[:, :b].reshape(-1)].to(device, non_blocking=True).view(k, b)
            with autocast(amp, device):
                logits = step_batched(inputs, x, keys[step] if keys is not None else None)[:, :b]
            losses = _cross_entropy(at_least_fp32(logits), y, valid, n_classes, cfg.label_smoothing)
            for p in params.values():
                p.grad = None
            losses.sum().backward()
            if cfg.grad_clip:
                _clip_per_run(params, cfg.grad_clip)
            optimizer.step(active)
            step += 1
            for s in schedulers:
                s.step_update(step)
            loss_sum += losses.detach().double() * b
            bar.update()
        epoch_losses = (loss_sum / n).tolist()  # the one host sync of the epoch
        seconds = time.perf_counter() - epoch_start
        for i, run in enumerate(runs):
            if i in failed:
                continue
            if not math.isfinite(epoch_losses[i]):
                failed[i] = DivergedError(
                    f"training diverged: loss is {epoch_losses[i]} in epoch {epoch + 1}; lower optim.lr or set "
                    "trainer.grad_clip"
                )
                active[i] = 0.0
                continue
            stats = EpochStats(epoch=epoch + 1, train_loss=epoch_losses[i], lr=run.optimizer.param_groups[0]["lr"],
                               images_per_s=n * k / seconds, seconds=seconds / k)  # fmt: skip
            histories[i].append(stats)
        if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < last:
            live = [i for i in range(k) if i not in failed]
            for i, (top1, _) in zip(live, _evaluate(template, inputs, runs, live, valid, mean, std, device, cfg, amp),
                                    strict=True):  # fmt: skip
                histories[i][-1].eval_top1 = top1
                if best[i] is None or top1 > best[i][0]:
                    best[i] = (top1, epoch + 1)
            template.train()
        for i, run in enumerate(runs):
            if i not in failed and run.on_epoch_end is not None:
                run.on_epoch_end(histories[i][-1])
        bar.set_postfix(loss=f"{sum(epoch_losses) / k:.4f}", refresh=False)
        if len(failed) == k:
            break
    bar.close()
    _sync(device)
    train_seconds = (time.perf_counter() - start) / k  # each run's share of the pack's wall time
    live = [i for i in range(k) if i not in failed]
    eval_start = time.perf_counter()
    scores = _evaluate(template, inputs, runs, live, valid, mean, std, device, cfg, amp) if live else []
    _sync(device)
    eval_seconds = (time.perf_counter() - eval_start) / max(len(live), 1)
    _write_back(runs, params, optimizer, head, classes)
    results: list[TrainResult | DivergedError] = []
    scored = dict(zip(live, scores, strict=True))
    for i in range(k):
        if i in failed:
            results.append(failed[i])
            continue
        top1, eval_loss = scored[i]
        results.append(train_result(cfg, histories[i], top1, eval_loss, best[i], train_seconds, eval_seconds, n, amp,
                                    device, epochs=last - first))  # fmt: skip
    return results


def _per_run_values(
    runs: Sequence[PackedRun], template: nn.Module, device: torch.device, stack: contextlib.ExitStack
) -> dict[str, torch.Tensor]:
    """Every fixed float a delta layer declares per run (``Delta.per_run``), stacked over the runs as a [K] float64
    tensor (a 0-dim tensor promotes no dtype, as the float did) under its name; for the pack's duration the
    template holds a buffer of that name in place of the float, so functional_call substitutes each run's value."""
    values: dict[str, torch.Tensor] = {}
    for path, module in template.named_modules():
        for attr in getattr(module, "per_run", ()):
            if not isinstance(getattr(module, attr), float):  # a learned scale is a trainable tensor already
                continue
            name = f"{path}.{attr}" if path else attr
            values[name] = torch.tensor([float(getattr(r.model.get_submodule(path), attr)) for r in runs],
                                        dtype=torch.float64, device=device)  # fmt: skip
            value = getattr(module, attr)
            delattr(module, attr)
            module.register_buffer(attr, values[name][0].clone(), persistent=False)
            stack.callback(_restore, module, attr, value)
    return values


def _restore(module: nn.Module, attr: str, value: float) -> None:
    del module._buffers[attr]
    setattr(module, attr, value)


def _batched(template: nn.Module, in_dims: tuple) -> Callable[..., torch.Tensor]:
    """The template model mapped over the runs: a function of the stacked trainable tensors, the batch (stacked,
    or shared) and the step's keys (or None). ``vmap`` is called inside it, so that torch.compile traces it whole."""

    def forward(params: dict[str, torch.Tensor], x: torch.Tensor, key: torch.Tensor | None) -> torch.Tensor:
        previous = noise.set_key(key)
        try:
            return functional_call(template, params, (x,))
        finally:
            noise.set_key(previous)

    def batched(params: dict[str, torch.Tensor], x: torch.Tensor, key: torch.Tensor | None) -> torch.Tensor:
        return vmap(forward, in_dims=in_dims)(params, x, key)

    return batched


def _head_rows(model: nn.Module, head: set[str]) -> torch.Tensor:
    """The head's output rows (its class count) from its first tensor."""
    named = dict(model.named_parameters())
    return named[sorted(head)[0]] if head else torch.empty(0)


def _concat(
    splits: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device, policy: str
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The distinct splits concatenated once, placed as a run's splits are, and each run's offset into them."""
    seen: dict[int, int] = {}
    parts_x, parts_y, offsets, size = [], [], [], 0
    for images, labels in splits:
        key = id(images)
        if key not in seen:
            seen[key] = size
            parts_x.append(images)
            parts_y.append(labels)
            size += len(labels)
        offsets.append(seen[key])
    images = parts_x[0] if len(parts_x) == 1 else torch.cat(parts_x)
    labels = parts_y[0] if len(parts_y) == 1 else torch.cat(parts_y)
    images = _place(images, device, policy)
    return images, labels.to(images.device), offsets


@torch.no_grad()
def _clip_per_run(params: dict[str, torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` on each run's slice: its global gradient norm over its own tensors."""
    grads = [p.grad for p in params.values() if p.grad is not None]
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])  # [tensors, K]
    total = torch.linalg.vector_norm(norms, dim=0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(_per_run(coef, g))


@torch.inference_mode()
def _evaluate(
    template: nn.Module,
    params: dict[str, torch.Tensor],
    runs: Sequence[PackedRun],
    which: list[int],
    valid: torch.Tensor | None,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    cfg: TrainConfig,
    amp: str,
) -> list[tuple[float, float]]:
    """Top-1 (%) and mean cross-entropy of each run in ``which`` on its own evaluation split; runs that share a
    split share its batches."""
    template.eval()
    normalize = Normalizer(mean, std, device, input_dtype(template))
    by_split: dict[int, list[int]] = {}
    for i in which:
        by_split.setdefault(id(runs[i].eval_images), []).append(i)
    out: dict[int, tuple[float, float]] = {}
    for members in by_split.values():
        images = _place(runs[members[0]].eval_images, device, cfg.data_on_device)
        labels = runs[members[0]].eval_labels.to(images.device)
        index = torch.tensor(members, device=device)
        sub = {name: p.detach().index_select(0, index) for name, p in params.items()}
        mask = None if valid is None else valid.index_select(0, index)
        shared = _batched(template, in_dims=(0, None, None))
        correct = torch.zeros(len(members), dtype=torch.long, device=device)
        loss_sum = torch.zeros(len(members), dtype=torch.float64, device=device)
        for start in range(0, len(labels), cfg.eval_batch_size):
            x = normalize(images[start : start + cfg.eval_batch_size].to(device, non_blocking=True))
            y = labels[start : start + cfg.eval_batch_size].to(device, non_blocking=True)
            with autocast(amp, device):
                logits = at_least_fp32(shared(sub, x, None))  # [k, b, C]
            if mask is not None:
                logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
            correct += (logits.argmax(-1) == y).sum(1)
            loss_sum += F.cross_entropy(logits.transpose(1, 2), y.expand(len(members), -1), reduction="none").sum(
                1
            ).double()  # fmt: skip
        total = max(len(labels), 1)
        for j, i in enumerate(members):
            out[i] = (100.0 * correct[j].item() / total, loss_sum[j].item() / total)
    return [out[i] for i in which]


@torch.no_grad()
def _write_back(
    runs: Sequence[PackedRun],
    params: dict[str, torch.Tensor],
    optimizer: _StackedOptimizer,
    head: set[str],
    classes: list[int],
) -> None:
    """Each run's slice of the stack into its own model, and its optimizer state into its optimizer."""
    for i, run in enumerate(runs):
        named = dict(run.model.named_parameters())
        for name, stacked in params.items():
            value = stacked[i][: classes[i]] if name in head else stacked[i]
            target = named[name]
            target.copy_(value.to(target.device, target.dtype))
            state = optimizer.state.get(name)
            if state is None:
                continue
            own = {
                key: (t[i][: classes[i]] if name in head else t[i]).detach().clone().to(target.device)
                for key, t in state.items()
            }
            if optimizer.kind == "adamw":
                own["step"] = torch.tensor(float(optimizer.step_count))
            run.optimizer.state[target] = own
