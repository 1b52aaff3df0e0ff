"""A pack: several training runs of one sweep job that share each training step (``vpeft.engine.packed``).

``run.py -m ... pack=K`` groups a sweep's runs into packs of at most K (``vpeft.sweep``); each pack is one
job of the launcher (a joblib worker, a GPU slot, a SLURM array task), and this module runs it. Every run
of a pack keeps the guarantees of a run alone, through the runner's own steps: it is planned from its own
overrides (the same identity, config hash and record path as ``run.py`` gives it), skipped when it is
finished, refused with the fix when its input is bad (the others go on), recorded ``failed`` when it
diverges (the others go on) and ``interrupted`` when a stop signal ends the pack; its record is written
as a lone run's is, with ``cost.packed`` saying what it shared. Runs that cannot share a step with the
others (another split size) train alone, one after another, in the same job. Runs that stop at a halving rung
(``stop_after``) or go on from one pack with the runs at the same rungs.
"""

from __future__ import annotations

import json
import logging
import signal
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from vpeft.engine import TrainConfig
from vpeft.engine.packed import PackError, check_packable, train_packed
from vpeft.env import environment
from vpeft.errors import VpeftError
from vpeft.files import write_json_atomic
from vpeft.jobs import runner
from vpeft.jobs.runner import Context, InputError, Plan
from vpeft.jobs.train import TrainJob
from vpeft.methods import METHODS
from vpeft.results import run_claim

log = logging.getLogger("vpeft")
PACKS_FILE = "vpeft_packs.json"  # in the sweep folder: each pack's runs (their numbers and overrides)


@dataclass
class Member:
    """One run of a pack: its number in the sweep, its overrides and config, and what it has got so far."""

    num: int
    overrides: list[str]
    cfg: DictConfig
    plan: Plan | None = None
    record: dict[str, Any] | None = None
    ctx: Context = field(default_factory=Context)
    run: Any = None  # the PackedRun set up for it
    done: bool = False  # its record (or its bad input) is settled


def write_packs(sweep_dir: Path, packs: list[list[dict[str, Any]]]) -> None:
    write_json_atomic(sweep_dir / PACKS_FILE, {"packs": packs})


def read_pack(sweep_dir: Path, index: int) -> list[dict[str, Any]]:
    """Pack ``index`` of the sweep: its runs' numbers and overrides."""
    return json.loads((sweep_dir / PACKS_FILE).read_text())["packs"][index]


class _Completion(TrainJob):
    """The end of a packed run as the runner executes a job: its result into its record (or the error that ended
    its training, raised again so that the record says it)."""

    def __init__(self, member: Member, result: Any, k: int, pack_id: str) -> None:
        self.member, self.result, self.k, self.pack_id = member, result, k, pack_id

    def base_record(self, plan: Plan, env: dict[str, Any], started: str) -> dict[str, Any]:
        return self.member.record  # set up before the pack trained

    def execute(self, plan: Plan, device: torch.device, record: dict[str, Any], ctx: Context) -> None:
        ctx.state.update(self.member.ctx.state)
        ctx.phase = "training"
        if isinstance(self.result, BaseException):
            raise self.result
        self.complete(plan, device, record, ctx, self.result)
        if self.k > 1:
            record["cost"]["packed"] = {"k": self.k, "pack_id": self.pack_id,
                                        "train_seconds": "the pack's training wall time / k"}  # fmt: skip


def run_pack(cfg: DictConfig, members: list[Member], pack_id: str) -> list[dict[str, Any] | None]:
    """Plan, set up, train together and record every run of the pack; return their records.

    SIGTERM or Ctrl-C records every run that has started and has no record yet ``interrupted`` (a run whose
    record is being written finishes it first), then ends the job as a lone run's would."""
    runner.mark_entered()
    job = TrainJob()
    _, multirun = runner.hydra_overrides()
    device = runner._device(cfg, multirun)
    started = runner.now()
    env = environment(device)
    previous = {s: signal.signal(s, runner._on_sigterm) for s in runner.stop_signals()}
    phase = "setup"
    claims = ExitStack()  # each run's claim, taken in one order by every process (no two wait on each other)
    try:
        for m in members:
            _plan(job, m, multirun)
        for path in sorted({str(m.plan.record_path) for m in members if not m.done}):
            claims.enter_context(run_claim(path))
        for m in [m for m in members if not m.done]:
            _settle(job, m, multirun)
        for m in [m for m in members if not m.done]:
            _setup(job, m, device, env, started, multirun)
        live = [m for m in members if not m.done]
        phase = "training"
        results = _train(live, device)
        phase = "costs and delta"
        for m in live:
            try:
                result, k = results[id(m)]
                runner._execute(_Completion(m, result, k, pack_id), m.plan, device, multirun, started)
            finally:
                m.done = True
                runner._write_status(m.record, False, m.plan, num=m.num)
    except KeyboardInterrupt as e:
        why = str(e) or "interrupted by the user (Ctrl-C)"
        rest = [m for m in members if not m.done and m.record is not None]
        log.error("%s during %s: recording %d runs of the pack as interrupted", why, phase, len(rest))
        with runner.stops_held():
            for m in rest:
                runner._finish_or_report(job, m.plan, m.record, "interrupted", f"{why} during {phase}")
                job.after(m.ctx, m.record, ok=False)
                runner._write_status(m.record, False, m.plan, num=m.num)
        raise
    finally:
        claims.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return [m.record for m in members]


def _plan(job: TrainJob, m: Member, multirun: bool) -> None:
    """The run's plan from its own overrides; bad input settled without a record."""
    try:
        m.plan = job.plan(m.cfg)
        m.plan.overrides = list(m.overrides)
        method = METHODS.get(m.plan.identity["method"])
        if method.runs_alone:
            log.info("%s runs alone (%s)", method.name, method.runs_alone)
    except Exception as e:
        _bad_input(m, e if isinstance(e, VpeftError) else InputError(f"configuration error: {e}"), multirun)


def _settle(job: TrainJob, m: Member, multirun: bool) -> None:
    """Under the run's claim: a finished run is skipped, a folder its record cannot go into is bad input."""
    if m.cfg.get("skip_finished", True) and m.plan.record_path.exists():
        try:
            previous = job.read(m.plan.record_path)
        except (OSError, ValueError):
            previous = None
        missing = job.lacks(previous, m.plan) if previous is not None else None
        if missing:
            print(f"rerun (finished, but {missing}): {m.plan.record_path}", flush=True)
        elif previous is not None and previous.get("status", "ok") == "ok":
            print(f"skipped (finished): {m.plan.record_path} ({job.describe(previous)})", flush=True)
            m.record, m.done = previous, True
            runner._write_status(previous, True, m.plan, num=m.num)
            return
    try:
        runner.check_writable(m.plan.record_path.parent)
    except OSError as e:
        _bad_input(m, InputError(runner._unwritable(m.cfg, m.plan.record_path.parent, e)), multirun)


def _bad_input(m: Member, e: VpeftError, multirun: bool) -> None:
    m.done = True
    if multirun:
        log.error("bad input, no record: %s", e)
    else:
        print(f"error: {e}")
    runner._write_status(None, False, m.plan, bad_input=str(e), num=m.num, overrides=m.overrides)


def _setup(job: TrainJob, m: Member, device: torch.device, env: dict[str, Any], started: str, multirun: bool) -> None:
    m.record = job.base_record(m.plan, env, started)
    try:
        m.run = job.setup(m.plan, device, m.record, m.ctx)
    except VpeftError as e:  # missing data, no network for the weights: bad input, no record
        job.after(m.ctx, m.record, ok=False)
        _bad_input(m, e, multirun)
    except Exception as e:
        import traceback

        error = f"{type(e).__name__}: {e} (during setup)\n{traceback.format_exc(limit=-3)}"
        runner._finish_or_report(job, m.plan, m.record, "failed", error)
        job.after(m.ctx, m.record, ok=False)
        runner._write_status(m.record, False, m.plan, num=m.num)
        m.done = True


def _train(live: list[Member], device: torch.device) -> dict[int, tuple[Any, int]]:
    """Each run's TrainResult, or the error that ended its training (raised again where its record is written),
    with the number of runs it shared its steps with (itself included): the runs that can share a step train
    together, per group of one split size and config; a run whose method cannot pack trains alone. A group that
    fails takes no other group down."""
    groups: dict[str, list[Member]] = {}
    rung: dict[int, tuple[Any, int | None]] = {}  # per run: the rung state it resumes from, the rung it stops at
    for m in live:
        method = m.run.model.vpeft_method
        try:
            check_packable(method, m.run.model)
            resume, stop = rung[id(m)] = TrainJob().rung(m.plan, m.run)
            r = m.plan.resolved
            shared_optim = {k: v for k, v in r["optim"].items() if k not in ("lr", "weight_decay")}
            shared_method = {k: v for k, v in r["method"].items() if k not in method.per_run_config}
            start = resume.epoch if resume is not None else 0  # halving's survivors of one rung pack together
            key = repr((len(m.run.train_labels), r["trainer"], shared_method, shared_optim, r["backbone"], start, stop))
        except PackError as e:
            log.info("%s: trains alone (%s)", m.plan.record_path.name, e)
            key = f"alone-{m.num}"
        groups.setdefault(key, []).append(m)
    results: dict[int, tuple[Any, int]] = {}
    for group in groups.values():
        for m in group:
            m.ctx.phase = "training"
        first = group[0]
        trainer = TrainConfig(**first.plan.resolved["trainer"])
        bb = first.ctx.state["backbone"]
        if len(group) > 1:
            try:
                resumes, stop = [rung[id(m)][0] for m in group], rung[id(first)][1]
                outcome = train_packed([m.run for m in group], trainer, bb.mean, bb.std, device, resumes, stop)
                for m, r in zip(group, outcome, strict=True):
                    if not isinstance(r, Exception):
                        TrainJob().at_rung(m.plan, m.run, m.ctx, r, stop)
                    results[id(m)] = (r, len(group))
                continue
            except PackError as e:  # another backbone, optimizer or grouping: the runs train one by one
                log.warning("these %d runs cannot share a step (%s); they train one after another", len(group), e)
            except Exception as e:  # out of memory, say: each run of the group is recorded failed with it
                log.exception("the training of %d packed runs failed; they are recorded failed", len(group))
                results.update({id(m): (e, len(group)) for m in group})
                continue
        for m in group:
            try:
                result = TrainJob().fit(m.plan, m.run, device, m.ctx, rung.get(id(m)))  # (its state read once)
            except Exception as e:  # a diverged loss, or any other error: this run's record says which
                result = e
            results[id(m)] = (result, 1)
    return results
