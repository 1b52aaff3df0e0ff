"""The machinery every job shares: plan -> execute -> finish, with one record whatever happens.

A job (a training run, a bench measurement, a merge) supplies only its own middle: how a config
becomes a plan (identity and record path), the record it starts from, and what it does. The runner
gives all of them the same guarantees:

- bad input found while planning or setting up (a config error, missing data, no network for the
  weights) exits 2 with the problem and the fix, and no record; in a sweep the job's status file says
  ``bad_input`` with the error, the sweep goes on and its summary names the fix (it exits 2);
- a finished (``ok``) record of the same plan is skipped, and is never replaced by a worse one;
- Ctrl-C and SIGTERM (what schedulers send before a kill) leave an ``interrupted`` record, and any
  error after set-up a ``failed`` one, keeping what was measured so far;
- records are written atomically, one lock per record; the environment is captured once.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig

from vpeft.env import claim_gpu, environment, resolve_device
from vpeft.errors import RunFailed, VpeftError
from vpeft.files import write_json_atomic
from vpeft.results import read_record, write_record_guarded

log = logging.getLogger("vpeft")
STATUS_FILE = "vpeft_status.json"  # each sweep job's status, in its Hydra folder; vpeft.callbacks sums them up


class InputError(VpeftError):
    """Bad input found before a job starts: exits 2 and leaves no record."""


class _BadInputInSweep(Exception):
    """Bad input found while a job of a sweep set up: no record; its status file says bad_input."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, what schedulers (SLURM, Kubernetes) send before they kill a job: handled like Ctrl-C."""


@dataclass
class Plan:
    """What a job is, decided from the config alone before anything heavy happens."""

    cfg: DictConfig
    resolved: dict[str, Any]
    overrides: list[str]
    identity: dict[str, Any]  # what names the job's result; goes into its record as is
    record_path: Path | None  # None until the job knows it (a bench record is named by what it measured)
    extra: dict[str, Any] = field(default_factory=dict)  # the job's own planned values


@dataclass
class Context:
    """What the runner and a job share while it executes."""

    phase: str = "setup"  # "setup": errors are bad input; any later phase records them
    state: dict[str, Any] = field(default_factory=dict)  # the job's own (a logger to close, ...)


class Job:
    """One kind of job. Subclasses implement ``plan``, ``base_record`` and ``execute``."""

    kind: ClassVar[str] = ""
    skippable: ClassVar[bool] = True  # a finished record of the same plan is skipped
    records_failures: ClassVar[bool] = True  # failed / interrupted jobs leave a record

    def plan(self, cfg: DictConfig) -> Plan:
        raise NotImplementedError

    def base_record(self, plan: Plan, env: dict[str, Any], started: str) -> dict[str, Any]:
        raise NotImplementedError

    def execute(self, plan: Plan, device: torch.device, record: dict[str, Any], ctx: Context) -> None:
        """Fill ``record``; set ``ctx.phase`` as the job moves past set-up."""
        raise NotImplementedError

    def read(self, path: Path) -> dict[str, Any]:
        """The valid record at ``path`` (OSError / ValueError otherwise)."""
        return read_record(path)

    def write(self, path: Path, record: dict[str, Any]) -> bool:
        """Write ``record`` unless that would replace a finished one with a worse one; whether it wrote."""
        return write_record_guarded(path, record)[1]

    def after(self, ctx: Context, record: dict[str, Any], ok: bool) -> None:
        """Called once the record is written (or the job ended without one)."""

    def describe(self, record: dict[str, Any]) -> str:
        """One line about a finished record (printed when it is skipped)."""
        return str(record.get("status"))

    def lacks(self, record: dict[str, Any], plan: Plan) -> str | None:
        """What a finished record of this plan lacks, so that the job runs again instead of being skipped."""
        return None


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def hydra_overrides() -> tuple[list[str], bool]:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return list(hc.overrides.task), hc.mode == RunMode.MULTIRUN
    except (ImportError, ValueError):  # called outside a Hydra app (tests, notebooks)
        return [], False


_entered = False


def entered() -> bool:
    """Whether a job (or a sweep's first callback) started: Hydra's exit 1 before that is a config error."""
    return _entered


def mark_entered() -> None:
    global _entered
    _entered = True


def _on_sigterm(signum: int, frame: Any) -> None:
    # Schedulers repeat the signal (SLURM: srun forwards SIGTERM, then slurmstepd sends its own): the
    # first one stops the job, later ones must not break off the writing of its record
    for s in stop_signals():
        signal.signal(s, signal.SIG_IGN)
    why = f"terminated by signal {signal.Signals(signum).name}"
    if signum != signal.SIGTERM:
        why += " (the scheduler's notice of the time limit or of a preemption)"
    raise Terminated(why)


def stop_signals() -> list[signal.Signals]:
    """SIGTERM; in a submitit job also the signal SLURM sends ``signal_delay_s`` before the time limit.

    submitit's own handler for that signal would requeue the job to start over (a run has no mid-run
    checkpoint, so it would time out again) or raise inside training; the run is recorded interrupted
    instead, while there is time, and the job ends without a result (a requeued job runs it again).
    """
    sigs = [signal.SIGTERM]
    if os.environ.get("SUBMITIT_FOLDER"):
        usr = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
        if usr is not None and usr != signal.SIGTERM:
            sigs.append(usr)
    return sigs


def run_job(job: Job, cfg: DictConfig) -> dict[str, Any] | None:
    """Plan, execute and record ``job``; return its record (None when bad input left none in a sweep)."""
    mark_entered()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _on_sigterm) for s in stop_signals()} if main_thread else {}
    try:
        return _run(job, cfg)
    except Terminated:
        if hydra_overrides()[1]:
            raise  # in a sweep the launcher decides; the record and the status file say interrupted
        sys.exit(128 + signal.SIGTERM)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _run(job: Job, cfg: DictConfig) -> dict[str, Any] | None:
    started = now()
    _, multirun = hydra_overrides()
    plan: Plan | None = None
    try:
        plan = job.plan(cfg)
        device = _device(cfg, multirun)
    except Exception as e:  # any error before the job starts is bad input: exit 2 (in a sweep: no record either)
        if not isinstance(e, VpeftError):
            e = InputError(f"configuration error: {type(e).__name__}: {e}")
        _input_failure(e, multirun)
        _write_status(None, False, plan, bad_input=str(e))
        return None
    if job.skippable and cfg.get("skip_finished", True) and plan.record_path and plan.record_path.exists():
        try:
            previous = job.read(plan.record_path)
        except (OSError, ValueError):
            previous = None
        missing = job.lacks(previous, plan) if previous is not None else None
        if missing:
            print(f"rerun (finished, but {missing}): {plan.record_path}", flush=True)
        elif previous is not None and previous.get("status", "ok") == "ok":
            print(f"skipped (finished): {plan.record_path} ({job.describe(previous)})", flush=True)
            _write_status(previous, True, plan)
            return previous
    record, bad_input = None, None
    try:
        record = _execute(job, plan, device, multirun, started)
    except _BadInputInSweep as e:  # (a single run has exited 2)
        bad_input = str(e)
        return None
    except KeyboardInterrupt as e:  # the status file says interrupted, as the record does
        record = getattr(e, "record", None) or {"status": "interrupted", "error": str(e) or "interrupted"}
        raise
    finally:
        _write_status(record, False, plan, bad_input=bad_input)
    return record


def _execute(job: Job, plan: Plan, device: torch.device, multirun: bool, started: str) -> dict[str, Any] | None:
    env = environment(device)
    record = job.base_record(plan, env, started)
    ctx = Context()

    def stop(status: str, error: str, rethrow: Callable[[], Any] | None) -> dict[str, Any] | None:
        finish(job, plan, record, status, error)
        job.after(ctx, record, ok=False)
        if multirun or rethrow is None:
            return record
        return rethrow()

    try:
        job.execute(plan, device, record, ctx)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM through _on_sigterm
        why = str(e) or "interrupted by the user (Ctrl-C)"
        log.error("%s during %s: recording the job as interrupted", why, ctx.phase)
        finish(job, plan, record, "interrupted", f"{why} during {ctx.phase}")
        job.after(ctx, record, ok=False)
        e.record = record
        raise
    except RunFailed as e:  # a known way for a started job to fail (a diverged loss): exit 1
        log.error("%s", e)
        return stop("failed", str(e), lambda: sys.exit(1))
    except VpeftError as e:
        if ctx.phase == "setup":  # no network for the weights, missing data, a value the set-up refused
            job.after(ctx, record, ok=False)
            _input_failure(e, multirun)
            raise _BadInputInSweep(str(e)) from e
        return stop("failed", f"{e} (during {ctx.phase})", _reraise)
    except Exception as e:
        error = f"{type(e).__name__}: {e} (during {ctx.phase})\n{traceback.format_exc(limit=-3)}"
        if multirun:
            log.exception("job failed; the sweep goes on")
        return stop("failed", error, _reraise)
    finish(job, plan, record, "ok", None)
    job.after(ctx, record, ok=True)
    return record


def _reraise() -> None:
    raise  # noqa: PLE0704 - called inside the except block that caught it


def finish(job: Job, plan: Plan, record: dict[str, Any], status: str, error: str | None) -> dict[str, Any]:
    """Write the record, unless it would replace a finished (ok) record of this plan with a worse one."""
    if "status" in record or status != "ok":
        record.update(status=status, error=error)
    record["finished_at"] = now()
    if status != "ok" and not job.records_failures or plan.record_path is None:
        return record
    try:
        written = job.write(plan.record_path, record)
    except OSError as e:
        raise OSError(f"could not write the record {plan.record_path}: {e.strerror or e}") from e
    if written:
        log.info("record: %s (%s)", plan.record_path, status)
    else:
        log.warning("record: %s holds a finished (ok) run of this configuration; this %s run left it as it is",
                    plan.record_path, status)  # fmt: skip
    return record


def _input_failure(e: Exception, multirun: bool) -> None:
    """Bad input leaves no record: a single job exits 2 here; a job of a sweep returns (its status file
    says bad_input, the sweep goes on, and its summary names the fix)."""
    if multirun:
        log.error("bad input, no record: %s", e)
        return
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _write_status(
    record: dict[str, Any] | None, skipped: bool, plan: Plan | None, bad_input: str | None = None
) -> None:
    """A small status file in the Hydra job folder, read by the sweep summary callback."""
    try:
        from hydra.core.hydra_config import HydraConfig

        folder = Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return
    status = {
        "status": "bad_input" if bad_input is not None else record.get("status", "ok") if record else "failed",
        "skipped": skipped,
        "record": str(plan.record_path) if plan and plan.record_path and bad_input is None else None,
        "error": bad_input if bad_input is not None else record.get("error") if record else None,
        "overrides": plan.overrides if plan else hydra_overrides()[0],
    }
    write_json_atomic(folder / STATUS_FILE, status)


def _device(cfg: DictConfig, multirun: bool) -> torch.device:
    if str(cfg.get("device", "auto")) == "auto" and multirun and torch.cuda.is_available():
        return claim_gpu(int(cfg.get("jobs_per_gpu", 1)))
    return resolve_device(str(cfg.get("device", "auto")))
