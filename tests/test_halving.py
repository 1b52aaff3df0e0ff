"""Successive halving's bookkeeping against hand-simulated grids and a transcription of Hyperband's rule."""

from __future__ import annotations

import math

import pytest

from vpeft.errors import ConfigError
from vpeft.halving import Halving, advance, simulate

# six grid points, val top-1 at the rungs 2, 4 and 8 of an 8-epoch schedule
GRID = {
    "a": {2: 50.0, 4: 60.0, 8: 70.0},
    "b": {2: 55.0, 4: 58.0, 8: 90.0},  # second at rung 2, falls behind at 4: the full grid's pick, lost by halving
    "c": {2: 40.0, 4: 80.0, 8: 95.0},  # a slow starter: stopped at rung 2
    "d": {2: 56.0, 4: 65.0, 8: 66.0},
    "e": {2: 10.0, 4: 20.0, 8: 30.0},
    "f": {2: 45.0, 4: 50.0, 8: 99.0},
}


def test_a_hand_simulated_grid():
    """Rung 2: d 56, b 55, a 50 go on (3 of 6); rung 4: d 65 goes on (1 of 3); d is picked at 8."""
    out = simulate(Halving(eta=2, rungs=(2, 4, 8)), GRID)
    assert out.reached == [list("abcdef"), ["a", "b", "d"], ["d"]]
    assert out.stopped == {"c": (2, 40.0), "e": (2, 10.0), "f": (2, 45.0), "a": (4, 60.0), "b": (4, 58.0)}
    assert out.pick == "d" and out.pick_top1 == 66.0
    assert out.epochs == 6 * 2 + 3 * 2 + 1 * 4 == Halving(eta=2, rungs=(2, 4, 8)).epochs(6)
    assert out.cost == pytest.approx(22 / 48)


def test_eta_three_keeps_a_third():
    out = simulate(Halving(eta=3, rungs=(2, 4, 8)), GRID)
    assert out.reached == [list("abcdef"), ["b", "d"], ["d"]]
    assert out.pick == "d"


def test_eta_larger_than_the_grid_keeps_the_best_one():
    out = simulate(Halving(eta=10, rungs=(2, 4, 8)), GRID)
    assert out.reached == [list("abcdef"), ["d"], ["d"]]
    assert Halving(eta=10, rungs=(2, 4, 8)).running(6) == [6, 1, 1]


def test_a_grid_of_one_point_trains_it_to_the_end():
    out = simulate(Halving(eta=2, rungs=(2, 4, 8)), {"only": GRID["e"]})
    assert out.reached == [["only"], ["only"], ["only"]] and out.stopped == {}
    assert out.pick == "only" and out.cost == 1.0


def test_ties_go_to_the_point_first_in_the_grid():
    tied = {p: {2: 50.0, 4: 50.0, 8: 50.0} for p in "xyzw"}
    out = simulate(Halving(eta=2, rungs=(2, 4, 8)), tied)
    assert out.reached == [list("xyzw"), ["x", "y"], ["x"]] and out.pick == "x"


def test_a_failed_point_ranks_last_and_is_never_picked():
    grid = {"ok": {2: 1.0, 4: 2.0}, "nan": {2: math.nan, 4: math.nan}, "gone": {}}
    out = simulate(Halving(eta=2, rungs=(2, 4)), grid)
    assert out.reached == [["ok", "nan", "gone"], ["ok"]] and out.pick == "ok"
    assert out.stopped["nan"] == (2, -math.inf)
    # nothing finite at all: nothing goes on and nothing is picked
    none = simulate(Halving(eta=2, rungs=(2, 4)), {"nan": {2: math.nan}})
    assert none.pick is None and none.reached == [["nan"], []]


def test_advance_is_the_step_a_sweep_takes_at_each_rung():
    h = Halving(eta=2, rungs=(2, 4, 8))
    assert advance(h, 0, list("abcd"), {"a": 1.0, "b": 4.0, "c": 3.0, "d": 2.0}) == ["b", "c"]  # grid order kept
    assert advance(h, 2, list("abcd"), {"a": 1.0}) == []  # the last rung: nothing goes on


@pytest.mark.parametrize("eta", [2, 3, 4])
@pytest.mark.parametrize("n", range(1, 40))
def test_running_counts_are_hyperbands(n, eta):
    """Li et al. (2018), Algorithm 1: n_i = floor(n eta^-i) points at rung i (kept at one where that is 0)."""
    h = Halving(eta=eta, rungs=(1, 2, 3, 4))
    assert h.running(n) == [max(1, math.floor(n * eta**-i)) for i in range(4)]


def test_cost_of_the_default_rungs():
    """25, 50, 100 epochs: a 6-point grid at eta 2 trains 6 x 25 + 3 x 25 + 1 x 50 of 600 epochs."""
    h = Halving.for_schedule(100)
    assert h.rungs == (25, 50, 100) and h.eta == 2
    assert h.cost(6) == pytest.approx(275 / 600) and h.cost(12) == pytest.approx(600 / 1200)
    assert Halving.for_schedule(100, eta=3, rungs=(11, 33, 100)).cost(9) == pytest.approx((99 + 66 + 67) / 900)


def test_default_rungs_follow_the_schedule():
    assert Halving.for_schedule(8).rungs == (2, 4, 8)
    assert Halving.for_schedule(2).rungs == (1, 2)
    assert Halving.for_schedule(1).rungs == (1,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eta": 1}, "eta must be a whole number >= 2"),
        ({"eta": 2.5}, "eta must be a whole number >= 2"),
        ({"eta": True}, "eta must be a whole number >= 2"),
        ({"rungs": (4, 2, 8)}, r"rungs must increase, got \[4, 2, 8\]"),
        ({"rungs": (0, 8)}, "rungs must be epochs"),
        ({"rungs": ()}, "rungs must be epochs"),
        ({"rungs": (2, 4)}, r"the last halving rung is the schedule's end: rungs \[2, 4\] against trainer.epochs=8"),
    ],
)
def test_bad_options_name_the_problem(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Halving.for_schedule(8, **kwargs)
