"""Successive halving over a tune grid (Jamieson and Talwalkar, 2016; Li et al., Hyperband, 2018).

Every grid point trains on the full schedule's learning-rate curve, and a rung is an epoch of that
schedule (a checkpoint of the same run, not a shorter run). At each rung the points still training are
ranked by their validation top-1 there and the best ``max(1, n // eta)`` of the ``n`` go on (Hyperband's
SuccessiveHalving, Li et al. 2018, Algorithm 1); the others stop with the top-1 of the rung they reached.
The last rung is the schedule's end, and the pick is the best point there. Ties go to the point that
comes first in the grid, as the full grid's selection breaks them. Pure: scores in, decisions out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence

from vpeft.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Halving:
    """Keep the best ``1 / eta`` of the points at every rung but the last; ``rungs`` in epochs, the last one the
    schedule's end."""

    eta: int = 2
    rungs: tuple[int, ...] = (25, 50, 100)

    def __post_init__(self) -> None:
        if isinstance(self.eta, bool) or not isinstance(self.eta, int) or self.eta < 2:
            raise ConfigError(
                f"halving eta must be a whole number >= 2 (keep the best 1/eta at a rung), got {self.eta!r}"
            )
        rungs = tuple(self.rungs)
        if not rungs or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rungs):
            raise ConfigError(f"halving rungs must be epochs (whole numbers >= 1), got {list(self.rungs)!r}")
        if any(b <= a for a, b in zip(rungs, rungs[1:])):
            raise ConfigError(f"halving rungs must increase, got {list(rungs)}")
        object.__setattr__(self, "rungs", rungs)

    @classmethod
    def for_schedule(cls, epochs: int, eta: int = 2, rungs: Sequence[int] | None = None) -> Halving:
        """Halving for a schedule of ``epochs``: the rungs given (the last must be ``epochs``), or by default a
        quarter, a half and all of it (25, 50, 100 of 100 epochs), rounded, each at least one epoch."""
        if rungs is None:
            rungs = sorted({max(1, round(epochs * f)) for f in (0.25, 0.5)} | {epochs})
        halving = cls(eta=eta, rungs=tuple(rungs))
        if halving.rungs[-1] != epochs:
            raise ConfigError(
                f"the last halving rung is the schedule's end: rungs {list(halving.rungs)} against "
                f"trainer.epochs={epochs}; end the rungs at {epochs}"
            )
        return halving

    def running(self, n: int) -> list[int]:
        """How many of ``n`` points train to each rung: all to the first, then ``max(1, k // eta)`` of the ``k``
        that reached the rung before."""
        counts = [n]
        for _ in self.rungs[1:]:
            counts.append(max(1, counts[-1] // self.eta) if counts[-1] else 0)
        return counts

    def epochs(self, n: int) -> int:
        """Training epochs that halving spends on ``n`` points (each continues from its last rung)."""
        starts = (0, *self.rungs[:-1])
        return sum(k * (end - start) for k, start, end in zip(self.running(n), starts, self.rungs, strict=True))

    def cost(self, n: int) -> float:
        """Halving's training epochs as a fraction of the full grid's (every point to the end)."""
        return self.epochs(n) / (n * self.rungs[-1]) if n else 0.0


@dataclasses.dataclass
class Outcome:
    """What halving did on one grid: the points that trained to each rung, where each stopped point stopped
    and with which top-1, and the pick (None when no point has a score at the last rung)."""

    reached: list[list[Hashable]]
    stopped: dict[Hashable, tuple[int, float]]
    pick: Hashable | None
    pick_top1: float | None
    epochs: int
    cost: float


def advance(
    halving: Halving, rung: int, points: Sequence[Hashable], scores: Mapping[Hashable, float]
) -> list[Hashable]:
    """The points (of ``points``, which reached rung ``rung``, in grid order) that train on to the next rung:
    the best ``max(1, n // eta)`` by ``scores`` (a missing or non-finite score, a failed run, ranks last)."""
    if rung >= len(halving.rungs) - 1:
        return []
    keep = halving.running(len(points))[1] if points else 0
    order = sorted(range(len(points)), key=lambda i: (-_score(scores.get(points[i])), i))
    chosen = {points[i] for i in order[:keep] if _score(scores.get(points[i])) > -math.inf}
    return [p for p in points if p in chosen]


def simulate(halving: Halving, scores: Mapping[Hashable, Mapping[int, float]]) -> Outcome:
    """Halving over a grid whose points have a validation top-1 at every rung (``scores[point][epoch]``, from
    full-grid runs that evaluated at the rungs): what it would have trained, stopped and picked."""
    points = list(scores)
    reached: list[list[Hashable]] = []
    stopped: dict[Hashable, tuple[int, float]] = {}
    live = points
    epochs, start = 0, 0
    for i, rung in enumerate(halving.rungs):
        reached.append(live)
        epochs += len(live) * (rung - start)
        start = rung
        at_rung = {p: scores[p].get(rung) for p in live}
        nxt = advance(halving, i, live, at_rung)
        for p in live:
            if p not in nxt and i < len(halving.rungs) - 1:
                stopped[p] = (rung, _score(at_rung[p]))
        if i < len(halving.rungs) - 1:
            live = nxt
    final = {p: _score(scores[p].get(halving.rungs[-1])) for p in live}
    ranked = sorted(live, key=lambda p: (-final[p], points.index(p)))
    pick = ranked[0] if ranked and final[ranked[0]] > -math.inf else None
    full = len(points) * halving.rungs[-1]
    return Outcome(reached, stopped, pick, final[pick] if pick is not None else None, epochs,
                   epochs / full if full else 0.0)  # fmt: skip


def _score(value: float | None) -> float:
    return float(value) if value is not None and math.isfinite(value) else -math.inf
