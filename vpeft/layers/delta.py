"""How a delta attaches to a frozen backbone.

Two mechanisms cover every method:

* ``OutputDelta``: a module attached as a child of a backbone layer that rewrites that layer's
  output (``forward(inp, out) -> out``) through one forward hook. The layer keeps its class and
  its parameter names, so the backbone's state_dict keys never change and the delta's keys read
  ``<layer>.<child>.<param>`` (``blocks.0.attn.qkv.lora.A.q``).
* modules that re-host a timm block's children under the same names and change its forward
  (``AdaptFormerBlock``, ``PromptedBlocks``), for methods that need a new data path.

Every module whose parameters belong to a delta subclasses ``Delta``, so the trainable set is found
by type, never by parameter names.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn


class Delta(nn.Module):
    """Marker base: the parameters returned by ``delta_parameters`` are a method's delta."""

    # fixed float attributes (a scale) that runs packed together may hold different values of: in a pack
    # (vpeft.engine.packed) each becomes a [K] tensor, so the layer's forward must accept a 0-dim tensor there
    per_run: ClassVar[tuple[str, ...]] = ()

    def delta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.named_parameters()

    def identity_values(self) -> dict[str, torch.Tensor]:
        """Each parameter's value (by its name here) at which the layer leaves its host unchanged, where that is
        not zero (a scale's one): delta-space merging combines the changes from these values."""
        return {}


class OutputDelta(Delta):
    """A delta that rewrites the output of the layer it is attached to."""

    def forward(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _apply_output_deltas(host: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    for child in host.children():
        if isinstance(child, OutputDelta):
            out = child(args[0], out)
    return out


def _has_hook(host: nn.Module) -> bool:
    return any(h is _apply_output_deltas for h in host._forward_hooks.values())


def attach(host: nn.Module, name: str, delta: OutputDelta) -> OutputDelta:
    """Attach ``delta`` to ``host`` as child ``name``; host(x) then returns delta(x, host(x))."""
    if name in host._modules:
        raise ValueError(f"{type(host).__name__} already has a child named {name!r}")
    host.add_module(name, delta)
    if not _has_hook(host):
        host.register_forward_hook(_apply_output_deltas)
    return delta


def detach(host: nn.Module, name: str) -> None:
    """Remove an attached delta; the hook goes when the host has none left."""
    del host._modules[name]
    if not any(isinstance(c, OutputDelta) for c in host.children()):
        for key in [k for k, h in host._forward_hooks.items() if h is _apply_output_deltas]:
            del host._forward_hooks[key]


def attached(model: nn.Module, kind: type[OutputDelta]) -> Iterator[tuple[nn.Module, str, OutputDelta]]:
    """Yield (host, child name, delta) for every attached delta of type ``kind``."""
    for host in list(model.modules()):
        for name, child in list(host.named_children()):
            if isinstance(child, kind):
                yield host, name, child
