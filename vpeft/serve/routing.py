"""Which task each sample belongs to: planned once per forward pass on the host, read by every site."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from vpeft.errors import VpeftError

STRATEGIES = ("auto", "gather", "segment")


@dataclasses.dataclass
class Route:
    """One batch's task layout, as the backbone sees the batch (after any regrouping by the model).

    ``single``: the slot when every sample has the same task; sites then use that task's tensors as a
    single-task model does. Otherwise ``segments`` is set when the batch is grouped by task (the
    ``segment`` strategy: one plain matmul per task on a contiguous slice), else sites gather each
    sample's tensors by ``index`` and use batched matmuls (the ``gather`` strategy).
    """

    index: torch.Tensor | None  # [B] each sample's slot, on the device (None for a single task)
    slots: list[int]  # the distinct slots, ascending
    counts: list[int]  # samples per slot, aligned with ``slots``
    uniq: torch.Tensor | None  # ``slots`` on the device
    inverse: torch.Tensor | None  # [B] position of each sample's slot in ``slots``, on the device
    single: int | None = None
    segments: list[tuple[int, int, int]] | None = None  # (slot, start, end) when the batch is grouped
    group: torch.Tensor | None = None  # a permutation that groups the batch by task (gather strategy only)
    group_segments: list[tuple[int, int, int]] | None = None  # the segments of the batch permuted by ``group``

    @property
    def strategy(self) -> str:
        if self.single is not None:
            return "single"
        return "segment" if self.segments is not None else "gather"


class Router:
    """Shared by the model and its sites: the route of the batch in flight, and whether a delta is merged."""

    def __init__(self) -> None:
        self.route: Route | None = None
        self.merged = False

    def current(self) -> Route | None:
        """The route for a site to follow; None when the delta is merged into the weights (sites stand aside)."""
        if self.merged:
            return None
        if self.route is None:
            raise VpeftError(
                "a multi-task site ran outside MultiDeltaModel.forward: call the MultiDeltaModel with the "
                "images and their task ids, not its backbone"
            )
        return self.route


def per_sample_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, route: Route) -> torch.Tensor:
    """``F.linear`` where sample ``b`` uses ``weight[task_b]`` (``[T, out, in]``) and ``bias[task_b]``."""
    if route.single is not None:
        t = route.single
        return F.linear(x, weight[t], None if bias is None else bias[t])
    if route.segments is not None:
        parts = [F.linear(x[s:e], weight[t], None if bias is None else bias[t]) for t, s, e in route.segments]
        return torch.cat(parts)
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, x.shape[-1])
    w = weight[route.index].transpose(1, 2)
    y = torch.bmm(x3, w) if bias is None else torch.baddbmm(bias[route.index].unsqueeze(1), x3, w)
    return y.view(*x.shape[:-1], y.shape[-1])


def per_sample_view(v: torch.Tensor, ndim: int, channel_axis: int) -> torch.Tensor:
    """``[B, C]`` per-sample vectors shaped to broadcast along ``channel_axis`` of a batch-first tensor."""
    axis = channel_axis % ndim
    if axis == 0:
        raise ValueError("the channel axis cannot be the batch axis")
    shape = [v.shape[0]] + [1] * (ndim - 1)
    shape[axis] = v.shape[1]
    return v.view(shape)


def single_view(v: torch.Tensor, ndim: int, channel_axis: int) -> torch.Tensor:
    """One task's ``[C]`` vector shaped as the single-task layers shape it (``ScaleShift._view``)."""
    if channel_axis in (-1, ndim - 1):
        return v
    return v.view(-1, *([1] * (ndim - 1 - channel_axis)))
