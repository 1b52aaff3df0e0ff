"""Sweeps (``run.py -m``): every job checked before any starts, a stop that stops them all, the summary, and SLURM.

``VpeftSweeper`` (hydra_plugins/vpeft_sweeper.py, Hydra's sweeper here: conf/hydra/sweeper/vpeft.yaml) runs
``sweep``: it composes every job's config before any job starts, so that a typo in one value (``method=lora,lorra``)
refuses that job with the fix while the others run; it writes the sweep's jobs to ``vpeft_sweep.json`` in the sweep
folder; and on SIGTERM or Ctrl-C it writes ``vpeft_stopped`` there, which every job of the sweep heeds wherever it
runs (this process, a joblib worker, a submitit job): a running job records ``interrupted``, a job not started does
not start. ``SweepSummary`` (a Hydra callback) then says which jobs finished, failed, were interrupted, had bad input
or never ran, and sets the exit status. ``hydra/launcher=slurm`` (hydra_plugins/vpeft_slurm.py) runs a sweep as
one job array through ``launch_slurm``.

The VTAB-1k protocol's selection step (``select_hparams``, the hyperparameter files) is in ``vpeft.vtab``.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

import vpeft.config  # noqa: F401  (registers the resolvers: the sweep folder's name has ${vpeft.pid:})
from vpeft.files import write_json_atomic
from vpeft.jobs.runner import STATUS_FILE, Terminated, mark_entered

__all__ = ["PLAN_FILE", "STATUS_FILE", "STOP_FILE", "SweepSummary", "SweepTask", "launch_slurm", "summarize", "sweep"]

_log = logging.getLogger("vpeft.sweep")
PLAN_FILE = "vpeft_sweep.json"  # the sweep's jobs (number and overrides) and the values refused before it started
STOP_FILE = "vpeft_stopped"  # the signal that stopped the sweep; no job of the sweep starts once it exists
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# -- the sweep -----------------------------------------------------------------------------------------------------


def sweep(sweeper: Any, arguments: list[str]) -> list[Any]:
    """Hydra's basic sweep (every combination, in batches) with each job checked first and a stop that stops.

    Every job's config is composed before any job starts (Hydra does so too, but one failure ends the whole sweep):
    a job whose config cannot be composed is bad input, named with the fix, and the others run. SIGTERM or Ctrl-C
    stops the sweep: no further job starts, the running ones record ``interrupted``, and the summary follows.
    """
    from hydra._internal.core_plugins.basic_launcher import BasicLauncher
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    loader = sweeper.hydra_context.config_loader
    parsed = OverridesParser.create(config_loader=loader).parse_overrides([*sweeper._parse_config(), *arguments])
    sweep_dir = Path(str(sweeper.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(sweeper.config, sweep_dir / "multirun.yaml")
    for stale in [sweep_dir / STOP_FILE, *sweep_dir.glob(f"*/{STATUS_FILE.replace('.json', '*.json')}")]:
        stale.unlink(missing_ok=True)
    size = int(OmegaConf.select(sweeper.config, "pack", default=1) or 1)
    batches, refused = [], []
    for batch in sweeper.split_arguments(parsed, sweeper.max_batch_size):
        valid = []
        for overrides in batch:
            error = _config_error(loader, sweeper.config, list(overrides))
            if error is None and size > 1:
                error = _unpackable(loader, sweeper.config, list(overrides), size)
            if error is None:
                valid.append(list(overrides))
            else:
                _log.error("bad input, not started: %s: %s", " ".join(overrides), error)
                refused.append({"status": "bad_input", "overrides": list(overrides), "error": error})
        if valid:
            batches.append(valid)
    planned = [{"num": n, "overrides": o} for n, o in enumerate(o for batch in batches for o in batch)]
    write_json_atomic(sweep_dir / PLAN_FILE, {"jobs": planned, "bad_input": refused})
    if size > 1 and planned:  # the launcher's jobs become packs of runs; each run keeps its number and status
        batches = _packs(loader, sweeper.config, planned, size, sweep_dir)

    stop = _Stop(sweep_dir, in_process=isinstance(sweeper.launcher, BasicLauncher))
    returns, num = [], 0
    with stop.handled():
        try:
            for batch in batches:
                if stop.signum is not None:
                    break
                results = sweeper.launcher.launch(batch, initial_job_idx=num)
                for r in results:
                    _ = r.return_value  # a job that raised: its error ends the sweep, as in Hydra's sweeper
                returns.append(results)
                num += len(batch)
        except KeyboardInterrupt as e:  # the in-process job's own handler saw the signal first
            stop.stop(signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
        except Exception as e:
            if stop.signum is None:
                raise
            _log.warning("the launcher ended after the stop: %s: %s", type(e).__name__, e)  # a worker Ctrl-C killed
    return returns


# what may differ between the runs of one pack (vpeft.engine.packed), with the method's own fixed scales
# (Method.per_run_config: LoRA's alpha, ...); everything else must match
PACK_MAY_DIFFER = ("dataset", "seed", "optim.lr", "optim.weight_decay", "hparams")


def _unpackable(loader: Any, config: DictConfig, overrides: list[str], size: int) -> str | None:
    """Why a job of a ``pack=K`` sweep cannot be packed (packs are of training runs), or None."""
    cfg = loader.load_sweep_config(config, overrides)
    job = str(cfg.get("job", "train"))
    if job != "train" or cfg.get("bench", {}).get("only", False):
        what = f"job={job}" if job != "train" else "bench.only=true"
        return f"pack={size} trains runs together, and a {what} job is not a training run: run it without pack="
    return None


def _packs(loader: Any, config: DictConfig, planned: list[dict[str, Any]], size: int, sweep_dir: Path) -> list[Any]:
    """The sweep's runs grouped into packs of at most ``size`` that share all but PACK_MAY_DIFFER (in the order
    they were planned), written to the sweep folder; the launcher's jobs, one per pack, in one batch."""
    from omegaconf import OmegaConf

    from vpeft.jobs.pack import write_packs
    from vpeft.jobs.train import apply_hparams
    from vpeft.methods import METHODS

    groups: dict[str, list[dict[str, Any]]] = {}
    for job in planned:
        cfg = loader.load_sweep_config(config, job["overrides"])
        try:
            apply_hparams(cfg)  # a task's chosen values (hparams=FILE) decide its pack too
        except Exception:  # the run itself says what is wrong with the file; here it just packs alone
            groups[f"alone-{job['num']}"] = [job]
            continue
        if cfg.get("halving") and _halted(cfg):  # stopped by successive halving: skipped, so it takes no one's place
            groups.setdefault("halted", []).append(job)
            continue
        plain = OmegaConf.create(OmegaConf.to_container(cfg))
        name = OmegaConf.select(plain, "method.name")
        own = METHODS.get(name).per_run_config if name in METHODS else ()
        for key in (*PACK_MAY_DIFFER, *(f"method.{k}" for k in own), "hydra"):
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(plain, parent) if parent else plain
            if node is not None and leaf in node:
                del node[leaf]
        groups.setdefault(OmegaConf.to_yaml(plain), []).append(job)
    packs = [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]
    write_packs(sweep_dir, packs)
    _log.info("%d runs in %d packs of at most %d", len(planned), len(packs), size)
    return [[[*pack[0]["overrides"], f"pack_job={i}"] for i, pack in enumerate(packs)]]


def _halted(cfg: DictConfig) -> bool:
    """Whether the halving file stops this run's grid point (its pack jobs skip it), so that the runs that go on
    from a rung pack with each other; an unreadable file is the run's own bad input, said when it runs."""
    from omegaconf import OmegaConf

    from vpeft.jobs.rungs import stopped_at
    from vpeft.results.record import dataset_id

    try:  # the groups a grid varies (hydra's own keys resolve only inside a job)
        resolved = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("dataset", "optim", "method", "trainer",
                                                                               "backbone")}  # fmt: skip
        return stopped_at(cfg.halving, dataset_id(resolved["dataset"]), resolved) is not None
    except Exception:
        return False


def _config_error(loader: Any, config: DictConfig, overrides: list[str]) -> str | None:
    """Why a job's config cannot be composed (with the valid options for a config group), or None."""
    try:
        loader.load_sweep_config(config, overrides)
        return None
    except Exception as e:
        why = " ".join(str(e).strip().split("\n")[:2])  # Hydra's message and its advice, without the search path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for o in OverridesParser.create().parse_overrides(overrides):
        value = o.value()
        if o.is_delete() or not isinstance(value, str):
            continue
        group = o.key_or_group
        options = sorted(loader.get_group_options(group))
        if options and value not in options:
            close = difflib.get_close_matches(value, options, n=1)
            hint = f"; did you mean {group}={close[0]}?" if close else ""
            return f"unknown {group}={value}{hint} ({group} options: {', '.join(options)})"
    return f"configuration error: {why}"


class _Stop:
    """The sweep's stop: the first SIGTERM or Ctrl-C writes the stop file (every job heeds it) and, where the jobs
    run in this process, interrupts the running one; repeats (schedulers send more than one) are ignored."""

    def __init__(self, sweep_dir: Path, in_process: bool) -> None:
        self.file, self.in_process, self.signum = sweep_dir / STOP_FILE, in_process, None

    def stop(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
            write_json_atomic(self.file, {"signal": signal.Signals(signum).name})
            _log.warning("%s: the sweep stops; running jobs record interrupted, no other job starts",
                         signal.Signals(signum).name)  # fmt: skip

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            return
        self.stop(signum)
        if self.in_process:  # the running job (if any) records interrupted; the sweep's loop ends
            raise Terminated(f"terminated by signal {signal.Signals(signum).name}") if signum != signal.SIGINT else (
                KeyboardInterrupt())  # fmt: skip

    @contextmanager
    def handled(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            if self.signum is None:  # a stopped sweep keeps ignoring repeats while it sums up
                for s, handler in previous.items():
                    signal.signal(s, handler)


class SweepTask:
    """The task function as the sweep's jobs run it, wherever they run: a job of a stopped sweep does not start, and
    one that runs when the sweep is stopped gets the sweep's signal within half a second (its record: interrupted).

    Out of the sweep's process (a joblib worker, a submitit job) an interruption the sweep asked for ends the job
    with a result, so the launcher neither aborts the other workers nor kills them mid-record; SLURM's own notice
    of a time limit or a preemption (no stop file) still ends the job without one, as ``launch_slurm`` expects.
    """

    def __init__(self, task: Callable[[DictConfig], Any], sweep_dir: str | Path) -> None:
        self.task, self.stop_file, self.sweep_pid = task, Path(sweep_dir) / STOP_FILE, os.getpid()

    def __call__(self, cfg: DictConfig) -> Any:
        if self.stop_file.exists():
            return None  # the summary counts it as not run
        if os.getpid() == self.sweep_pid or threading.current_thread() is not threading.main_thread():
            return self.task(cfg)  # the sweep's own handler reaches it
        running, raised = [True], [False]

        def on_signal(signum: int, frame: Any) -> None:  # between the job's own handlers: raise once, while it runs
            if running[0] and not raised[0]:
                raised[0] = True
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise Terminated(f"terminated by signal {signal.Signals(signum).name}")

        previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
        done = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(done,), name="vpeft-sweep-stop", daemon=True)
        watcher.start()
        try:
            return self.task(cfg)
        except KeyboardInterrupt as e:
            if isinstance(e, Terminated) and not self.stop_file.exists():
                raise
            return None  # the job recorded it; the sweep is stopping
        finally:
            running[0] = False
            done.set()
            watcher.join()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _watch(self, done: threading.Event) -> None:
        while not done.wait(0.5):
            if self.stop_file.exists():
                try:
                    name = json.loads(self.stop_file.read_text())["signal"]
                except (OSError, ValueError, KeyError):
                    name = "SIGTERM"
                os.kill(os.getpid(), signal.Signals[name])
                return


# -- the summary ---------------------------------------------------------------------------------------------------


def summarize(sweep_dir: str | Path) -> dict[str, Any]:
    """Every job of a sweep folder, from its plan and the jobs' status files (any launcher, on a shared disk)."""
    sweep_dir = Path(sweep_dir)
    plan = _read_json(sweep_dir / PLAN_FILE)
    reported, unnumbered = {}, []
    for path in sorted(sweep_dir.glob(f"*/{STATUS_FILE.replace('.json', '*.json')}")):  # a pack's runs: one each
        job = _read_json(path)
        if job is not None:
            (unnumbered.append(job) if job.get("num") is None else reported.setdefault(job["num"], job))
    if plan is None:  # a folder from before the plan existed: its status files are all there is
        jobs = [*reported.values(), *unnumbered]
    else:
        jobs = [reported.get(j["num"]) or {"status": "not_run", "overrides": j["overrides"]} for j in plan["jobs"]]
        jobs += plan.get("bad_input", [])
    stopped = (_read_json(sweep_dir / STOP_FILE) or {}).get("signal")
    count = {s: sum(j["status"] == s for j in jobs) for s in ("ok", "failed", "interrupted", "bad_input", "not_run")}
    return {
        "jobs": len(jobs),
        **count,
        "skipped": sum(bool(j.get("skipped")) for j in jobs),
        "stopped": stopped,
        "finished": [j for j in jobs if j["status"] == "ok"],
        "failures": [j for j in jobs if j["status"] in ("failed", "interrupted")],
        "bad_input": [j for j in jobs if j["status"] == "bad_input"],
        "not_run": [j for j in jobs if j["status"] == "not_run"],
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class SweepSummary(Callback):
    """Sums the sweep up at its end and sets its exit status: 128 + the signal when it was stopped (143: SIGTERM,
    130: Ctrl-C); else 2 when any job had bad input (no record: fix the input and run the sweep again); else 1
    when any failed, was interrupted or did not run."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        mark_entered()  # from here on an exit 1 is the sweep's verdict, not a config error

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        s = summarize(config.hydra.sweep.dir)
        bad, not_run, stopped = s["bad_input"], s["not_run"], s["stopped"]
        _overrides = _swept([*s["finished"], *s["failures"], *bad, *not_run])
        print(
            f"sweep: {s['jobs']} runs: {s['ok']} ok ({s['skipped']} skipped as already finished), "
            f"{s['failed']} failed, {s['interrupted']} interrupted"
            + (f", {len(bad)} bad input (no record; fix the input and run the sweep again)" if bad else "")
            + (f", {len(not_run)} not run" if not_run else "")
            + (f" (stopped by {stopped})" if not_run and stopped else ""),
            flush=True,
        )
        if stopped:  # which runs are done and which are not, so that the rest can be run again
            for job in s["finished"]:
                print(f"  ok: {_overrides(job)}")
        for job in s["failures"]:
            record = f" ({job['record']})" if job.get("record") else ""
            print(f"  {job['status']}: {_overrides(job)}{record}: {(job.get('error') or '')[:200]}")
        by_error: dict[str, list[str]] = {}
        for job in bad:  # one error (no network, say) often stops many jobs: it is said once, with its jobs
            by_error.setdefault(job.get("error") or "", []).append(_overrides(job))
        for error, jobs in by_error.items():
            print(f"  bad input ({len(jobs)} {'run' if len(jobs) == 1 else 'runs'}): {error}")
            for overrides in jobs:
                print(f"    {overrides}")
        if not_run:
            why = f"stopped by {stopped} before they started" if stopped else "no status from their jobs"
            print(f"  not run ({why}; the same command runs them, finished runs are skipped):")
            for job in not_run:
                print(f"    {_overrides(job)}")
        sys.stdout.flush()
        if stopped:
            raise SystemExit(128 + signal.Signals[stopped])
        if bad or s["failures"] or not_run:
            raise SystemExit(2 if bad else 1)


def _swept(jobs: list[dict[str, Any]]) -> Callable[[dict[str, Any]], str]:
    """A job's overrides as the summary names it: those the sweep's jobs do not all share (``method=lora seed=1``)."""
    shared = set.intersection(*(set(j.get("overrides") or []) for j in jobs)) if len(jobs) > 1 else set()
    return lambda job: " ".join(o for o in job.get("overrides") or [] if o not in shared)


# -- SLURM ---------------------------------------------------------------------------------------------------------
# hydra-submitit-launcher as is asks `sacct` for job states, which many small clusters cannot answer
# (accounting disabled: a warning at every poll, and a job killed without a result is waited for
# forever), and it turns any job without a result (killed at its time limit, out of memory) into an
# exception that ends the whole sweep without its summary. launch_slurm keeps the plugin's
# submission and changes those two things; hydra_plugins/vpeft_slurm.py makes it a launcher (Hydra
# instantiates launchers only from the hydra_plugins package).

_INCOMPLETE = {
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING",
    "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "PREEMPTED", "READY", "UNKNOWN",
}  # fmt: skip
_INTERRUPTED = {"TIMEOUT", "PREEMPTED", "CANCELLED", "NODE_FAIL", "DEADLINE", "BOOT_FAIL"}


def _job_states_class() -> type:
    from submitit.slurm.slurm import SlurmInfoWatcher

    class JobStates(SlurmInfoWatcher):
        """submitit's poller of job states; from squeue once sacct fails (accounting disabled), said once."""

        def __init__(self, delay_s: int = 120) -> None:
            super().__init__(delay_s=delay_s)  # polls at 2, 4, 8 ... s after a submission, then every delay_s
            self.source = "sacct"
            self._said: set[str] = set()

        def _say(self, level: int, message: str) -> None:
            if message not in self._said:
                self._said.add(message)
                _log.log(level, message)

        def is_done(self, job_id: str, mode: str = "standard") -> bool:
            state = self.get_state(job_id, mode=mode).upper().split()
            return bool(state) and state[0] not in _INCOMPLETE

        def update(self) -> None:
            import subprocess
            import time

            waiting = self._registered - self._finished
            if not waiting:
                return
            self._num_calls += 1
            if self.source == "sacct":
                try:
                    out = subprocess.run(self._make_command(), capture_output=True, text=True, timeout=120)
                except (OSError, subprocess.SubprocessError) as e:
                    out = subprocess.CompletedProcess([], 1, "", str(e))
                if out.returncode == 0:
                    self._info_dict.update(self.read_info(out.stdout))
                else:
                    why = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
                    self._say(logging.INFO, f"sacct is not available ({why}): job states come from squeue")
                    self.source = "squeue"
                    self._delay_s = 15  # one squeue of this user's jobs is cheap; a killed job is noticed soon
            if self.source == "squeue":
                self._info_dict.update(self._from_squeue(waiting))
            self._last_status_check = time.time()
            for job_id in waiting:
                if self.is_done(job_id, mode="cache"):
                    self._finished.add(job_id)

        def _from_squeue(self, waiting: set[str]) -> dict[str, dict[str, str]]:
            """States of the jobs slurmctld still knows; a job it no longer lists has ended."""
            import getpass
            import subprocess

            cmd = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T", f"--user={getpass.getuser()}"]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
            except (OSError, subprocess.SubprocessError) as e:
                self._say(logging.WARNING, f"squeue failed ({e}); job states may lag")
                return {}
            listed = dict(line.split("|", 1) for line in out.split() if "|" in line)
            return {j: {"JobID": j, "State": listed.get(j, "ENDED")} for j in waiting}

    return JobStates


def launch_slurm(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
    """``hydra/launcher=slurm`` (hydra_plugins.vpeft_slurm): one job array per sweep, every job accounted for.

    Submission is the plugin's. A job that ends without a result (killed at its time limit,
    cancelled, out of memory) keeps the status file its run wrote (``interrupted`` on SIGTERM) or
    gets one saying how SLURM ended it, so the sweep's summary counts every run and the sweep exits
    1 instead of ending in a traceback. A job SLURM requeues (preemption, ``scontrol requeue``) is
    waited for under the same id.
    """
    import submitit
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, JobStatus, filter_overrides
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    assert launcher.config is not None and len(job_overrides) > 0
    params = dict(launcher.params)
    init = {"folder": params.pop("submitit_folder")}
    if "max_num_timeout" in params:
        init["slurm_max_num_timeout"] = params.pop("max_num_timeout")
    executor = submitit.AutoExecutor(cluster="slurm", **init)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in launcher.config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(launcher.config.hydra.sweep.mode), 8))
    _log.info("Submitit 'slurm' sweep output dir : %s", sweep_dir)
    args = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        _log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        args.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
    jobs = executor.map_array(launcher, *zip(*args))
    states = _job_states_class()()
    for job in jobs:
        job.watcher = states  # one poller for this array instead of submitit's shared sacct-only one
    returns = []
    for job, (overrides, _, idx, _, _) in zip(jobs, args):
        try:
            returns.append(job.results()[0])
            continue
        except submitit.core.utils.UncompletedJobError as e:
            state = job.watcher.get_state(job.job_id, mode="cache")
            why = str(e).strip().splitlines()[-1] if isinstance(e, submitit.core.utils.FailedJobError) else ""
        _status_without_result(launcher, overrides, idx, job, state, why)
        returns.append(JobReturn(overrides=overrides, status=JobStatus.COMPLETED))
    return returns


def _status_without_result(launcher: Any, overrides: list[str], idx: int, job: Any, state: str, why: str) -> None:
    """The job's status file, written here when its run could not write one (killed, crashed)."""
    from omegaconf import open_dict

    cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(cfg.hydra.job):
        cfg.hydra.job.num = idx
    path = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir) / STATUS_FILE
    log_file = job.paths.stdout
    # A job squeue lists no more and that never wrote its log never started: it was removed while
    # pending (scancel; slurmctld forgets a cancelled pending array task at once, or lists it as
    # CANCELLED for MinJobAge, depending on whether the task was split from its array yet). Either
    # way nothing in the run failed: it counts as interrupted, as a CANCELLED state does.
    never_started = state == "ENDED" and not Path(log_file).exists()
    if state == "ENDED":
        state = "ENDED, no longer listed by squeue" + (", never started: no log" if never_started else "")
    _log.error("SLURM job %s ended without a result (state %s): %s", job.job_id, state, why or f"see {log_file}")
    if path.exists():  # the run wrote its own (interrupted on SIGTERM): that one stands
        return
    word = (state.upper().split() or [""])[0]
    write_json_atomic(path, {
        "status": "interrupted" if word in _INTERRUPTED or never_started else "failed", "skipped": False, "num": idx,
        "record": None,
        "overrides": list(overrides),
        "error": f"SLURM job {job.job_id} ended ({state}) before its run recorded anything: {why or log_file}",
    })  # fmt: skip
