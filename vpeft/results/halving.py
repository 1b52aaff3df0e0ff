"""Would successive halving have chosen what the full grid chose? Measured on full-grid records.

Full-grid tune runs that evaluated on val200 at the rungs (``trainer.eval_every``) hold everything halving
would have seen: for each (method, backbone, task) this replays halving on those scores
(``vpeft.halving.simulate``) and sets its pick against the full grid's (``vpeft.vtab.select_hparams``, the
select stage's own rule), with the test top-1 of the final runs of both picks where they exist (the regret)
and the seed-to-seed spread of the full grid's final runs, against which a regret is judged.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

from vpeft.errors import ConfigError
from vpeft.halving import Halving, simulate
from vpeft.results.record import hashed_config
from vpeft.vtab import _flat, _order_key, get_path, select_hparams

COLUMNS = ["method", "backbone", "task", "points", "rungs", "full_pick", "halving_pick", "same", "full_val",
           "halving_val", "full_test", "halving_test", "regret", "seed_spread", "final_seeds", "cost"]  # fmt: skip


def _settings(record: dict[str, Any]) -> dict[str, Any]:
    return hashed_config(record["config"], record.get("compute"))


def grid_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """The config keys (dotted) in which one (method, backbone, task)'s tune runs differ, seeds aside."""
    flats = [_flat(_settings(r)) for r in records]
    keys = set().union(*flats) - {"seed"}
    return sorted(k for k in keys if len({_order_key((f.get(k),)) for f in flats}) > 1)


def _val_at(record: dict[str, Any], epoch: int, last: int) -> float | None:
    """The run's val top-1 after ``epoch``: its final top-1 at the schedule's end, else its history's."""
    metrics = record["metrics"]
    if epoch == last:
        return metrics.get("top1")
    for entry in metrics.get("history") or []:
        if entry.get("epoch") == epoch:
            return entry.get("eval_top1")
    return None


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def halving_table(records: Iterable[dict[str, Any]], eta: int = 2, rungs: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per (method, backbone, task) with ok tune runs: halving's pick against the full grid's.

    ``rungs`` default to a quarter, a half and all of the runs' schedule. Raises ConfigError when a tune run
    has no val top-1 at a rung (it did not evaluate there: ``trainer.eval_every``) or when a task's tune runs
    differ in more than a grid of tunable keys (the select stage's own refusal)."""
    tune: dict[tuple, list[dict]] = defaultdict(list)
    final: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("status") != "ok":
            continue
        key = (r["method"], r["backbone"], r["dataset"])
        if r.get("protocol") == "tune":
            tune[key].append(r)
        elif r.get("protocol") == "final":
            final[key].append(r)
    rows = []
    for (method, backbone, task), runs in sorted(tune.items()):
        keys = grid_keys(runs)
        chosen = select_hparams(runs, keys, settings=_settings)[task]
        epochs = int(get_path(runs[0]["config"], "trainer.epochs"))
        halving = Halving.for_schedule(epochs, eta=eta, rungs=rungs)
        by_point: dict[tuple, list[dict]] = defaultdict(list)
        for r in runs:
            by_point[tuple(get_path(r["config"], k) for k in keys)].append(r)
        points = sorted(by_point, key=_order_key)  # the select stage's order, so both break ties alike
        scores: dict[tuple, dict[int, float | None]] = {}
        for point in points:
            scores[point] = {}
            for rung in halving.rungs:
                values = [_val_at(r, rung, epochs) for r in by_point[point]]
                if any(v is None for v in values):
                    raise ConfigError(
                        f"{method} on {task}: a tune run at {dict(zip(keys, point))} has no val top-1 after epoch "
                        f"{rung}, a halving rung; train the full grid with "
                        f"trainer.eval_every={math.gcd(*halving.rungs)}"
                    )
                scores[point][rung] = _mean(values)
        outcome = simulate(halving, scores)
        full_pick = tuple(chosen["values"][k] for k in keys)

        finals = final.get((method, backbone, task), [])
        full_test, halving_test = _tested(finals, keys, full_pick), _tested(finals, keys, outcome.pick)
        same = outcome.pick == full_pick
        regret = 0.0 if same else (_mean(full_test) - _mean(halving_test) if full_test and halving_test else None)
        rows.append({
            "method": method, "backbone": backbone, "task": task, "points": len(points),
            "rungs": "/".join(str(r) for r in halving.rungs),
            "full_pick": _label(keys, full_pick), "halving_pick": _label(keys, outcome.pick), "same": same,
            "full_val": chosen["val_top1"], "halving_val": outcome.pick_top1,
            "full_test": _mean(full_test), "halving_test": _mean(halving_test), "regret": regret,
            "seed_spread": statistics.stdev(full_test) if len(full_test) > 1 else None,
            "final_seeds": len(full_test), "cost": outcome.cost,
            "halving_values": dict(zip(keys, outcome.pick, strict=True)) if outcome.pick is not None else None,
            "halving_finals": len(halving_test),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=[*COLUMNS, *PICKS])


# beside COLUMNS (not printed): halving's pick as a grid point, and how many final runs it has
PICKS = ["halving_values", "halving_finals"]


def untested_picks(table: pd.DataFrame) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    """Per (backbone, method), the tasks whose halving pick differs from the full grid's and has no final run yet,
    as a hyperparameter file's ``tasks`` (``vpeft.vtab.write_hparams``): the final runs that give their regret."""
    out: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for _, row in table.iterrows():
        if row["same"] or row["halving_values"] is None or row["halving_finals"]:
            continue
        out[(row["backbone"], row["method"])][row["task"]] = {
            "values": row["halving_values"], "val_top1": row["halving_val"], "tuned_by": "halving",
        }  # fmt: skip
    return dict(out)


def _tested(finals: list[dict[str, Any]], keys: Sequence[str], point: tuple | None) -> list[float]:
    """The test top-1 of each final run of the grid point (one per seed)."""
    runs = [f for f in finals if point is not None and tuple(get_path(f["config"], k) for k in keys) == point]
    return [float(f["metrics"]["top1"]) for f in runs if f["metrics"].get("top1") is not None]


def _label(keys: Sequence[str], point: tuple | None) -> str:
    return "-" if point is None else " ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, point, strict=True))


def summary(table: pd.DataFrame) -> dict[str, Any]:
    """Agreement rate, mean and worst regret (points of test top-1, over the rows that have one), mean cost, and
    the median seed-to-seed spread of the full grid's final runs."""
    regrets = table["regret"].dropna()
    spreads = table["seed_spread"].dropna()
    return {
        "grids": len(table),
        "agreement": float(table["same"].mean()) if len(table) else None,
        "mean_regret": float(regrets.mean()) if len(regrets) else None,
        "worst_regret": float(regrets.max()) if len(regrets) else None,
        "regret_rows": len(regrets),
        "median_seed_spread": float(spreads.median()) if len(spreads) else None,
        "mean_cost": float(table["cost"].mean()) if len(table) else None,
    }
