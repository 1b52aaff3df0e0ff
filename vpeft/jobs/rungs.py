"""A run's state at a halving rung, beside its record: what lets the next rung continue it.

A run stopped at a rung (``stop_after``) leaves ``<record>.rung.pt``: its trainable tensors, its optimizer's
state dict, its history and best periodic evaluation, the epoch and the run's config hash, written atomically
before the record. A later rung of the same run reads it back (``torch.load(weights_only=True)``: tensors and
plain values only, no code) and resumes exactly (``vpeft.engine.train(resume=...)``). A state that is missing,
unreadable, of another run or of another epoch than the record's is not used: the run retrains from the start
to the rung asked for, which costs time and loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from vpeft.engine import EpochStats, Resume, TrainResult
from vpeft.errors import ConfigError
from vpeft.files import atomic_path, write_json_atomic
from vpeft.vtab import get_path

log = logging.getLogger("vpeft")

SUFFIX = ".rung.pt"


def state_path(record_path: Path) -> Path:
    return record_path.with_suffix(SUFFIX)


def stop_epoch(stop_after: Any, epochs: int) -> int | None:
    """The epoch to stop after (None: the schedule's end); ConfigError naming the fix for a value out of range."""
    if stop_after is None:
        return None
    if isinstance(stop_after, bool) or not isinstance(stop_after, int) or not 1 <= stop_after <= epochs:
        raise ConfigError(f"stop_after must be an epoch of the schedule, 1..{epochs} (trainer.epochs), or null; "
                          f"got {stop_after!r}")  # fmt: skip
    return None if stop_after == epochs else stop_after


def save(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, run_hash: str, result: TrainResult
) -> None:
    state = {
        "config_hash": run_hash,
        "epoch": result.epochs[-1].epoch,
        "tensors": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "history": [dataclasses.asdict(e) for e in result.epochs],
        "best": [result.best_epoch_top1, result.best_epoch] if result.best_epoch is not None else None,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def restore(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, run_hash: str, stop: int | None
) -> Resume | None:
    """Load the rung's state into ``model`` and ``optimizer`` and say where training resumes; None (and both left
    as set up) when there is no usable state."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        epoch = int(state["epoch"])
        if state["config_hash"] != run_hash:
            raise ValueError(f"it is the state of run {state['config_hash']}, not {run_hash}")
        if stop is not None and epoch >= stop:
            raise ValueError(f"it is at epoch {epoch}, not before epoch {stop}")
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        tensors = state["tensors"]
        if sorted(tensors) != sorted(named) or any(tensors[n].shape != p.shape for n, p in named.items()):
            raise ValueError("its tensors are not the run's trainable set")
        history = [EpochStats(**e) for e in state["history"]]
        best = tuple(state["best"]) if state["best"] is not None else None
        optimizer.load_state_dict(state["optimizer"])  # checks its groups against the optimizer's first
    except Exception as e:  # unreadable, truncated, another run's: retrain from the start
        log.warning("not resuming from %s (%s): the run trains from the start", path, e)
        return None
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(tensors[n])
    log.info("resuming from %s after epoch %d", path, epoch)
    return Resume(epoch=epoch, history=history, best=best)  # type: ignore[arg-type]


HALVING_KIND = "vpeft.halving/1"


def write_stopped(path: Path, keys: list[str], stopped: dict[str, list[dict[str, Any]]], **about: Any) -> None:
    """The halving file of a tune stage: per task, the grid points stopped so far and the rung each stopped at."""
    write_json_atomic(path, {"kind": HALVING_KIND, "keys": keys, **about, "stopped": stopped})


def read_stopped(path: Path, keys: list[str], **about: Any) -> dict[str, list[dict[str, Any]]]:
    """The points an earlier run of the same halving (same grid keys, eta and rungs) stopped; {} if none."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    same = data.get("kind") == HALVING_KIND and data.get("keys") == keys
    if not same or any(data.get(k) != v for k, v in about.items()):
        return {}
    return data.get("stopped", {})


def stopped_at(path: str | Path, task: str, resolved: dict[str, Any]) -> int | None:
    """The rung at which the halving file says this run's grid point stopped (None: it goes on); ConfigError
    naming the file when it cannot be read."""
    try:
        data = json.loads(Path(path).read_text())
        if data.get("kind") != HALVING_KIND:
            raise ValueError(f"not a halving file (kind {data.get('kind')!r})")
        point = {k: get_path(resolved, k) for k in data["keys"]}
        for entry in data["stopped"].get(task, []):
            if entry["values"] == point:
                return int(entry["epoch"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"halving={path}: {e}; the tune stage writes it (scripts/vtab1k.py --tune halving)") from None
    return None


def drop(path: Path) -> None:
    """The state of a run that went past its rung (a later state, or the whole schedule, replaces it)."""
    path.unlink(missing_ok=True)
