"""A throwaway single-node SLURM cluster: munged, slurmctld and slurmd with everything in one folder.

Debian's slurmctld, slurmd, munge and slurm-client packages (scripts/sysdeps.sh installs them) and
root (or sudo without a password) are what it needs; ``why_not()`` says what is missing. No systemd:
the daemons are started directly with their own config, key, socket, ports, state and logs under
the folder, found by the clients through ``SLURM_CONF``; ``stop()`` ends each one by its pid and
leaves nothing running. Accounting is off (no slurmdbd), as on many small clusters.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "srun")
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def _which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def why_not() -> str | None:
    """Why a cluster cannot start on this machine (None when it can)."""
    missing = [n for n in (*DAEMONS, *CLIENTS) if _which(n) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing): run scripts/sysdeps.sh as root"
    if os.geteuid() != 0:
        return "the SLURM daemons need root (run the tests as root)"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Cluster:
    """One node (``cpus`` slots, as many jobs at once), one partition ``debug``, accounting disabled."""

    def __init__(self, root: Path, cpus: int = 4, kill_wait: int = 10):
        self.root = Path(root)
        self.cpus = cpus
        self.kill_wait = kill_wait
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}

    # -- start / stop -------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> Cluster:
        r = self.root
        for d in ("state", "spool", "log", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r, 0o755)
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        sock = r / "run" / "munge.sock"
        self._spawn("munged", [_which("munged"), "--foreground", f"--socket={sock}", f"--key-file={key}",
                               f"--pid-file={r / 'run' / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
                               f"--seed-file={r / 'run' / 'munged.seed'}", "--force", "--num-threads=2"])  # fmt: skip
        self._wait_for(sock, timeout)
        ctld_port, d_port = _free_ports(2)
        self.conf.write_text(self._config(sock, ctld_port, d_port))
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        self._wait_for(r / "run" / "slurmctld.pid", timeout)
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf)])
        deadline = time.monotonic() + timeout
        while True:
            out = self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
            if out in ("idle", "mix", "alloc"):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the SLURM node did not come up (state {out!r}); logs in {r / 'log'}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel every job, then end the daemons by pid (SIGTERM, SIGKILL after 15 s)."""
        if "slurmctld" in self.procs:
            self.run("scancel", "--full", "--user", "root", check=False)  # before slurmd goes: jobs end
            time.sleep(1)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        for pid in self._stepds():  # a job's slurmstepd outliving slurmd
            os.kill(pid, signal.SIGKILL)

    def _stepds(self) -> list[int]:
        """slurmstepd processes of this cluster (their environment names its config)."""
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if (proc / "comm").read_text().strip() != "slurmstepd":
                    continue
                if str(self.root).encode() in (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
        return found

    # -- clients ------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60, check=check)

    def jobs(self) -> dict[str, str]:
        """Job (array task) id -> state, for every job slurmctld still knows (finished ones for MinJobAge)."""
        out = self.run("squeue", "-h", "-r", "-t", "all", "-o", "%i|%T").stdout
        return dict(line.split("|", 1) for line in out.split())

    def _config(self, munge_sock: Path, ctld_port: int, d_port: int) -> str:
        r = self.root
        return f"""\
ClusterName=vpeft-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_sock}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "run" / "slurmctld.pid"}
SlurmdPidFile={r / "run" / "slurmd.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
LaunchParameters=use_interactive_step
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait={self.kill_wait}
MinJobAge=600
MessageTimeout=20
InactiveLimit=0
RebootProgram=/bin/true
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 - the daemon's, closed with it
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        log.close()

    def _wait_for(self, path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{', '.join(dead) or path.name} did not start; logs in {self.root / 'log'}")
            time.sleep(0.1)
