"""Per-task tensors stacked along a leading task axis, so one index gathers every sample's delta."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def _max_shape(shapes: Iterable[tuple[int, ...]]) -> tuple[int, ...]:
    out: tuple[int, ...] | None = None
    for s in shapes:
        out = s if out is None else tuple(max(a, b) for a, b in zip(out, s))
    return out if out is not None else ()


class Bank(nn.Module):
    """Named tensors of shape ``[capacity, *dims]``: row ``slot`` holds one task's tensor, zero-padded.

    Padding is what lets deltas of different sizes (LoRA ranks, bottlenecks, prompt lengths, class
    counts) share one batched computation: a padded row or column contributes exact zeros. The padded
    ``dims`` are the elementwise maximum over the tasks resident now, so detaching the largest task
    shrinks them back: the layout, and with it the arithmetic, depends on which tasks are resident, never
    on the order they came and went. Buffers are not persistent: a bank is filled from delta files, not
    from a state_dict.
    """

    def __init__(self) -> None:
        super().__init__()
        self._shapes: dict[str, dict[int, tuple[int, ...]]] = {}

    def has(self, key: str) -> bool:
        """Whether any resident task holds a tensor under ``key``."""
        return bool(self._shapes.get(key))

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def shape_of(self, key: str, slot: int) -> tuple[int, ...] | None:
        return self._shapes.get(key, {}).get(slot)

    def put(self, key: str, slot: int, tensor: torch.Tensor, capacity: int) -> None:
        """Write ``tensor`` as task ``slot``'s ``key`` (same device and dtype as the bank's, or the first)."""
        shapes = self._shapes.setdefault(key, {})
        shapes[slot] = tuple(tensor.shape)
        dims = _max_shape(shapes.values())
        buf = self._buffers.get(key)
        if buf is not None and buf.is_inference() and not torch.is_inference_mode_enabled():
            buf = buf.clone()  # a bank first filled under inference_mode stays writable outside it
            self.register_buffer(key, buf, persistent=False)
        if buf is None or buf.shape[0] < capacity or tuple(buf.shape[1:]) != dims:
            buf = self._realloc(key, max(capacity, 0 if buf is None else buf.shape[0]), dims, tensor)
        row = buf[slot]
        if tuple(tensor.shape) != dims:
            row.zero_()
        row[tuple(slice(0, n) for n in tensor.shape)].copy_(tensor)

    def clear(self, slot: int) -> None:
        """Forget task ``slot``: its rows become zeros, and padded dims shrink to the remaining tasks'."""
        for key in list(self._shapes):
            shapes = self._shapes[key]
            if shapes.pop(slot, None) is None:
                continue
            buf = self._buffers[key]
            if not shapes:
                del self._buffers[key]
                del self._shapes[key]
                continue
            buf[slot].zero_()
            dims = _max_shape(shapes.values())
            if dims != tuple(buf.shape[1:]):
                view = buf[(slice(None), *(slice(0, n) for n in dims))]
                self.register_buffer(key, view.clone(), persistent=False)

    def resize(self, capacity: int) -> None:
        """Make room for ``capacity`` tasks (never drops a row)."""
        for key, buf in list(self._buffers.items()):
            if buf.shape[0] < capacity:
                self._realloc(key, capacity, tuple(buf.shape[1:]), buf)

    def _realloc(self, key: str, capacity: int, dims: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        old = self._buffers.get(key)
        if old is not None:
            like = old
        new = torch.zeros(capacity, *dims, dtype=like.dtype, device=like.device)
        if old is not None:
            common = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, new.shape))
            new[common].copy_(old[common])
        self.register_buffer(key, new, persistent=False)
        return new

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
