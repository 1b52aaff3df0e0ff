"""Sweeps on SLURM: ``hydra/launcher=slurm`` (hydra_plugins/vpeft_slurm.py) runs a sweep as one job array.

The VTAB-1k protocol's selection step (``select_hparams``, the hyperparameter files) is in ``vpeft.vtab``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vpeft.files import write_json_atomic
from vpeft.jobs.runner import STATUS_FILE

_log = logging.getLogger("vpeft.sweep")

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
        "status": "interrupted" if word in _INTERRUPTED or never_started else "failed", "skipped": False,
        "record": None,
        "overrides": list(overrides),
        "error": f"SLURM job {job.job_id} ended ({state}) before its run recorded anything: {why or log_file}",
    })  # fmt: skip
