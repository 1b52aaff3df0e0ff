"""The README's set-up: `make test` installs the system packages the tests need, or says how."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fake_bin(tmp_path: Path, uid: int, with_apt: bool = True) -> Path:
    """A PATH with only what the script may call: an `id` that reports ``uid``, an `apt-get` that records."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    if with_apt:
        (bin_ / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/apt.log\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    (bin_ / "sh").symlink_to(shutil.which("sh"))
    return bin_


def run_sysdeps(path: Path) -> subprocess.CompletedProcess:
    bash = shutil.which("bash")
    return subprocess.run([bash, str(ROOT / "scripts" / "sysdeps.sh")], env={"PATH": str(path)}, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_without_root_or_sudo_it_stops_with_the_exact_command(tmp_path):
    proc = run_sysdeps(_fake_bin(tmp_path, uid=1000))  # no chromium, no sudo on this PATH
    assert proc.returncode == 1
    assert "apt-get install -y -qq chromium" in proc.stderr and "make test again" in proc.stderr
    assert not (tmp_path / "apt.log").exists()


def test_as_root_it_installs_what_is_missing(tmp_path):
    proc = run_sysdeps(_fake_bin(tmp_path, uid=0))
    assert proc.returncode == 0, proc.stderr
    assert "install -y -qq chromium" in (tmp_path / "apt.log").read_text()


def test_without_apt_it_names_the_packages(tmp_path):
    proc = run_sysdeps(_fake_bin(tmp_path, uid=0, with_apt=False))
    assert proc.returncode == 1 and "chromium" in proc.stderr and "package manager" in proc.stderr


def test_make_test_runs_the_setup_and_ci_calls_make_test():
    make = (ROOT / "Makefile").read_text()
    assert "test: setup sysdeps" in make
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "make test" and not any("apt-get" in line for line in ci)
