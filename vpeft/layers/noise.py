"""Counter-based random numbers for training: every dropout and drop-path mask is a pure function of
(run seed, step, site, position).

A run's masks then do not depend on what else shares the process or the step: the same run trains to
the same result alone or packed with others (``vpeft.engine.packed``), at any position of the pack.
The training loop makes a key ``[seed, step]`` current (``keyed``); each stochastic module is a numbered
site (``number_sites``, in module order) and hashes the key, its site and each element's position in
the batch into a uniform number. The hash is integer arithmetic on tensors, so under ``torch.func.vmap``
a batched key gives each run its own masks. Without a current key (a model used outside vpeft's
training loop) the modules draw from torch's global generator, as ``nn.Dropout`` and timm's
``DropPath`` do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_LOW32 = 0xFFFFFFFF


class _Current:
    key: torch.Tensor | None = None  # int64 [2]: the run's seed and the step; batched under vmap


_CURRENT = _Current()


@contextlib.contextmanager
def keyed(key: torch.Tensor) -> Iterator[None]:
    """Draw every mask inside the block from ``key`` (int64 ``[seed, step]``)."""
    previous = set_key(key)
    try:
        yield
    finally:
        set_key(previous)


def set_key(key: torch.Tensor | None) -> torch.Tensor | None:
    """Make ``key`` current (None: none); return the previous one. ``keyed`` without a generator, for code that
    torch.compile traces."""
    previous, _CURRENT.key = _CURRENT.key, key
    return previous


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds) of values in [0, 2^32) held in int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _LOW32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _LOW32
    return x ^ (x >> 16)


def uniform(
    shape: tuple[int, ...], site: int, sub: int = 0, *, device=None, dtype=torch.float32
) -> torch.Tensor | None:
    """Uniform numbers in [0, 1) for ``shape`` at ``site`` from the current key, or None without one.

    Element ``i`` (row-major position in ``shape``) gets ``hash(seed, step, site, sub, i)``; 24 bits of it
    make the float, so every value is exact in float32 and bfloat16 keeps the comparison's meaning.
    """
    key = _CURRENT.key
    if key is None:
        return None
    seed = (key[0] ^ (key[0] >> 32)) & _LOW32
    base = _mix(_mix(_mix(seed) ^ (key[1] & _LOW32)) ^ (site & _LOW32))
    base = _mix(base ^ (sub & _LOW32))
    count = 1
    for size in shape:
        count *= size
    position = torch.arange(count, device=device if device is not None else key.device, dtype=torch.int64)
    bits = _mix(((position * 0x9E3779B9) + base) & _LOW32)
    return ((bits >> 8).to(dtype) * (1.0 / (1 << 24))).view(shape)


class Dropout(nn.Module):
    """``nn.Dropout`` whose mask comes from the current key (torch's generator without one)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = float(p)
        self.noise_site = 0  # set by number_sites

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.noise_site)

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.noise_site}"


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath``, scaled by the keep probability), keyed."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.noise_site = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        u = uniform((x.shape[0],), self.noise_site, device=x.device)
        if u is None:  # outside vpeft's training loop: torch's generator, as timm
            return x * x.new_empty(shape).bernoulli_(keep).div_(keep)
        return x * ((u >= self.drop_prob).to(x.dtype).view(shape) / keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, site={self.noise_site}"


def dropout(x: torch.Tensor, p: float, training: bool, site: int, sub: int = 0) -> torch.Tensor:
    """Element-wise dropout of ``x`` at ``site`` (``sub`` tells apart several draws of one module)."""
    if not training or p == 0.0:
        return x
    u = uniform(tuple(x.shape), site, sub, device=x.device)
    if u is None:
        return torch.nn.functional.dropout(x, p, True)
    return x * ((u >= p).to(x.dtype) / (1.0 - p))


def _is_timm_drop_path(module: nn.Module) -> bool:
    return type(module).__name__ == "DropPath" and type(module).__module__.startswith("timm.")


def counter_based(model: nn.Module) -> tuple[int, list[str]]:
    """Swap the model's ``nn.Dropout`` and timm ``DropPath`` modules (rate > 0) for the keyed ones and number
    every site; return how many keyed sites draw, and the stochastic modules that still draw from torch's
    generator.

    Attention's ``attn_drop`` stays: timm hands its rate to the fused attention kernel, which draws
    its own numbers (vpeft's configs leave it at 0).
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name == "attn_drop":
                continue
            if type(child) is nn.Dropout and child.p > 0:
                setattr(parent, name, Dropout(child.p))
            elif _is_timm_drop_path(child) and child.drop_prob > 0:
                setattr(parent, name, DropPath(child.drop_prob))
    drawing = number_sites(model)
    left = []
    for name, module in model.named_modules():
        rate = getattr(module, "p", None) if isinstance(module, nn.modules.dropout._DropoutNd) else None
        rate = getattr(module, "drop_prob", rate) if _is_timm_drop_path(module) else rate
        if rate:
            left.append(f"{name} ({type(module).__name__} {rate:g})")
    return drawing, left


_RATES = ("p", "drop_prob", "dropout")  # where a keyed module keeps its rate


def number_sites(model: nn.Module) -> int:
    """Number every keyed module (those with a ``noise_site``) in module order; return how many draw (rate > 0)."""
    drawing = 0
    for count, module in enumerate(m for m in model.modules() if hasattr(m, "noise_site")):
        module.noise_site = count
        drawing += any(isinstance(r, float) and r > 0 for r in (getattr(module, a, 0.0) for a in _RATES))
    return drawing
