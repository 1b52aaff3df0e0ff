"""One frozen backbone, many resident deltas: mixed-task batches in one pass, and timed swaps.

``MultiDeltaModel`` holds a timm ViT and the deltas (plus heads) of any number of tasks of one method.
``model(images, task_ids)`` runs the backbone once for the whole batch, each sample through its own
task's delta, and returns each sample's logits. ``attach`` / ``detach`` add and remove a task's delta
(unmerged); ``merge`` / ``unmerge`` fold one task's delta into the backbone's weights in place and back
out, for mergeable methods: unmerging copies back the weights the merge changed (kept while merged), so
the shared backbone returns bit for bit whatever the delta held. Each swap is timed and logged.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import numbers
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vpeft.core import (
    applied_method,
    backbone_name,
    check_finite,
    delta_state_dict,
    read_delta,
    weights_conflict,
    weights_source,
)
from vpeft.errors import ConfigError, NotMergeableError, UnsupportedModelError, VpeftError
from vpeft.layers.delta import Delta
from vpeft.methods import METHODS
from vpeft.methods._base import SUPPORTED
from vpeft.serve.errors import IncompatibleDeltaError, NotServableError, UnknownTaskError
from vpeft.serve.routing import STRATEGIES, Route, Router
from vpeft.serve.servers import (
    NOT_SERVABLE,
    SERVERS,
    Server,
    servable_methods,
)
from vpeft.serve.sites import HeadSite

HEAD_KEYS = ("head.weight", "head.bias")
SERVING_ATTR = "vpeft_serving"  # set on a backbone while a MultiDeltaModel's sites are installed in it

# ``auto`` groups the batch by task (one plain matmul per task) while it holds at most this many distinct
# tasks, and gathers each sample's weights into batched matmuls beyond. Gather wins or ties from two tasks
# up wherever measured (scripts/bench_serve.py times both at every T; on a CPU grouping costs a copy of
# each adapter output, on a GPU a launch per task and layer), so ``auto`` gathers: raise a device's entry
# where a measurement shows grouping ahead.
AUTO_SEGMENT_MAX_TASKS = {"cpu": 1, "cuda": 1}


@dataclasses.dataclass
class TaskDelta:
    """One task's delta in memory: its tensors as a delta file holds them, and the file's metadata."""

    name: str
    method: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    backbone: str | None = None
    weights: str | None = None
    source: str | None = None  # the file it was read from

    @classmethod
    def from_file(cls, path: str | os.PathLike, name: str | None = None) -> TaskDelta:
        """Read a file written by ``vpeft.save_delta`` (a missing or broken file raises DataError naming it)."""
        tensors, info = read_delta(path)
        return cls(
            name=name or Path(path).stem,
            method=info["method"],
            config=info["config"],
            tensors=tensors,
            backbone=info["backbone"],
            weights=info["weights"],
            source=str(path),
        )

    @classmethod
    def from_model(cls, model: nn.Module, name: str) -> TaskDelta:
        """The delta of a live single-task model (what ``save_delta`` would write), without a file."""
        method = applied_method(model)
        if method is None:
            raise VpeftError("the model has no vpeft method applied (or it was merged): nothing to serve")
        tensors, config = method.export_delta(model, delta_state_dict(model))
        tensors = {k: v.detach().clone() for k, v in tensors.items()}
        return cls(name, method.name, config, tensors, backbone_name(model), weights_source(model))

    @property
    def num_classes(self) -> int:
        head = self.tensors.get("head.weight")
        return int(head.shape[0]) if head is not None else 0

    @property
    def nbytes(self) -> int:
        """The size of its tensors (the payload of its file)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclasses.dataclass(frozen=True)
class SwapEvent:
    """One timed swap: ``op`` (attach, detach, merge, unmerge) of task ``task`` (its id) named ``name``."""

    op: str
    task: int
    name: str
    seconds: float


def _arch(name: str | None) -> str | None:
    return name.split(".")[0] if name else None


class MultiDeltaModel(nn.Module):
    """A frozen timm ViT serving many tasks of one method at once; see the module docstring.

    Args:
        backbone: a bare timm VisionTransformer (or a ``vpeft.backbones.Backbone``); it becomes this
            model's, frozen and in eval mode, with the method's sites installed while tasks are resident.
        strategy: how per-task matmuls (LoRA, adapters, AdaptFormer) run on a batch of several tasks:
            ``gather`` each sample's weights into batched matmuls (``bmm``), ``segment`` the batch by task
            and run one plain matmul per task on its rows, or ``auto``: segment while the batch holds at
            most ``segment_max_tasks`` distinct tasks, else gather. A batch of one task always takes the
            single-task path. Vector methods, prompts, prefixes and heads always gather (small tensors).
        pad_value: the logit at a sample's columns beyond its task's classes (tasks may differ in classes).
        segment_max_tasks: the ``auto`` threshold; by default ``AUTO_SEGMENT_MAX_TASKS`` of the device (1:
            ``auto`` gathers).

    Inference only (dropout in the deltas is off, the backbone frozen), one forward pass at a time: the
    route of the batch in flight is shared by the sites.
    """

    def __init__(
        self,
        backbone: nn.Module,
        strategy: str = "auto",
        pad_value: float = float("-inf"),
        segment_max_tasks: int | None = None,
    ) -> None:
        super().__init__()
        model = getattr(backbone, "model", backbone)  # a vpeft Backbone holds the timm model
        self._check_backbone_module(model)
        model.eval().requires_grad_(False)
        self.backbone = model
        self.router = Router()
        self.head = HeadSite(self.router, pad_value)
        self.add_module("server", None)
        self.server: Server | None
        self.strategy = strategy
        self.segment_max_tasks = segment_max_tasks
        self._names: list[str | None] = []
        self._index: dict[str, int] = {}
        self._info: dict[int, TaskDelta] = {}  # slot -> the delta's metadata (tensors dropped)
        self._payload: dict[int, int] = {}  # slot -> bytes of the delta's tensors
        self._live = torch.zeros(0, dtype=torch.bool)
        self._merged: int | None = None
        self.swap_log: collections.deque[SwapEvent] = collections.deque(maxlen=1024)
        # swaps are timed with the GPU synchronised at both ends; off, a swap only queues its kernels (a
        # serving loop that swaps between sub-batches) and its seconds are the host's time
        self.sync_swaps = True

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_files(
        cls, backbone: nn.Module, paths: Sequence[str | os.PathLike], names: Sequence[str] | None = None, **kwargs
    ) -> MultiDeltaModel:
        """Attach every delta file in ``paths`` (task ids 0, 1, ... in that order; names: the file stems)."""
        return cls.from_deltas(backbone, paths, names, **kwargs)

    @classmethod
    def from_deltas(
        cls,
        backbone: nn.Module,
        deltas: Iterable[TaskDelta | str | os.PathLike],
        names: Sequence[str] | None = None,
        **kwargs,
    ) -> MultiDeltaModel:
        """As ``from_files``, for files and in-memory ``TaskDelta`` objects alike (read one at a time)."""
        deltas = list(deltas)
        if names is not None and len(names) != len(deltas):
            raise ConfigError(f"{len(names)} names for {len(deltas)} deltas: give one name per delta, or none")
        model = cls(backbone, **kwargs)
        model.reserve(len(deltas))
        try:
            for i, delta in enumerate(deltas):
                model.attach(delta, name=None if names is None else names[i])
        except BaseException:
            model.close()  # the caller's backbone goes back to bare
            raise
        return model

    @staticmethod
    def _check_backbone_module(model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"MultiDeltaModel needs a timm model, got {type(model).__name__}")
        if model.__dict__.get(SERVING_ATTR) is not None:
            raise ConfigError(
                "this backbone serves in another MultiDeltaModel (its sites are installed): create a fresh backbone, "
                "or close() the other model first"
            )
        method = applied_method(model)
        if method is not None or any(isinstance(m, Delta) for m in model.modules()):
            raise ConfigError(
                f"the backbone has {method.name if method else 'a vpeft delta'} applied; MultiDeltaModel needs a bare "
                "backbone (the deltas come from files)"
            )
        for attr in ("blocks", "forward_features", "forward_head"):
            if not hasattr(model, attr):
                raise UnsupportedModelError(f"serving needs `{attr}` on the model; supported: {SUPPORTED}")

    # -- what is resident -----------------------------------------------------------------------------
    @property
    def method(self) -> str | None:
        """The method of the resident deltas; None while none is resident."""
        return self.server.name if self.server is not None else None

    @property
    def tasks(self) -> dict[str, int]:
        """Resident tasks: name -> task id, in id order."""
        return {n: i for i, n in enumerate(self._names) if n is not None}

    @property
    def merged_task(self) -> int | None:
        """The id of the task whose delta is merged into the weights, or None."""
        return self._merged

    def __len__(self) -> int:
        return len(self._index)

    def num_classes(self, task: int | str) -> int:
        return self.head.ncls[self._slot(task)]

    def config(self, task: int | str) -> dict[str, Any]:
        return dict(self._info[self._slot(task)].config)

    def bank_bytes(self) -> int:
        """Memory the resident deltas and heads take (every bank of every site, plus BitFit's bias snapshot)."""
        modules = [self.head] + ([self.server] if self.server is not None else [])
        return sum(b.numel() * b.element_size() for m in modules for b in m.buffers())

    def payload_bytes(self) -> int:
        """The size of the resident deltas' tensors as their files hold them."""
        return sum(self._payload.values())

    def _device(self) -> torch.device:
        for p in self.backbone.parameters():
            return p.device
        return torch.device("cpu")

    def _dtype(self) -> torch.dtype:
        for p in self.backbone.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def _valid(self) -> list[str]:
        return [f"{i}: {n}" for i, n in enumerate(self._names) if n is not None]

    def _slot(self, task: int | str) -> int:
        if isinstance(task, str):
            if task not in self._index:
                raise UnknownTaskError(task, self._valid())
            return self._index[task]
        if isinstance(task, torch.Tensor) and task.numel() == 1:
            task = int(task)
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < len(self._names):
            raise UnknownTaskError(task, self._valid())
        if self._names[task] is None:
            raise UnknownTaskError(task, self._valid())
        return task

    # -- swaps ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _clock(self) -> Iterator[list[float]]:
        """Wall time of the block, the device synchronised at both ends unless ``sync_swaps`` is off."""
        device = self._device()
        sync = self.sync_swaps and device.type == "cuda"
        if sync:
            torch.cuda.synchronize(device)
        box = [0.0]
        start = time.perf_counter()
        with torch.no_grad():
            yield box
        if sync:
            torch.cuda.synchronize(device)
        box[0] = time.perf_counter() - start

    def _log(self, op: str, slot: int, name: str, seconds: float) -> SwapEvent:
        event = SwapEvent(op, slot, name, seconds)
        self.swap_log.append(event)
        return event

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` resident tasks at once (attach grows the banks by half when full)."""
        if capacity <= len(self._names):
            return
        self._names += [None] * (capacity - len(self._names))
        self._live = torch.cat([self._live, torch.zeros(capacity - len(self._live), dtype=torch.bool)])
        if self.server is not None:
            self.server.resize(capacity)
        self.head.bank.resize(capacity)

    def attach(self, source: TaskDelta | str | os.PathLike, name: str | None = None) -> SwapEvent:
        """Make a task resident from a delta file (or a ``TaskDelta``), unmerged; its id is ``event.task``.

        The file is checked against the backbone and the resident deltas first (method, backbone, tensor
        names and shapes, config); a refused delta leaves the model as it was.
        """
        with self._clock() as clock:
            delta = source if isinstance(source, TaskDelta) else TaskDelta.from_file(source, name)
            name = name or delta.name
            label = delta.source or repr(name)
            if name in self._index:
                raise ConfigError(f"a task named {name!r} is resident already (id {self._index[name]}); pass name=")
            if isinstance(source, TaskDelta):  # a file's tensors were checked as it was read
                check_finite(delta.tensors, label)
            server, cfg = self._validate(delta, label)
            slot = self._free_slot()
            if self.server is None:
                owner = self.backbone.__dict__.get(SERVING_ATTR)
                if owner is not None and owner is not self.router:
                    raise ConfigError("this backbone serves in another MultiDeltaModel; close() that one first")
                server.install(cfg)
                self.backbone.__dict__[SERVING_ATTR] = self.router
                self.server = server
                self.server.resize(len(self._names))
            try:
                device, dtype = self._device(), self._dtype()
                tensors = {
                    k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                    for k, v in delta.tensors.items()
                }
                self.server.write(slot, tensors, cfg, len(self._names))
                self._write_head(slot, tensors)
            except BaseException:
                self._release(slot)
                raise
            self._names[slot], self._index[name], self._live[slot] = name, slot, True
            self._info[slot] = dataclasses.replace(delta, name=name, tensors={})
            self._payload[slot] = delta.nbytes
        return self._log("attach", slot, name, clock[0])

    def detach(self, task: int | str) -> SwapEvent:
        """Remove a task's delta (unmerging it first if it is merged); with none left the backbone is bare."""
        slot = self._slot(task)
        name = self._names[slot]
        if self._merged == slot:
            self.unmerge()
        with self._clock() as clock:
            self._release(slot)
        return self._log("detach", slot, name, clock[0])

    def close(self) -> None:
        """Detach every task: the backbone is left bare (no hooks, its own modules, unmerged), free to reuse."""
        for slot in [i for i, n in enumerate(self._names) if n is not None]:
            self.detach(slot)
        self._release_all()

    def merge(self, task: int | str) -> SwapEvent:
        """Fold ``task``'s delta into the backbone's weights in place (unmerging another merged task first).

        While merged, the model serves only that task, at the bare backbone's speed; mergeable methods:
        ``mergeable_servable_methods()``.
        """
        slot = self._slot(task)
        if not self.server.mergeable:
            raise NotMergeableError(self.server._not_mergeable())
        if self._merged == slot:
            return self._log("merge", slot, self._names[slot], 0.0)
        if self._merged is not None:
            self.unmerge()
        with self._clock() as clock:
            self.server.merge(slot)
            self._merged, self.router.merged = slot, True
        return self._log("merge", slot, self._names[slot], clock[0])

    def unmerge(self) -> SwapEvent:
        """Take the merged delta back out of the weights: the weights it changed are restored bit for bit."""
        if self._merged is None:
            raise VpeftError("no task is merged; merge(task) first")
        slot = self._merged
        with self._clock() as clock:
            self.server.unmerge(slot)
            self._merged, self.router.merged = None, False
        return self._log("unmerge", slot, self._names[slot], clock[0])

    def _validate(self, delta: TaskDelta, label: str) -> tuple[Server, Any]:
        if delta.method not in SERVERS:
            why = NOT_SERVABLE.get(delta.method, "vpeft.serve has no per-sample implementation of it")
            raise NotServableError(
                f"{label} holds a {delta.method} delta, which cannot share one backbone pass ({why}); "
                f"servable methods: {', '.join(servable_methods())}"
            )
        if self.server is not None and delta.method != self.server.name:
            raise IncompatibleDeltaError(
                f"{label} holds a {delta.method} delta, the resident deltas are {self.server.name}: one "
                f"MultiDeltaModel serves one method; serve {delta.method} from another"
            )
        self._check_origin(delta, label)
        cfg = METHODS.get(delta.method).from_kwargs(**delta.config).config
        server = self.server or SERVERS[delta.method](self.backbone, self.router)
        server.check_config(cfg, label)
        expected = server.expected(cfg)
        body = {k: t for k, t in delta.tensors.items() if k not in HEAD_KEYS}
        missing, unexpected = sorted(set(expected) - set(body)), sorted(set(body) - set(expected))
        shapes = [
            f"{k} {tuple(body[k].shape)} (backbone needs {expected[k]})"
            for k in expected
            if k in body and tuple(body[k].shape) != tuple(expected[k])
        ]
        width = getattr(self.backbone, "head_hidden_size", None) or getattr(self.backbone, "num_features", None)
        head = delta.tensors.get("head.weight")
        if head is None or head.ndim != 2 or (width and head.shape[1] != width):
            shapes.append(f"head.weight {None if head is None else tuple(head.shape)} (needs [classes, {width}])")
        bias = delta.tensors.get("head.bias")
        if head is not None and bias is not None and tuple(bias.shape) != (head.shape[0],):
            shapes.append(f"head.bias {tuple(bias.shape)} (needs ({head.shape[0]},))")
        if missing or unexpected or shapes:
            ours = backbone_name(self.backbone) or type(self.backbone).__name__
            raise IncompatibleDeltaError(
                f"{label} does not fit the resident backbone ({ours}): missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, shapes {shapes[:5]}; it was trained on {delta.backbone or 'an unnamed backbone'}"
            )
        return server, cfg

    def _check_origin(self, delta: TaskDelta, label: str) -> None:
        """Deltas of other backbones (architecture, or named weights) are refused, with both names."""
        ours = backbone_name(self.backbone)
        if delta.backbone and ours and _arch(delta.backbone) != _arch(ours):
            raise IncompatibleDeltaError(f"{label} was trained on {delta.backbone}, the resident backbone is {ours}")
        resident = next(iter(self._info.values()), None)
        if resident is not None and resident.backbone and _arch(delta.backbone) not in (None, _arch(resident.backbone)):
            raise IncompatibleDeltaError(
                f"{label} was trained on {delta.backbone}, the resident deltas on {resident.backbone}: "
                "deltas of different backbones cannot share one"
            )
        others = [(weights_source(self.backbone), "the resident backbone's")]
        if resident is not None:
            others.append((resident.weights, "the resident deltas'"))
        for other, what in others:
            conflict = weights_conflict(delta.weights, other)
            if conflict:
                raise IncompatibleDeltaError(f"{label} was {conflict} ({what})")

    def _write_head(self, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        weight = tensors["head.weight"]
        bias = tensors.get("head.bias")
        capacity = len(self._names)
        self.head.bank.put("weight", slot, weight, capacity)
        self.head.bank.put("bias", slot, bias if bias is not None else weight.new_zeros(weight.shape[0]), capacity)
        self.head.ncls[slot] = int(weight.shape[0])

    def _free_slot(self) -> int:
        for i, n in enumerate(self._names):
            if n is None:
                return i
        capacity = len(self._names)
        self.reserve(max(4, math.ceil(capacity * 1.5)))
        return capacity

    def _release(self, slot: int) -> None:
        if self.server is not None:
            self.server.clear(slot)
        self.head.bank.clear(slot)
        self.head.ncls.pop(slot, None)
        name = self._names[slot]
        if name is not None:
            del self._index[name]
        self._names[slot], self._live[slot] = None, False
        self._info.pop(slot, None)
        self._payload.pop(slot, None)
        if not self._index:
            self._release_all()

    def _release_all(self) -> None:
        if self.server is not None:
            self.server.uninstall()
            self.server = None
        if self.backbone.__dict__.get(SERVING_ATTR) is self.router:
            del self.backbone.__dict__[SERVING_ATTR]
        self.head = HeadSite(self.router, self.head.pad_value)
        self._names, self._live, self._info = [], torch.zeros(0, dtype=torch.bool), {}
        self._merged, self.router.merged = None, False

    # -- the forward pass -----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, task_ids: Any) -> torch.Tensor:
        """Logits ``[B, C]``: sample ``b`` through task ``task_ids[b]``'s delta and head, one backbone pass.

        ``task_ids``: ids (ints, a tensor) or names, one per image, or one id or name for the whole batch.
        ``C`` is the most classes among the batch's tasks; a sample's columns beyond its task's classes
        hold ``pad_value`` (``split`` trims them).
        """
        if not self._index:
            raise VpeftError("no task is resident: attach a delta file first (MultiDeltaModel.attach)")
        if images.shape[0] == 0:  # nothing to run; the ids are still checked (there must be none)
            self.task_slots(task_ids, 0)
            return torch.empty((0, 0), device=images.device, dtype=self._dtype())
        route, order, unorder = self._route(task_ids, images.shape[0], images.device)
        if self._merged is not None and route.single != self._merged:
            raise VpeftError(
                f"task {self._merged} ({self._names[self._merged]}) is merged into the weights, so only it can run; "
                "unmerge() to serve other or mixed tasks"
            )
        x = images if order is None else images.index_select(0, order)
        self.router.route = route
        try:
            feats = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
            logits = self.head(feats)
        finally:
            self.router.route = None
        return logits if unorder is None else logits.index_select(0, unorder)

    def _task_id(self, task: Any) -> int:
        """One id or name as a task id: a name, an int (numpy's too) or an integral float; never truncated."""
        if isinstance(task, str):
            return self._slot(task)
        if isinstance(task, torch.Tensor) and task.numel() == 1 and not (task.is_floating_point() or task.is_complex()):
            task = task.item()
        if isinstance(task, numbers.Integral) and not isinstance(task, (bool, np.bool_)):
            return int(task)
        if isinstance(task, float) and not isinstance(task, np.floating) and task.is_integer():
            return int(task)
        kind = f"a numpy {task.dtype}" if isinstance(task, np.generic) else type(task).__name__
        raise ConfigError(f"task id {task!r} ({kind}) is not an integer id or a task name: pass ints or names")

    def task_slots(self, task_ids: Any, batch: int) -> torch.Tensor:
        """``task_ids`` as a CPU tensor of task ids, checked against the resident tasks and the batch size."""
        if isinstance(task_ids, np.ndarray) and task_ids.dtype.kind in "iu":
            task_ids = torch.from_numpy(task_ids.astype(np.int64))
        elif isinstance(task_ids, np.ndarray) and task_ids.dtype.kind not in "UO":
            first = task_ids.reshape(-1)[0] if task_ids.size else None
            raise ConfigError(
                f"task id {first!r} (a numpy {task_ids.dtype} array) is not an integer id or a task name: pass ints "
                "(an integer array) or names"
            )
        if isinstance(task_ids, (str, numbers.Number, np.generic)):
            return torch.full((batch,), self._slot(self._task_id(task_ids)), dtype=torch.long)
        if isinstance(task_ids, torch.Tensor):
            if task_ids.is_floating_point() or task_ids.is_complex() or task_ids.dtype == torch.bool:
                raise ConfigError(f"task_ids must hold integer ids or names, got a {task_ids.dtype} tensor")
            ids = task_ids.reshape(-1).to("cpu", torch.long)
        else:
            ids = torch.tensor([self._task_id(t) for t in task_ids], dtype=torch.long)
        if ids.numel() != batch:
            raise ConfigError(f"task_ids has {ids.numel()} entries for a batch of {batch} images: give one per image")
        bad = (ids < 0) | (ids >= len(self._names))
        if not bool(bad.any()):
            bad = ~self._live[ids]
        if bool(bad.any()):
            raise UnknownTaskError(int(ids[bad.nonzero()[0, 0]]), self._valid())
        return ids

    def strategy_for(self, tasks: int, device: torch.device | str | None = None) -> str:
        """The strategy a batch with ``tasks`` distinct tasks runs with: single, segment or gather."""
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if tasks <= 1:
            return "single"
        if self.strategy != "auto":
            return self.strategy
        if self.server is None or not self.server.segmentable:
            return "gather"
        limit = self.segment_max_tasks
        if limit is None:
            kind = torch.device(device).type if device is not None else self._device().type
            limit = AUTO_SEGMENT_MAX_TASKS.get(kind, AUTO_SEGMENT_MAX_TASKS["cuda"])
        return "segment" if tasks <= limit else "gather"

    def _route(
        self, task_ids: Any, batch: int, device: torch.device
    ) -> tuple[Route, torch.Tensor | None, torch.Tensor | None]:
        """The batch's route (planned on the host, one transfer) and the permutation in and out, if any."""
        ids = self.task_slots(task_ids, batch)
        uniq, inverse, counts = torch.unique(ids, sorted=True, return_inverse=True, return_counts=True)
        slots, counts_list = uniq.tolist(), counts.tolist()
        if len(slots) == 1:
            return Route(None, slots, counts_list, None, None, single=slots[0]), None, None
        strategy = self.strategy_for(len(slots), device)
        runs, run_counts = torch.unique_consecutive(ids, return_counts=True)
        grouped = len(runs) == len(slots)
        seg_slots, seg_counts = (runs.tolist(), run_counts.tolist()) if grouped else (slots, counts_list)
        ends = torch.tensor(seg_counts).cumsum(0).tolist()
        segments = [(t, e - n, e) for t, n, e in zip(seg_slots, seg_counts, ends)]
        order = None if grouped else torch.argsort(ids, stable=True)
        if strategy == "segment" and order is not None:
            ids, inverse = ids[order], inverse[order]
        parts = [ids, inverse, uniq] + ([order, torch.argsort(order)] if order is not None else [])
        packed = torch.cat(parts).to(device, non_blocking=True)
        index, inv, uniq_d = packed[:batch], packed[batch : 2 * batch], packed[2 * batch : 2 * batch + len(slots)]
        order_d = unorder_d = None
        if order is not None:
            rest = packed[2 * batch + len(slots) :]
            order_d, unorder_d = rest[:batch], rest[batch:]
        route = Route(index, slots, counts_list, uniq_d, inv, group_segments=segments)
        if strategy == "segment":
            route.segments = segments
            return route, order_d, unorder_d
        route.group = order_d
        return route, None, None

    def split(self, logits: torch.Tensor, task_ids: Any) -> list[torch.Tensor]:
        """Each sample's logits trimmed to its task's classes."""
        ids = self.task_slots(task_ids, logits.shape[0]).tolist()
        return [row[: self.head.ncls[t]] for row, t in zip(logits, ids)]

    def class_mask(self, task_ids: Sequence[int | str] | torch.Tensor, width: int | None = None) -> torch.Tensor:
        """``[B, C]`` True where a column is one of the sample's task's classes (the logits' valid entries)."""
        ids = self.task_slots(task_ids, len(task_ids))
        ncls = torch.tensor([self.head.ncls[t] for t in ids.tolist()])
        width = width or (int(ncls.max()) if len(ncls) else 0)
        return torch.arange(width)[None, :] < ncls[:, None]

    def extra_repr(self) -> str:
        return f"method={self.method}, tasks={len(self)}, strategy={self.strategy!r}, merged={self._merged}"
