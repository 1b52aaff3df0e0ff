"""scripts/gpu_check.py on a CPU: the bundle it packs, every step at tiny sizes, time caps and resuming."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def gpu_check(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


@pytest.mark.slow
def test_dry_run_packs_and_runs_every_step(real_cifar10, tmp_path):
    bundle, work, out = tmp_path / "bundle", tmp_path / "work", tmp_path / "out"
    proc = gpu_check("pack", "--out", str(bundle), "--data", str(real_cifar10), "--no-wheels")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in bundle.iterdir()) == ["cifar10.tar.gz", "dinov2_s14_224.fp16.safetensors"]
    with safe_open(str(bundle / "dinov2_s14_224.fp16.safetensors"), "pt") as f:
        assert f.get_tensor("pos_embed").shape == (1, 257, 384)  # 16x16 grid + class token: 224 px / 14
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}  # noqa: SIM118
    assert sum(p.stat().st_size for p in bundle.iterdir()) < 56 * 2**20  # leaves room in a 64 MiB carry

    proc = gpu_check("run", "--dry", "--bundle", str(bundle), "--work", str(work), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((out / "gpu_check_dry.json").read_text())
    steps = result["steps"]
    assert list(steps) == [
        "pytest_gpu", "launcher", "pack", "pack_parity", "accuracy", "step_eager", "final", "step_compiled", "peft",
        "latency", "profile", "sweep", "pytest_gpu_slow", "serve",
    ]  # fmt: skip
    # no GPU: the GPU tests are all skipped, and the check says so rather than calling them passed
    for name in ("pytest_gpu", "pytest_gpu_slow"):
        assert steps[name]["status"] == "skipped" and steps[name]["passed"] == 0 and steps[name]["skipped"] > 0
    assert all(s["status"] == "ok" for n, s in steps.items() if not n.startswith("pytest")), {
        n: s["status"] for n, s in steps.items()
    }
    # the task and the weights came from the bundle, unpacked into the work folder
    assert result["data"].startswith(str(work))
    for run in steps["accuracy"]["runs"].values():
        assert run["weights"].startswith("offline:") and str(work / "cache") in run["weights"]
        assert run["epochs"] == 1 and run["reference_top1"] > 60
    launcher = steps["launcher"]
    assert launcher["records_ok"] == 2 and launcher["rerun_skipped"] == 2 and launcher["records_unchanged_by_rerun"]
    assert {r["method"] for r in steps["step_eager"]["sections"]["step"]} >= {"(frozen backbone)", "lora", "ssf"}
    assert {r["method"] for r in steps["latency"]["sections"]["latency"]["rows"]} == {
        "lora", "ssf", "adapter_houlsby", "vpt_deep"
    }  # fmt: skip
    assert "Self CPU time total" in next(iter(steps["profile"]["sections"]["profile"].values()))["table"]
    assert [(r["jobs_per_gpu"], r["pack"]) for r in steps["sweep"]["runs"]] == [(1, 1), (4, 1), (1, 8)]
    assert steps["pack"]["runs"][0]["k"] == 8 and steps["pack"]["runs"][0]["failed"] == 0
    assert len(steps["pack_parity"]["gaps"]) == 3
    assert all(r["extrapolated"] and r["ok"] == r["runs"] for r in steps["sweep"]["runs"])
    assert {t["target"].split(" ")[0] for t in result["targets"]} >= {"linear", "lora", "merged"}
    md = (out / "gpu_check_dry.md").read_text()
    assert re.search(r"^\| accuracy +\| ok +\|", md, re.M) and "## Targets" in md

    # a second call reruns one step and keeps the others (--resume)
    proc = gpu_check("run", "--dry", "--steps", "peft", "--resume", "--bundle", str(bundle), "--work",
                     str(tmp_path / "work2"), "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    again = json.loads((out / "gpu_check_dry.json").read_text())
    assert list(again["steps"]) == list(steps) and again["steps"]["launcher"] == steps["launcher"]
    assert again["steps"]["peft"] != steps["peft"]  # measured anew
    assert [c["steps"] for c in again["calls"]] == [[*steps], ["peft"]]


def test_a_capped_step_is_stopped_and_the_next_one_runs(tmp_path):
    """Each step has its own cap: a step past it is killed with what it started, the others still run."""
    proc = gpu_check("run", "--dry", "--steps", "step_eager", "pytest_gpu", "--cap-scale", "0.001", "--work",
                     str(tmp_path / "w"), "--out", str(tmp_path / "out"), timeout=300)  # fmt: skip
    assert proc.returncode == 1  # a step timed out
    steps = json.loads((tmp_path / "out" / "gpu_check_dry.json").read_text())["steps"]
    assert steps["step_eager"]["status"] == "timeout" and steps["pytest_gpu"]["status"] == "timeout"
    assert "killed at its cap" in proc.stdout


def test_bench_train_keeps_what_it_measured_on_sigterm(tmp_path):
    """A real SIGTERM mid-section: the rows measured so far are written, with the section marked stopped."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--quick", "--sections", "latency",
           "--methods", "lora", "ssf", "adapter_houlsby", "vpt_deep", "prefix", "ia3", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 240
    for line in proc.stdout:  # wait for the first measured row
        if "method=lora" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, rest
    (path,) = out.glob("train_*.json")
    lat = json.loads(path.read_text())["sections"]["latency"]
    assert lat["error"].startswith("Stopped") and lat["rows"][0]["method"] == "lora"
    assert len({r["method"] for r in lat["rows"]}) < 6
    assert re.search(r"^\| lora +\|", path.with_suffix(".md").read_text(), re.M)  # its row in the Markdown table


def test_pack_and_run_reject_a_folder_that_is_not_a_task(tmp_path):
    proc = gpu_check("pack", "--out", str(tmp_path / "b"), "--data", str(tmp_path), "--no-wheels")
    assert proc.returncode == 2 and "not a VTAB-1k task folder" in proc.stderr
    proc = gpu_check("run", "--dry", "--data", str(tmp_path), "--work", str(tmp_path / "w"))
    assert proc.returncode == 2 and "no VTAB-1k task" in proc.stderr
    assert not (tmp_path / "b" / "cifar10.tar.gz").exists()


def test_without_a_gpu_the_real_check_says_so(tmp_path):
    proc = gpu_check("run", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "no CUDA GPU here" in proc.stderr and "gpu-check-dry" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_makefile_targets_call_the_script():
    make = (ROOT / "Makefile").read_text()
    assert "scripts/gpu_check.py run --dry" in make and "scripts/gpu_check.py pack" in make
    assert Path(ROOT / ".gitignore").read_text().count("/.gpu-check/") == 1
