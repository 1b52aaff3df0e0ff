"""The machinery every job shares: plan -> execute -> finish, with one record whatever happens.

A job (a training run, a bench measurement, a merge) supplies only its own middle: how a config
becomes a plan (identity and record path), the record it starts from, and what it does. The runner
gives all of them the same guarantees:

- bad input found while planning or setting up (a config error, missing data, no network for the
  weights) exits 2 with the problem and the fix, and no record; in a sweep the job's status file says
  ``bad_input`` with the error, the sweep goes on and its summary names the fix (it exits 2);
- a finished (``ok``) record of the same plan is skipped, and is never replaced by a worse one;
- Ctrl-C and SIGTERM (what schedulers send before a kill) leave an ``interrupted`` record, and any
  error after set-up a ``failed`` one, keeping what was measured so far; a stop signal that comes
  while a record is written (or waits for its lock) waits until the record is on disk;
- a records folder that cannot be written is bad input, found before the job starts; a write that
  fails at the end (a full disk) prints what was measured and the record, and exits 1;
- records are strict JSON, written atomically, one lock per record; the environment is captured once;
- a run is claimed while it runs: a second process of the same run (another sweep over it) waits, then skips it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig

from vpeft.env import claim_gpu, environment, resolve_device
from vpeft.errors import RunFailed, VpeftError
from vpeft.files import check_writable, non_finite, null_non_finite, write_json_atomic
from vpeft.results import run_claim, validate, write_record_guarded
from vpeft.results.store import load_json_object

log = logging.getLogger("vpeft")
STATUS_FILE = "vpeft_status.json"  # each sweep job's status, in its Hydra folder; vpeft.callbacks sums them up


class InputError(VpeftError):
    """Bad input found before a job starts: exits 2 and leaves no record."""


class _BadInputInSweep(Exception):
    """Bad input found while a job of a sweep set up: no record; its status file says bad_input."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, what schedulers (SLURM, Kubernetes) send before they kill a job: handled like Ctrl-C."""


class RecordNotWritten(OSError):
    """The record could not be written (a full or read-only disk): what was measured is printed instead."""


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

    check: ClassVar[Callable[[Any], dict[str, Any]]] = staticmethod(validate)  # the schema of the job's records

    def read(self, path: Path) -> dict[str, Any]:
        """The valid record at ``path`` (OSError / ValueError otherwise)."""
        return type(self).check(load_json_object(path))

    def write(self, path: Path, record: dict[str, Any]) -> bool:
        """Write ``record`` unless that would replace a finished one with a worse one; whether it wrote."""
        return write_record_guarded(path, record, type(self).check)[1]

    def after(self, ctx: Context, record: dict[str, Any], ok: bool) -> None:
        """Called once the record is written (or the job ended without one)."""

    def describe(self, record: dict[str, Any]) -> str:
        """One line about a finished record (printed when it is skipped)."""
        return str(record.get("status"))

    def lacks(self, record: dict[str, Any], plan: Plan) -> str | None:
        """What a finished record of this plan lacks, so that the job runs again instead of being skipped."""
        return None


def record_envelope(plan: Plan, env: dict[str, Any], started: str, kind: str, version: int,
                    **fields: Any) -> dict[str, Any]:  # fmt: skip
    """A job's record before it runs (``failed`` until it finishes): its kind, the plan's identity, the job's own
    empty ``fields``, then what every record carries (metrics, cost, environment, config, times)."""
    return {
        "kind": kind, "schema_version": version, "status": "failed", "error": None, **plan.identity, **fields,
        "metrics": {}, "cost": {}, "env": env, "config": plan.resolved, "overrides": plan.overrides,
        "started_at": started, "finished_at": None,
    }  # fmt: skip


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


def _stop(signum: int) -> KeyboardInterrupt:
    """The exception a stop signal raises: KeyboardInterrupt for Ctrl-C, Terminated for the others."""
    if signum == signal.SIGINT:
        return KeyboardInterrupt("interrupted by the user (Ctrl-C)")
    why = f"terminated by signal {signal.Signals(signum).name}"
    if signum != signal.SIGTERM:
        why += " (the scheduler's notice of the time limit or of a preemption)"
    return Terminated(why)


def _on_sigterm(signum: int, frame: Any) -> None:
    # Schedulers repeat the signal (SLURM: srun forwards SIGTERM, then slurmstepd sends its own): the
    # first one stops the job, later ones must not break off the writing of its record
    for s in stop_signals():
        signal.signal(s, signal.SIG_IGN)
    raise _stop(signum)


@contextmanager
def stops_held() -> Iterator[list[int]]:
    """Stop signals (Ctrl-C, SIGTERM, the scheduler's notice) are noted, not raised, inside the block, so that
    a record being written (or waiting for its lock) is never broken off; yields the signals noted. Outside
    the main thread, where no handler can be set, nothing changes."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    previous = {
        s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in {signal.SIGINT, *stop_signals()}
    }
    try:
        yield held
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)  # None: a handler set outside Python


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
    with run_claim(plan.record_path) if job.skippable and plan.record_path else nullcontext():
        return _claimed(job, cfg, plan, device, multirun, started)


def _claimed(job: Job, cfg: DictConfig, plan: Plan, device: torch.device, multirun: bool, started: str):
    """The rest of ``_run``, under the run's claim (a concurrent process of the same run waits for it)."""
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
    try:  # a folder the record cannot go into fails now, not after hours of training
        if plan.record_path is not None:
            check_writable(plan.record_path.parent)
    except OSError as e:
        e = InputError(_unwritable(cfg, plan.record_path.parent, e))
        _input_failure(e, multirun)
        _write_status(None, False, plan, bad_input=str(e))
        return None
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
        _finish_or_report(job, plan, record, status, error)
        job.after(ctx, record, ok=False)
        if multirun or rethrow is None:
            return record
        return rethrow()

    try:
        job.execute(plan, device, record, ctx)
        ctx.phase = "recording"
        with stops_held() as held:  # what was measured goes on disk before a stop signal is obeyed
            written = _finish_or_report(job, plan, record, "ok", None)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM through _on_sigterm
        why = str(e) or "interrupted by the user (Ctrl-C)"
        log.error("%s during %s: recording the job as interrupted", why, ctx.phase)
        with stops_held():  # a second Ctrl-C must not break off this record either
            _finish_or_report(job, plan, record, "interrupted", f"{why} during {ctx.phase}")
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
    if not written:  # the disk refused it: what was measured and the record went to stderr instead
        job.after(ctx, record, ok=False)
        if not multirun:
            sys.exit(1)
        record.update(status="failed", error=f"the record could not be written to {plan.record_path}")
        return record
    job.after(ctx, record, ok=True)
    if held:
        stop_signal = _stop(held[0])
        log.warning("%s while the record was written: the record is on disk (%s, ok); stopping now",
                    stop_signal, plan.record_path)  # fmt: skip
        stop_signal.record = record
        raise stop_signal
    return record


def _reraise() -> None:
    raise  # noqa: PLE0704 - called inside the except block that caught it


def finish(job: Job, plan: Plan, record: dict[str, Any], status: str, error: str | None) -> dict[str, Any]:
    """Write the record, unless it would replace a finished (ok) record of this plan with a worse one.

    Records are strict JSON: a failed or interrupted run's NaN or infinite numbers (a diverged loss) are
    stored as null, their values in its error; an ok record with one is refused (ValueError naming the key).
    """
    if "status" in record or status != "ok":
        record.update(status=status, error=error)
    record["finished_at"] = now()
    bad = list(non_finite(record)) if status != "ok" else []
    if bad:
        record.update(null_non_finite(record))
        shown = ", ".join(f"{key}={value}" for key, value in bad)
        record["error"] = f"{record['error']} [not finite, stored as null: {shown}]"
    if status != "ok" and not job.records_failures or plan.record_path is None:
        return record
    try:
        written = job.write(plan.record_path, record)
    except OSError as e:
        raise RecordNotWritten(e.errno, f"could not write the record {plan.record_path}: {e.strerror or e}") from e
    if written:
        log.info("record: %s (%s)", plan.record_path, status)
    else:
        log.warning("record: %s holds a finished (ok) run of this configuration; this %s run left it as it is",
                    plan.record_path, status)  # fmt: skip
    return record


def _finish_or_report(job: Job, plan: Plan, record: dict[str, Any], status: str, error: str | None) -> bool:
    """``finish``; when the disk refuses the record, print what was measured and the record itself to stderr
    and return False: nothing measured is lost with the file."""
    try:
        finish(job, plan, record, status, error)
    except RecordNotWritten as e:
        print(f"error: {e.strerror}; free space on the disk of {plan.record_path.parent} or make it writable, "
              f"then save the record printed below as {plan.record_path.name} there", file=sys.stderr)  # fmt: skip
        print(f"measured ({status}, not on disk): {job.describe(record)}; the record:", file=sys.stderr)
        print(json.dumps(record, default=str), file=sys.stderr, flush=True)
        return False
    return True


def _unwritable(cfg: DictConfig, folder: Path, e: OSError) -> str:
    """The bad-input message of a records folder that cannot be written, naming the paths.* key that leads to it."""
    where = os.path.normpath(folder)
    roots = {f"paths.{k}": os.path.normpath(str(v)) for k, v in (cfg.get("paths") or {}).items() if v}
    holding = [(len(root), key) for key, root in roots.items() if where == root or where.startswith(root + os.sep)]
    key = max(holding)[1] if holding else "paths.results"
    return (f"cannot write records in {folder} ({e.strerror or e}): make it writable (and free space on its "
            f"disk), or set {key} to a writable folder")  # fmt: skip


def _input_failure(e: Exception, multirun: bool) -> None:
    """Bad input leaves no record: a single job exits 2 here; a job of a sweep returns (its status file
    says bad_input, the sweep goes on, and its summary names the fix)."""
    if multirun:
        log.error("bad input, no record: %s", e)
        return
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _write_status(
    record: dict[str, Any] | None,
    skipped: bool,
    plan: Plan | None,
    bad_input: str | None = None,
    num: int | None = None,
    overrides: list[str] | None = None,
) -> None:
    """A small status file in the Hydra job folder, read by the sweep summary callback; a run of a pack (``num``:
    its number in the sweep) writes its own beside the others'."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        folder = Path(hc.runtime.output_dir)
    except (ImportError, ValueError):
        return
    status = {
        "num": hc.job.get("num") if num is None else num,  # the run's number in its sweep (matched to its plan)
        "status": "bad_input" if bad_input is not None else record.get("status", "ok") if record else "failed",
        "skipped": skipped,
        "record": str(plan.record_path) if plan and plan.record_path and bad_input is None else None,
        "error": bad_input if bad_input is not None else record.get("error") if record else None,
        "overrides": plan.overrides if plan else overrides if overrides is not None else hydra_overrides()[0],
    }
    write_json_atomic(folder / (STATUS_FILE if num is None else STATUS_FILE.replace(".json", f".{num}.json")), status)


def _device(cfg: DictConfig, multirun: bool) -> torch.device:
    if str(cfg.get("device", "auto")) == "auto" and multirun and torch.cuda.is_available():
        return claim_gpu(int(cfg.get("jobs_per_gpu", 1)))
    return resolve_device(str(cfg.get("device", "auto")))
