"""`python run.py ...` end to end on CPU: records, deltas, failures and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from data_helpers import write_noah as write_task
from PIL import Image

import vpeft
from vpeft.results import read_record, validate

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = ROOT.parent / "shared" / "data" / "vtab-1k" / "cifar10"
QUICK = ["backbone=vit_tiny_random", "trainer.epochs=1", "trainer.warmup_epochs=0", "bench.latency=false"]


def run_cli(tmp: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [
        sys.executable,
        str(ROOT / "run.py"),
        f"paths.results={tmp / 'runs'}",
        f"paths.cache={tmp / 'cache'}",
        f"hydra.run.dir={tmp / 'hydra'}",
        *overrides,
    ]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf"), **(env or {})}
    return subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)


def run_inproc(tmp: Path, *overrides: str) -> dict | None:
    """The same run without a new interpreter: compose the config and call vpeft.run.main."""
    from hydra import compose, initialize_config_dir

    import vpeft.run

    paths = [f"paths.results={tmp / 'runs'}", f"paths.cache={tmp / 'cache'}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", [*paths, *overrides])
    return vpeft.run.main(cfg)


def records(tmp: Path) -> list[Path]:
    return sorted((tmp / "runs").rglob("*.json"))


def shared_cifar10() -> Path:
    assert SHARED_CIFAR10.is_dir(), f"the shared VTAB-1k cifar10 task is expected at {SHARED_CIFAR10}"
    return SHARED_CIFAR10


def odd_images(n: int, seed: int = 0) -> list[tuple[Image.Image, int]]:
    """Grayscale, RGBA, palette and RGB images of odd sizes with 3 classes."""
    g = torch.Generator().manual_seed(seed)
    modes = ["L", "RGBA", "P", "RGB"]
    out = []
    for i in range(n):
        w, h = 13 + 7 * (i % 5), 9 + 11 * (i % 3)
        arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        img = Image.fromarray(arr, "RGB")
        mode = modes[i % 4]
        img = img.convert(mode) if mode != "P" else img.convert("P", palette=Image.Palette.ADAPTIVE)
        out.append((img, i % 3))
    return out


def test_cifar10_end_to_end_writes_a_valid_record(tmp_path):
    res = run_cli(tmp_path, *QUICK, "dataset=folder", f"dataset.root={shared_cifar10()}", "protocol=tune", "seed=3")
    assert res.returncode == 0, res.stderr[-3000:]
    [path] = records(tmp_path)
    record = read_record(path)  # schema checked
    assert record["status"] == "ok" and record["error"] is None
    assert record["dataset"] == "cifar10" and record["method"] == "lora" and record["seed"] == 3
    assert record["protocol"] == "tune" and record["metrics"]["eval_split"] == "val200"
    assert record["data"]["n_train"] == 800 and record["data"]["n_eval"] == 200
    assert record["data_source"].startswith("folder:")
    assert 0 <= record["metrics"]["top1"] <= 100
    assert record["method_config"] == {"r": 8, "alpha": 8.0, "dropout": 0.0, "targets": ["q", "v"]}
    for part in ("cifar10", "lora", "seed3"):
        assert part in str(path)
    assert record["env"]["torch"] == torch.__version__ and "git_sha" in record["env"]
    assert record["config"]["trainer"]["epochs"] == 1 and "trainer.epochs=1" in record["overrides"]
    assert record["cost"]["train_images_per_s"] > 0 and record["cost"]["peak_mem_kind"] == "cpu_peak_rss"
    # the delta beside the record reproduces the trained model's parameter count
    delta = path.with_suffix(".safetensors")
    tensors, info = vpeft.read_delta(delta)
    assert info["method"] == "lora"
    assert sum(t.numel() for t in tensors.values()) == record["params"]["trainable"]
    assert record["params"]["trainable_excl_head"] == 12 * 2 * 8 * (192 + 192)  # vit_tiny: 12 blocks, d=192


def test_rerun_skips_a_finished_run(tmp_path, capsys):
    args = [*QUICK, "dataset=digits", "protocol=tune", "method=bitfit"]
    first = run_inproc(tmp_path, *args)
    assert first["status"] == "ok"
    [path] = records(tmp_path)
    before = path.read_text()
    run_inproc(tmp_path, *args)
    assert "skipped (finished)" in capsys.readouterr().out
    assert path.read_text() == before
    run_inproc(tmp_path, *args, "optim.lr=0.002")  # another config: another record
    assert len(records(tmp_path)) == 2


def test_a_finished_run_without_its_delta_file_trains_again(tmp_path, capsys):
    """With save_delta=true a record whose delta file is gone is not finished: the rerun writes both again."""
    args = [*QUICK, "dataset=digits", "protocol=tune", "method=bitfit"]
    assert run_inproc(tmp_path, *args)["status"] == "ok"
    [path] = records(tmp_path)
    delta = path.with_suffix(".safetensors")
    expected = vpeft.read_delta(delta)[0]
    delta.unlink()
    capsys.readouterr()
    again = run_inproc(tmp_path, *args)
    assert f"rerun (finished, but its delta file {delta.name} is missing (save_delta=true))" in capsys.readouterr().out
    assert again["status"] == "ok" and delta.is_file() and read_record(path)["delta_file"] == delta.name
    tensors = vpeft.read_delta(delta)[0]
    assert tensors.keys() == expected.keys()
    run_inproc(tmp_path, *args)  # now finished
    assert "skipped (finished)" in capsys.readouterr().out
    delta.unlink()
    run_inproc(tmp_path, *args, "save_delta=false")  # without save_delta the record alone is the result
    assert "skipped (finished)" in capsys.readouterr().out and not delta.exists()


def test_odd_images_end_to_end(tmp_path):
    task = write_task(
        tmp_path / "odd",
        {
            "train800": odd_images(12),
            "val200": odd_images(6, 1),
            "train800val200": odd_images(18, 2),
            "test": odd_images(9, 3),
        },
        classes=["a", "b", "c"],
    )
    assert run_inproc(tmp_path, *QUICK, "method=vpt_deep", "dataset=folder", f"dataset.root={task}")["status"] == "ok"
    [path] = records(tmp_path)
    record = read_record(path)
    assert record["dataset"] == "odd" and record["data"]["num_classes"] == 3 and record["data"]["n_eval"] == 9


def test_diverged_run_is_recorded_failed(tmp_path):
    with pytest.raises(SystemExit) as e:
        run_inproc(tmp_path, *QUICK, "dataset=digits", "protocol=tune", "optim.lr=1e30")
    assert e.value.code == 1
    [path] = records(tmp_path)
    record = read_record(path)
    assert record["status"] == "failed" and "diverged" in record["error"]
    assert record["metrics"]["top1"] is None


def _bad_tasks(root: Path) -> dict[str, tuple[Path, str]]:
    ok = odd_images(4)
    corrupt = write_task(root / "corrupt", {s: ok for s in ("train800", "val200", "train800val200", "test")})
    (corrupt / "images" / "train800" / "000001.png").write_bytes(b"not an image")
    missing = write_task(root / "missing", {s: ok for s in ("train800", "val200", "train800val200", "test")})
    (missing / "images" / "train800" / "000002.png").unlink()
    labels = write_task(root / "labels", {s: ok for s in ("train800", "val200", "train800val200", "test")}, ["a", "b"])
    empty = write_task(root / "empty", {s: ok for s in ("train800", "val200", "train800val200", "test")})
    (empty / "train800.txt").write_text("")
    return {
        "no folder": (root / "nowhere", "train800.txt"),
        "corrupt image": (corrupt, "000001.png"),
        "missing image": (missing, "000002.png"),
        "label out of range": (labels, "label"),
        "empty split": (empty, "train800"),
    }


@pytest.mark.parametrize("case", ["no folder", "corrupt image", "missing image", "label out of range", "empty split"])
def test_bad_data_exits_nonzero_without_record(case, tmp_path, capsys):
    root, needle = _bad_tasks(tmp_path / "tasks")[case]
    with pytest.raises(SystemExit) as e:
        run_inproc(tmp_path, *QUICK, "dataset=folder", f"dataset.root={root}", "protocol=tune")
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert records(tmp_path) == []


def test_bad_data_from_the_command_line(tmp_path):
    res = run_cli(tmp_path, *QUICK, "dataset=folder", f"dataset.root={tmp_path / 'nowhere'}")
    assert res.returncode == 2
    assert "train800.txt" in res.stderr and "Traceback" not in res.stderr
    assert records(tmp_path) == []


def test_composition_errors_from_the_command_line(tmp_path):
    res = run_cli(tmp_path, *QUICK, "method=loraa")
    assert res.returncode == 2  # bad input, like every other
    for needle in ("loraa", "vpt_deep", "adaptformer"):
        assert needle in res.stderr
    assert records(tmp_path) == []


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["dataset=folder"], "dataset.root must be set"),
        (["method.r=0"], "positive integer"),
        (["protocol=both"], "protocol must be one of tune, final"),
        (["trainer.batch_size=0"], "trainer.batch_size must be a positive integer"),
    ],
)
def test_bad_config_exits_nonzero_without_record(overrides, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_inproc(tmp_path, *QUICK, *overrides)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert records(tmp_path) == []


def test_no_network_names_both_ways_out(tmp_path):
    res = run_cli(tmp_path, "trainer.epochs=1", "trainer.warmup_epochs=0", "backbone=vit_b16_in21k", "dataset=digits")
    assert res.returncode == 2
    assert "backbone.checkpoint" in res.stderr and "dinov2_s14_offline" in res.stderr
    assert "Traceback" not in res.stderr
    assert records(tmp_path) == []


def test_interrupt_is_recorded(tmp_path, monkeypatch):
    import vpeft.jobs.train as run_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_inproc(tmp_path, *QUICK, "dataset=digits")
    [path] = records(tmp_path)
    record = validate(json.loads(path.read_text()))
    assert record["status"] == "interrupted"


@pytest.mark.slow
def test_wandb_logger_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "wandb").mkdir()
    record = run_inproc(tmp_path, *QUICK, "trainer.epochs=2", "dataset=digits", "protocol=tune", "logger=wandb")
    assert record["status"] == "ok"
    [run_dir] = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    [log] = list(run_dir.glob("*.wandb"))  # the offline run's history, to `wandb sync` later
    keys = (b"train_loss", b"images_per_s", b"metrics/top1", b"params/trainable", b"cost/train_seconds")
    deadline = time.monotonic() + 60  # wandb's service process writes the file after finish(), later when busy
    while not all(k in log.read_bytes() for k in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
    data = log.read_bytes()
    for key in keys:
        assert key in data, key


def test_record_carries_costs_and_bench_only_measures_without_training(tmp_path, capsys):
    record = run_inproc(
        tmp_path,
        "backbone=vit_tiny_random",
        "trainer.epochs=1",
        "trainer.warmup_epochs=0",
        "dataset=digits",
        "protocol=tune",
        "bench.iters=2",
        "bench.warmup=1",
        "bench.batches=[1,4]",
    )
    cost = record["cost"]
    assert cost["delta_bytes"] > record["params"]["trainable"] * 4  # the file: tensors plus a header
    assert cost["flops"]["ratio"] > 1.0  # LoRA adds its low-rank products to the bare backbone's FLOPs
    assert cost["latency"]["iters"] == 2 and cost["latency_overhead"] > 0
    variants = {(s["variant"], s["batch"]) for s in cost["latency"]["results"]}
    assert variants == {(v, b) for v in ("bare", "unmerged", "merged") for b in (1, 4)}

    bench = run_inproc(
        tmp_path,
        "backbone=vit_tiny_random",
        "method=adaptformer",
        "bench.only=true",
        f"paths.bench={tmp_path / 'bench'}",
        "bench.iters=2",
        "bench.warmup=1",
        "bench.train_steps=1",
    )
    assert records(tmp_path) == [next((tmp_path / "runs").rglob("*.json"))]  # no new run record
    assert bench["kind"] == "bench" and bench["method"] == "adaptformer" and not bench["mergeable"]
    assert {s["variant"] for s in bench["latency"]["results"]} == {"bare", "unmerged"}
    assert bench["training"]["images_per_s"] > 0
    assert "bench record:" in capsys.readouterr().out
