"""Data that is not what its name says, that changed under a finished run, or that a stop must not wait for:
real files, real processes and real signals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import REAL_CIFAR10, index_of, small_task, solid, write_imagefolder, write_noah
from PIL import Image
from test_run import QUICK, ROOT, records, run_cli

from vpeft.data import DIGEST_VERSION, data_digest, load_task
from vpeft.data import decode as decode_module
from vpeft.data.base import array_items
from vpeft.data.cache import CacheWarning
from vpeft.data.torchvision_tasks import TASKS as TORCHVISION_TASKS
from vpeft.errors import DataError
from vpeft.results import read_record
from vpeft.vtab import NUM_CLASSES, TASKS

VTAB_SIZES = {"train800": 800, "val200": 200, "train800val200": 1000}


def no_decoding(*args, **kwargs):
    raise AssertionError("decoded although the cache holds the split")


# ---- 1. a task name is a promise: its classes and its VTAB-1k splits --------------------------------------------


def test_every_vtab_task_has_its_class_count_and_torchvision_agrees():
    assert set(NUM_CLASSES) == set(TASKS)
    for name, spec in TORCHVISION_TASKS.items():
        if name in NUM_CLASSES and name != "caltech101":  # torchvision drops BACKGROUND_Google (its note says so)
            assert spec.num_classes == NUM_CLASSES[name], name
    assert TORCHVISION_TASKS["caltech101"].num_classes == NUM_CLASSES["caltech101"] - 1


@pytest.mark.slow
def test_a_ten_class_folder_under_cifar100s_name_exits_2_before_the_backbone(tmp_path):
    assert REAL_CIFAR10.is_dir(), f"the real VTAB-1k cifar10 task is expected at {REAL_CIFAR10}"
    # ViT-B/16 IN-21k cannot be fetched offline: an error about the data proves the check came first
    res = run_cli(
        tmp_path, "backbone=vit_b16_in21k", "dataset=cifar100", f"dataset.root={REAL_CIFAR10}", "protocol=tune"
    )
    assert res.returncode == 2, res.stderr[-3000:]
    err = res.stderr
    assert "cifar100" in err and "100 classes" in err and "has 10 classes" in err and "classes.txt lists 10" in err
    assert f"use dataset=folder dataset.root={REAL_CIFAR10.resolve()}" in err
    assert "Traceback" not in err and records(tmp_path) == []
    # the same folder as a task of its own loads
    assert load_task("folder", "tune", (4, 4), root=REAL_CIFAR10, num_workers=2).num_classes == 10


def test_vtab_task_folders_are_checked_for_classes_labels_and_split_sizes(tmp_path):
    vtab = tmp_path / "vtab"
    small_task(vtab / "svhn", n={**VTAB_SIZES, "test": 30}, num_classes=10)  # svhn: 10 classes, a valid folder
    task = load_task("svhn", "tune", (4, 4), vtab_root=vtab, download=False)
    assert task.num_classes == 10 and len(task.train) == 800 and len(task.eval) == 200

    def refused(name: str) -> str:
        with pytest.raises(DataError) as err:
            load_task(name, "final", (4, 4), vtab_root=vtab, download=False)
        msg = str(err.value)
        assert msg.startswith(f"{name}: ") and f"dataset=folder dataset.root={(vtab / name).resolve()}" in msg
        return msg

    # ten classes under a 100-class name, no classes.txt: found from the labels
    shutil.copytree(vtab / "svhn", vtab / "cifar100")
    (vtab / "cifar100" / "classes.txt").unlink()
    assert "has 10 classes (its largest label is 9; no classes.txt)" in refused("cifar100")
    # a label beyond the task's classes, with a classes.txt of the right length
    shutil.copytree(vtab / "svhn", vtab / "eurosat")
    test_list = vtab / "eurosat" / "test.txt"
    lines = test_list.read_text().splitlines()
    lines[4] = lines[4].rsplit(maxsplit=1)[0] + " 12"
    test_list.write_text("\n".join(lines) + "\n")
    msg = refused("eurosat")
    assert f"label 12 outside [0, 10) at {test_list} line 5" in msg and "13 classes" not in msg
    # VTAB-1k's split sizes: 800 / 200 / 1000, and a test split of its own (any size)
    small_task(vtab / "kitti", n={"train800": 801, "val200": 200, "train800val200": 1000, "test": 3}, num_classes=4)
    assert "it has train800.txt lists 801 images, not 800." in refused("kitti")


# ---- 2. a finished record whose data changed runs again ---------------------------------------------------------


def _relabel(list_file: Path, shift: int, num_classes: int) -> None:
    out = []
    for line in list_file.read_text().splitlines():
        path, label = line.rsplit(maxsplit=1)
        out.append(f"{path} {(int(label) + shift) % num_classes}")
    list_file.write_text("\n".join(out) + "\n")


@pytest.mark.slow
def test_a_finished_run_whose_data_changed_trains_again(tmp_path):
    task = small_task(tmp_path / "task", n={"train800": 12, "val200": 6, "train800val200": 18, "test": 30})
    args = [
        *QUICK,
        "bench.flops=false",
        "dataset=folder",
        f"dataset.root={task}",
        "protocol=final",
        "trainer.progress=false",
    ]
    first = run_cli(tmp_path, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    [path] = records(tmp_path)
    before = read_record(path)
    assert before["data"]["digest"] == data_digest("folder", "final", root=task)

    same = run_cli(tmp_path, *args)  # nothing changed: skipped
    assert same.returncode == 0 and "skipped (finished)" in same.stdout, same.stdout + same.stderr[-2000:]
    assert read_record(path)["finished_at"] == before["finished_at"]

    _relabel(task / "test.txt", 1, 3)  # the test split relabelled: the old top-1 is stale
    again = run_cli(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"rerun (finished, but its data changed since: digest {before['data']['digest'][:12]}" in again.stdout
    after = read_record(path)
    assert after["data"]["digest"] == data_digest("folder", "final", root=task) != before["data"]["digest"]
    # its top-1 is the relabelled split's: the same run in a fresh results folder gives the same number
    truth = run_cli(tmp_path / "fresh", *args)
    assert truth.returncode == 0, truth.stderr[-3000:]
    [fresh] = records(tmp_path / "fresh")
    assert after["metrics"]["top1"] == read_record(fresh)["metrics"]["top1"]
    assert after["started_at"] != before["started_at"] or after["finished_at"] != before["finished_at"]


def test_a_record_without_a_digest_is_not_rerun_and_the_digest_survives_a_copy(tmp_path):
    from test_run import run_inproc

    from vpeft.jobs.train import TrainJob, plan_run

    task = small_task(tmp_path / "task")
    record = run_inproc(tmp_path, *QUICK, "dataset=folder", f"dataset.root={task}", "protocol=tune")
    assert record["status"] == "ok" and record["data"]["digest"]
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", [f"paths.results={tmp_path / 'runs'}", f"paths.cache={tmp_path / 'cache'}", *QUICK,
                                 "dataset=folder", f"dataset.root={task}", "protocol=tune"])  # fmt: skip
    plan, job = plan_run(cfg), TrainJob()
    assert job.lacks(record, plan) is None
    _relabel(task / "val200.txt", 1, 3)
    assert job.lacks(record, plan).startswith("its data changed since")
    old = {**record, "data": {k: v for k, v in record["data"].items() if k != "digest"}}
    assert job.lacks(old, plan) is None  # records written before digests (the committed ones) stay
    assert record["data"]["digest_version"] == DIGEST_VERSION
    first_form = {**record, "data": {k: v for k, v in record["data"].items() if k != "digest_version"}}
    assert job.lacks(first_form, plan) is None  # a digest of the earlier (stat) form cannot be compared: kept
    # any copy elsewhere has the same digest, its mtimes kept or not (cp, a fresh download, a re-extracted archive)
    for copy_function in (shutil.copy2, shutil.copyfile):
        copy = shutil.copytree(task, tmp_path / copy_function.__name__, copy_function=copy_function)
        assert data_digest("folder", "tune", root=copy) == data_digest("folder", "tune", root=task)
        assert data_digest("folder", "tune", root=copy) != record["data"]["digest"]  # (relabelled above)


def test_the_records_digest_follows_the_images_bytes_not_their_mtimes(tmp_path, monkeypatch):
    task = small_task(tmp_path / "task")
    memo = tmp_path / "cache"
    digest = data_digest("folder", "tune", root=task, cache_dir=memo)
    assert data_digest("folder", "tune", root=task) == digest  # the memo only remembers it
    read = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, name: read.append(f.name) or real(f, name))
    assert data_digest("folder", "tune", root=task, cache_dir=memo) == digest and read == []  # stat calls only
    image = task / "images" / "train800" / "000003.png"
    before = image.stat()
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # touched: the bytes are read again
    assert data_digest("folder", "tune", root=task, cache_dir=memo) == digest and str(image) in read
    pixels = Image.open(image).convert("RGB")
    pixels.putpixel((0, 0), tuple(255 - c for c in pixels.getpixel((0, 0))))
    pixels.save(image)  # another image, its mtime put back: the digest changes (with the memo too)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    changed = data_digest("folder", "tune", root=task, cache_dir=memo)
    assert changed != digest and changed == data_digest("folder", "tune", root=task)
    for remembered in (memo / "digests").iterdir():  # a memo file that is not a digest is not believed
        remembered.write_text("garbage")
    assert data_digest("folder", "tune", root=task, cache_dir=memo) == changed


def test_an_imagefolders_digest_survives_a_copy_without_its_mtimes(tmp_path):
    write_imagefolder(tmp_path / "data", {"a": (6, 2), "b": (6, 2)})
    kw = dict(n_train=4, n_val=2)
    digest = data_digest("imagefolder", "tune", root=tmp_path / "data", cache_dir=tmp_path / "cache", **kw)
    copy = shutil.copytree(tmp_path / "data", tmp_path / "copy", copy_function=shutil.copyfile)
    assert data_digest("imagefolder", "tune", root=copy, cache_dir=tmp_path / "cache", **kw) == digest
    solid(77).save(sorted((copy / "test" / "a").iterdir())[0])  # the final protocol evaluates on every test image
    assert data_digest("imagefolder", "final", root=copy, **kw) != data_digest(
        "imagefolder", "final", root=tmp_path / "data", **kw
    )


# ---- 3. an image rewritten in place with its size and mtime kept ------------------------------------------------


@pytest.mark.parametrize("how", ["in_place", "replaced"])
def test_an_image_rewritten_with_its_size_and_mtime_kept_is_decoded_again(tmp_path, monkeypatch, how):
    splits = {s: [(solid(1000 * k + i), i % 3) for i in range(6)] for k, s in enumerate(("train800", "val200"))}
    root = write_noah(tmp_path / "t", splits, ext="bmp")  # BMP: the size on disk follows the image's size alone
    kw = dict(root=root, cache_dir=tmp_path / "cache", interpolation="nearest")
    assert index_of(load_task("folder", "tune", (4, 5), **kw).train.images).tolist() == list(range(6))
    image = root / "images" / "train800" / "000003.bmp"
    before = image.stat()
    if how == "in_place":  # cp -p over it: same inode
        solid(500).save(image)
    else:  # rsync -a, tar -x: a new file renamed over it
        solid(500).save(root / "new.bmp")
        os.replace(root / "new.bmp", image)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    now = image.stat()
    assert (now.st_size, now.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    again = load_task("folder", "tune", (4, 5), **kw)
    assert not again.cache_hit and index_of(again.train.images).tolist() == [0, 1, 2, 500, 4, 5]
    monkeypatch.setattr(decode_module, "decode_images", no_decoding)  # and unchanged files are served from the cache
    assert load_task("folder", "tune", (4, 5), **kw).cache_hit


# ---- 4. the cache's metadata is covered by its checksum ---------------------------------------------------------


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8 : 8 + n])


def test_a_tampered_num_classes_in_the_cache_header_is_caught(tmp_path):
    root = small_task(tmp_path / "t")  # 3 classes
    kw = dict(root=root, cache_dir=tmp_path / "cache")
    first = load_task("folder", "tune", (4, 4), **kw)
    (train_file,) = (tmp_path / "cache").glob("folder-train800-*.safetensors")
    raw = train_file.read_bytes()
    assert raw.count(b'"num_classes":"3"') == 1
    train_file.write_bytes(raw.replace(b'"num_classes":"3"', b'"num_classes":"7"'))  # same length: a valid file
    assert _header(train_file)[1]["__metadata__"]["num_classes"] == "7"
    with pytest.warns(CacheWarning, match=f"{train_file}.*checksum"):
        again = load_task("folder", "tune", (4, 4), **kw)
    assert again.num_classes == 3 and not again.cache_hit
    assert torch.equal(again.train.images, first.train.images)
    assert load_task("folder", "tune", (4, 4), **kw).cache_hit  # the rebuilt file reads back


def test_a_cache_file_with_the_old_checksum_is_rebuilt_quietly(tmp_path, recwarn):
    from safetensors import safe_open
    from safetensors.torch import save_file

    root = small_task(tmp_path / "t")
    kw = dict(root=root, cache_dir=tmp_path / "cache")
    first = load_task("folder", "tune", (4, 4), **kw)
    (train_file,) = (tmp_path / "cache").glob("folder-train800-*.safetensors")
    with safe_open(str(train_file), framework="pt") as f:
        meta, images, labels = f.metadata(), f.get_tensor("images"), f.get_tensor("labels")
    crc = zlib.crc32(images.numpy(), zlib.crc32(labels.numpy()))  # the old checksum: the tensors only
    save_file({"images": images, "labels": labels}, str(train_file), metadata={**meta, "checksum": f"crc32:{crc:08x}"})
    again = load_task("folder", "tune", (4, 4), **kw)
    assert not again.cache_hit and again.num_classes == 3 and torch.equal(again.train.images, first.train.images)
    assert not [w for w in recwarn if issubclass(w.category, CacheWarning)]
    assert not _header(train_file)[1]["__metadata__"]["checksum"].startswith("crc32:")
    assert load_task("folder", "tune", (4, 4), **kw).cache_hit


# ---- 5. float images in [0, 1] ----------------------------------------------------------------------------------


def test_a_float_tiff_in_0_1_is_scaled_not_clipped_to_black(tmp_path):
    values = np.linspace(0.0, 1.0, 6 * 7, dtype=np.float32).reshape(6, 7)
    values[0, 0], values[0, 1] = 0.6 / 255, 1.7 / 255  # rounded, not truncated: 1 and 2
    root = tmp_path / "t"
    (root / "images").mkdir(parents=True)
    Image.fromarray(values).save(root / "images" / "f.tif")  # 2-D float32: mode F
    bad = {"high.tif": np.full((6, 7), 3.0, np.float32), "nan.tif": np.full((6, 7), np.nan, np.float32)}
    for name, array in bad.items():
        Image.fromarray(array).save(root / "images" / name)
    assert Image.open(root / "images" / "f.tif").mode == "F"
    (root / "train800.txt").write_text("images/f.tif 0\n")
    (root / "val200.txt").write_text("images/f.tif 1\n")
    task = load_task("folder", "tune", (6, 7), root=root, num_workers=1)
    truth = torch.from_numpy(np.floor(values.astype(np.float64) * 255 + 0.5).astype(np.uint8))
    assert torch.equal(task.train.images[0], truth.expand(3, 6, 7))
    assert task.train.images[0, 0, 0, :2].tolist() == [1, 2] and task.train.images.max() == 255
    for name, what in (("high.tif", "in [0, 1], found 3 to 3"), ("nan.tif", "finite")):
        (root / "train800.txt").write_text(f"images/{name} 0\n")
        with pytest.raises(DataError, match=f"{root / 'images' / name}.*{what}".replace("[", r"\[")):
            load_task("folder", "tune", (6, 7), root=root)


def test_float_arrays_in_0_1_decode_and_others_are_refused_by_index():
    rgb = np.random.default_rng(0).random((4, 5, 6, 3))
    items = array_items("train800", rgb, np.arange(4), "arrays.npy")
    out = decode_module.decode_images(4, lambda i: items.load(i)[0], (5, 6), "nearest", describe=items.describe)
    truth = np.floor(rgb * 255 + 0.5).astype(np.uint8).transpose(0, 3, 1, 2)
    assert torch.equal(out, torch.from_numpy(truth))
    rgb[2, 1, 1, 0] = -0.25
    items = array_items("train800", rgb, np.arange(4), "arrays.npy")
    with pytest.raises(DataError, match=r"arrays\.npy\[2\].*\[0, 1\], found -0.25"):
        decode_module.decode_images(4, lambda i: items.load(i)[0], (5, 6), "nearest", describe=items.describe)


# ---- 6. a stop during a long decode ends the run at once --------------------------------------------------------


def _slow_task(root: Path, n_test: int = 2000) -> Path:
    """A folder whose test split takes tens of seconds to decode: many 1024x1024 PNGs (each ~20 ms to decode)."""
    small_task(root, n={"train800": 4, "val200": 2})
    x = np.linspace(0, 255, 1024)
    gradient = np.stack([*np.meshgrid(x, x), np.full((1024, 1024), 77.0)], axis=-1).astype(np.uint8)
    (root / "images" / "test").mkdir(parents=True)
    Image.fromarray(gradient).save(root / "images" / "test" / "000000.png")
    data = (root / "images" / "test" / "000000.png").read_bytes()
    for i in range(1, n_test):
        (root / "images" / "test" / f"{i:06d}.png").write_bytes(data)
    (root / "test.txt").write_text("".join(f"images/test/{i:06d}.png {i % 3}\n" for i in range(n_test)))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_long_decode_ends_the_run_in_seconds(tmp_path, sig):
    task = _slow_task(tmp_path / "task")
    args = [sys.executable, str(ROOT / "run.py"), f"paths.results={tmp_path / 'runs'}",
            f"paths.cache={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'hydra'}", *QUICK, "dataset=folder",
            f"dataset.root={task}", "+dataset.num_workers=2", "protocol=final"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, deadline = [], time.monotonic() + 300
    for line in proc.stdout:  # the decode's progress line says the 2,000-image split has started
        seen.append(line)
        if "decoding folder test" in line:
            break
        assert time.monotonic() < deadline, "".join(seen)
    time.sleep(0.5)
    assert proc.poll() is None, "".join(seen)
    proc.send_signal(sig)
    sent = time.monotonic()
    out = proc.communicate(timeout=120)[0]
    took = time.monotonic() - sent
    assert took < 10, f"took {took:.1f} s to stop:\n{''.join(seen)}{out}"
    [path] = records(tmp_path)
    assert read_record(path)["status"] == "interrupted"
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, out
    else:
        assert proc.returncode != 0, out
    cached = sorted(p.name for p in (tmp_path / "cache" / "data").iterdir())
    assert not [n for n in cached if "-test-" in n or n.endswith(".tmp")], cached  # no test split, no partial file
