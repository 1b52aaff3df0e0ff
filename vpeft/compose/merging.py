"""Merging task vectors: task arithmetic, TIES, DARE and weighted averaging.

Each algorithm takes task vectors of one space, method and backbone and returns one vector, to be
added to the base by ``apply_vector``. The scaling coefficient ``lam`` is the papers' lambda: they
choose it on validation data, so it is a parameter here, never tuned inside.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from vpeft.compose.vectors import TaskVector, check_compatible
from vpeft.errors import ConfigError, UnknownNameError


def _sum(vectors: Sequence[TaskVector]) -> TaskVector:
    total = vectors[0]
    for v in vectors[1:]:
        total = total + v
    return total


def _check_fraction(name: str, value: float, high_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and value >= 0 and (value < 1 if high_open else value <= 1)):
        raise ConfigError(f"{name} must be a number in [0, 1{')' if high_open else ']'}, got {value!r}")
    return float(value)


def _check_lam(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ConfigError(f"lam (the scaling coefficient) must be a finite number, got {lam!r}")
    return float(lam)


def task_arithmetic(vectors: Sequence[TaskVector], lam: float = 1.0) -> TaskVector:
    """``lam * sum_t tau_t`` (Ilharco et al., ICLR 2023, eq. 1); low-rank factors stay factored."""
    check_compatible(list(vectors))
    return _sum(vectors).scale(_check_lam(lam))


def weighted_average(vectors: Sequence[TaskVector], weights: Sequence[float] | None = None) -> TaskVector:
    """``sum_t w_t tau_t / sum_t w_t`` (uniform by default): in weight space the weighted average of the
    fine-tuned models (a model soup), in delta space of the delta tensors themselves (e.g. prompts)."""
    vectors = list(vectors)
    check_compatible(vectors)
    w = [1.0] * len(vectors) if weights is None else list(weights)
    if len(w) != len(vectors) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in w
    ):
        raise ConfigError(f"weighted_average needs one finite weight per vector ({len(vectors)}), got {weights!r}")
    if sum(w) <= 0 or min(w) < 0:
        raise ConfigError(f"weighted_average weights must be non-negative with a positive sum, got {w}")
    total = sum(w)
    return _sum([v.scale(x / total) for v, x in zip(vectors, w)])


def _union_shapes(vectors: Sequence[TaskVector]) -> dict[str, tuple[torch.Size, torch.device]]:
    shapes: dict[str, tuple[torch.Size, torch.device]] = {}
    for v in vectors:
        for name, t in v.tensors.items():
            shapes.setdefault(name, (t.shape, t.device))
    return dict(sorted(shapes.items()))


def trim(vector: TaskVector, density: float) -> TaskVector:
    """TIES step 1: keep the ``density`` fraction of the vector's entries largest in magnitude, zero the rest.

    Over the whole vector (all its tensors together), as the authors' code flattens a task vector; the
    threshold is the ``floor(density * n)``-th largest magnitude, and entries equal to it are kept.
    """
    density = _check_fraction("density", density)
    vector = vector.materialize()
    if not vector.tensors:
        return vector
    flat = torch.cat([t.reshape(-1) for t in vector.tensors.values()]).abs()
    keep = int(density * flat.numel())
    if keep == 0:
        return dataclasses.replace(vector, tensors={k: torch.zeros_like(t) for k, t in vector.tensors.items()})
    threshold = flat.kthvalue(flat.numel() - keep + 1).values
    kept = {k: torch.where(t.abs() >= threshold, t, torch.zeros_like(t)) for k, t in vector.tensors.items()}
    return dataclasses.replace(vector, tensors=kept)


def elect_and_merge(vectors: Sequence[TaskVector]) -> TaskVector:
    """TIES steps 2 and 3 on (trimmed) vectors: per entry, the sign of the sum elects (the sign with the
    larger total magnitude); the merged value is the mean over the tasks whose entry has that sign.

    An entry whose sum is exactly zero elects no sign and merges to zero (``sgn(0) = 0`` in the paper).
    """
    vectors = [v.materialize() for v in vectors]
    check_compatible(vectors)
    out = {}
    for name, (shape, device) in _union_shapes(vectors).items():
        zero = torch.zeros(shape, device=device)
        stacked = torch.stack([v.tensors.get(name, zero) for v in vectors])
        elected = torch.sign(stacked.sum(dim=0))
        agree = (torch.sign(stacked) == elected) & (stacked != 0)
        count = agree.sum(dim=0).clamp(min=1)
        out[name] = torch.where(agree, stacked, torch.zeros_like(stacked)).sum(dim=0) / count
    first = vectors[0]
    sources = tuple(s for v in vectors for s in v.sources)
    return TaskVector(first.space, first.method, out, {}, first.config, first.backbone, sources, first.origin)


def ties(vectors: Sequence[TaskVector], density: float = 0.2, lam: float = 1.0) -> TaskVector:
    """TIES-merging (Yadav et al., NeurIPS 2023, Algorithm 1): trim each vector to its top ``density`` by
    magnitude, elect a sign per entry, average the agreeing entries (disjoint mean), scale by ``lam``.

    ``density`` is the paper's k as a fraction (k = 20%: 0.2); low-rank factors are made dense first.
    """
    lam = _check_lam(lam)
    vectors = list(vectors)
    check_compatible(vectors)
    return elect_and_merge([trim(v, density) for v in vectors]).scale(lam)


def dare(vector: TaskVector, drop: float, generator: torch.Generator | int = 0) -> TaskVector:
    """DARE (Yu et al., ICML 2024, eq. 2): drop each entry with probability ``drop`` and rescale the rest by
    ``1 / (1 - drop)``, so every entry keeps its expectation.

    ``generator``: a torch.Generator or a seed. Draws are ``torch.rand`` on the CPU, one per tensor in
    name order, an entry dropped where the draw is below ``drop``. Low-rank factors are made dense first.
    """
    drop = _check_fraction("drop", drop, high_open=True)
    g = generator if isinstance(generator, torch.Generator) else torch.Generator().manual_seed(int(generator))
    vector = vector.materialize()
    out = {}
    for name in sorted(vector.tensors):
        t = vector.tensors[name]
        keep = (torch.rand(t.shape, generator=g) >= drop).to(t.device)
        out[name] = torch.where(keep, t / (1.0 - drop), torch.zeros_like(t))
    return dataclasses.replace(vector, tensors=out)


def dare_all(vectors: Sequence[TaskVector], drop: float, seed: int) -> list[TaskVector]:
    """DARE on each vector in turn, from one generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return [dare(v, drop, g) for v in vectors]


def dare_task_arithmetic(
    vectors: Sequence[TaskVector], drop: float = 0.9, lam: float = 1.0, seed: int = 0
) -> TaskVector:
    """DARE on each vector, then task arithmetic (Yu et al., ICML 2024, sec. 4)."""
    vectors = list(vectors)
    check_compatible(vectors)
    return task_arithmetic(dare_all(vectors, drop, seed), lam)


def dare_ties(
    vectors: Sequence[TaskVector], drop: float = 0.9, density: float = 0.2, lam: float = 1.0, seed: int = 0
) -> TaskVector:
    """DARE on each vector, then TIES-merging with its trim (Yu et al., ICML 2024, sec. 4), as the authors'
    code runs it (yule-BUAA/MergeLM: mask_merging over ties_merging, param_value_mask_rate 0.8 by default,
    density 0.2); ``density=1`` skips the trim, which leaves DARE and TIES's sign election only."""
    vectors = list(vectors)
    check_compatible(vectors)
    return ties(dare_all(vectors, drop, seed), density, lam)


ALGORITHMS: dict[str, Callable[..., TaskVector]] = {
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_task_arithmetic": dare_task_arithmetic,
    "dare_ties": dare_ties,
    "weighted_average": weighted_average,
}


def algorithm_params(algorithm: str) -> dict[str, Any]:
    """The parameters ``algorithm`` takes besides the vectors, with their defaults (for configs and records)."""
    if algorithm not in ALGORITHMS:
        raise UnknownNameError("merge algorithm", algorithm, ALGORITHMS)
    params = list(inspect.signature(ALGORITHMS[algorithm]).parameters.values())[1:]
    return {p.name: p.default for p in params}


def merge_vectors(vectors: Sequence[TaskVector], algorithm: str, **params: Any) -> TaskVector:
    """Merge ``vectors`` with ``algorithm`` (one of ``ALGORITHMS``) and its parameters.

    Unknown algorithms and parameters raise UnknownNameError listing the valid ones; vectors of other
    spaces, methods or backbones raise IncompatibleDeltasError.
    """
    valid = algorithm_params(algorithm)
    for key in params:
        if key not in valid:
            raise UnknownNameError(f"{algorithm} parameter", key, valid)
    vectors = list(vectors)
    check_compatible(vectors)
    return ALGORITHMS[algorithm](vectors, **params)
