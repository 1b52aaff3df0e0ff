"""What a measurement ran on: device, versions, code revision."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

from vpeft.errors import ConfigError
from vpeft.version import __version__


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error that says so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no CUDA GPU; use device=auto or device=cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def git_state(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The commit and whether tracked files other than the committed results (``results/``, which runs may be
    writing into) differ from it; None outside a git checkout."""
    cwd = Path(path or Path(__file__).resolve().parent)

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if sha is None:
        return {"git_sha": None, "git_dirty": None}
    top = git("rev-parse", "--show-toplevel")
    changed = git("status", "--porcelain", "--untracked-files=no", "--", top or ".", f":(exclude){top or '.'}/results")
    return {"git_sha": sha, "git_dirty": bool(changed)}


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """Everything a record needs to say where its numbers came from."""
    import timm

    device = device or torch.device("cpu")
    env: dict[str, Any] = {
        "device": device.type,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "vpeft": __version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
    }
    env.update(git_state())
    return env


_claimed: tuple[torch.device, Any] | None = None


def claim_gpu(jobs_per_gpu: int = 1, lock_dir: str | os.PathLike | None = None) -> torch.device:
    """Pick a GPU slot no other job on this machine holds (a file lock held for the process's life).

    With Hydra's joblib launcher running n_jobs = GPUs x jobs_per_gpu workers, every worker lands on
    its own slot, so small runs share a GPU ``jobs_per_gpu`` at a time and no GPU is oversubscribed.
    """
    global _claimed
    if _claimed is not None:
        return _claimed[0]
    import fcntl

    n = torch.cuda.device_count()
    if n == 0:
        return torch.device("cpu")
    folder = Path(lock_dir or os.environ.get("VPEFT_LOCK_DIR", f"/tmp/vpeft-gpu-locks-{os.getuid()}"))
    folder.mkdir(parents=True, exist_ok=True)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all").replace(",", "_")
    for slot in range(n * max(1, jobs_per_gpu)):
        gpu = slot % n
        f = open(folder / f"{visible}-gpu{gpu}-slot{slot // n}.lock", "w")  # noqa: SIM115 - held open on purpose
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        _claimed = (torch.device("cuda", gpu), f)
        return _claimed[0]
    raise RuntimeError(
        f"all {n * jobs_per_gpu} GPU slots on this machine are taken; lower hydra.launcher.n_jobs or raise jobs_per_gpu"
    )
