"""The dataset layer against independent truth: list files, PIL, sklearn's arrays, IDX bytes, CLEVR scenes."""

from __future__ import annotations

import gzip
import os
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from data_helpers import (
    REAL_CIFAR10,
    index_of,
    small_task,
    solid,
    write_clevr,
    write_imagefolder,
    write_noah,
)
from PIL import Image

from vpeft.data import DATASETS, ImageSplit, TaskData, list_datasets, load_task
from vpeft.data import cache as cache_module
from vpeft.data import decode as decode_module
from vpeft.data.cache import CacheWarning
from vpeft.data.torchvision_tasks import CLEVRClosestObject
from vpeft.errors import ConfigError, DataError, OfflineError, UnknownNameError
from vpeft.vtab import TASKS as VTAB_TASKS


def pil_truth(path: Path | Image.Image, size: tuple[int, int], resample=Image.Resampling.BICUBIC) -> torch.Tensor:
    """An independent decode: PIL open, convert to RGB, resize to (W, H), as CHW uint8."""
    img = Image.open(path) if isinstance(path, Path) else path
    arr = np.asarray(img.convert("RGB").resize((size[1], size[0]), resample))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def list_labels(path: Path) -> list[int]:
    return [int(line.split()[-1]) for line in path.read_text().splitlines() if line.strip()]


def no_decoding(*args, **kwargs):
    raise AssertionError("decoded although the cache should have served this split")


# ---- registry and API -------------------------------------------------------------------------


def test_registry_lists_every_source():
    names = list_datasets()
    assert names == sorted(names)
    assert set(VTAB_TASKS) <= set(names)
    assert {"folder", "imagefolder", "digits", "fashion_mnist"} <= set(names)
    assert names == DATASETS.names()


def test_unknown_name_and_bad_arguments():
    with pytest.raises(UnknownNameError) as err:
        load_task("cifar1000", "tune", (8, 8))
    assert "cifar100" in str(err.value) and "digits" in str(err.value)
    with pytest.raises(ConfigError, match="protocol"):
        load_task("digits", "test", (8, 8))
    with pytest.raises(ConfigError, match="interpolation.*bicubic"):
        load_task("digits", "tune", (8, 8), interpolation="cubic-ish")
    with pytest.raises(ConfigError, match="image_size"):
        load_task("digits", "tune", (8, 0))
    with pytest.raises(ConfigError, match="no option.*n_train"):
        load_task("digits", "tune", (8, 8), n_train=5)
    with pytest.raises(ConfigError, match="root"):
        load_task("folder", "tune", (8, 8))


# ---- the real cifar10 task folder -------------------------------------------------------------

needs_cifar10 = pytest.mark.usefixtures("real_cifar10")


@needs_cifar10
def test_real_cifar10_tune_matches_list_files_and_pil():
    size = (24, 40)  # not square: catches an H/W swap
    task = load_task("folder", "tune", size, root=REAL_CIFAR10, num_workers=2)
    assert isinstance(task, TaskData) and isinstance(task.train, ImageSplit)
    assert (task.train.name, task.eval.name) == ("train800", "val200")
    assert task.train.images.shape == (800, 3, 24, 40) and task.eval.images.shape == (200, 3, 24, 40)
    assert task.train.images.dtype == torch.uint8 and task.train.labels.dtype == torch.int64
    assert task.train.images.is_contiguous() and task.train.images.device.type == "cpu"
    assert task.num_classes == 10
    assert task.classes == (REAL_CIFAR10 / "classes.txt").read_text().split()
    assert task.source == f"folder:{REAL_CIFAR10.resolve()}"
    assert task.train.labels.tolist() == list_labels(REAL_CIFAR10 / "train800.txt")
    assert task.eval.labels.tolist() == list_labels(REAL_CIFAR10 / "val200.txt")
    for i in (0, 1, 417, 799):
        expected = pil_truth(REAL_CIFAR10 / "images" / "train800" / f"{i:06d}.jpg", size)
        assert torch.equal(task.train.images[i], expected), i
    expected = pil_truth(REAL_CIFAR10 / "images" / "val200" / "000199.jpg", size)
    assert torch.equal(task.eval.images[199], expected)


@needs_cifar10
def test_real_cifar10_final_has_the_full_test_split():
    task = load_task("folder", "final", (12, 12), interpolation="bilinear", root=REAL_CIFAR10)
    assert (task.train.name, task.eval.name) == ("train800val200", "test")
    assert len(task.train) == 1000 and task.eval.images.shape == (10000, 3, 12, 12)
    assert task.eval.labels.tolist() == list_labels(REAL_CIFAR10 / "test.txt")
    assert task.train.labels.tolist() == list_labels(REAL_CIFAR10 / "train800val200.txt")
    expected = pil_truth(REAL_CIFAR10 / "images" / "test" / "009999.jpg", (12, 12), Image.Resampling.BILINEAR)
    assert torch.equal(task.eval.images[9999], expected)


# ---- VTAB names read task folders -------------------------------------------------------------


VTAB_SIZES = {"train800": 800, "val200": 200, "train800val200": 1000}  # what a VTAB-1k task folder holds


def test_vtab_name_reads_its_folder_under_vtab_root(tmp_path):
    small_task(tmp_path / "vtab" / "dtd", n={**VTAB_SIZES, "test": 9}, num_classes=47)  # dtd: 47 classes
    task = load_task("dtd", "tune", (6, 6), vtab_root=tmp_path / "vtab", download=False)
    assert task.source == f"folder:{(tmp_path / 'vtab' / 'dtd').resolve()}"
    assert task.classes == [f"class{c}" for c in range(47)] and task.num_classes == 47
    assert index_of(task.train.images).tolist() == list(range(800))
    assert index_of(task.eval.images).tolist() == list(range(1000, 1200))
    assert task.train.labels.tolist() == [k % 47 for k in range(800)]
    # root= wins over vtab_root
    small_task(tmp_path / "elsewhere", n={**VTAB_SIZES, "test": 4}, num_classes=47)
    final = load_task("dtd", "final", (6, 6), root=tmp_path / "elsewhere", vtab_root=tmp_path / "vtab")
    assert len(final.train) == 1000 and len(final.eval) == 4


def test_vtab_task_torchvision_cannot_build_shows_the_layout(tmp_path):
    with pytest.raises(DataError) as err:
        load_task("dmlab", "tune", (8, 8), vtab_root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "dmlab") in msg and "train800.txt" in msg and "images/<split>/" in msg


def test_num_classes_without_classes_txt_is_max_label_over_all_lists(tmp_path):
    root = write_noah(
        tmp_path / "t",
        {
            "train800": [(solid(0), 0), (solid(1), 1)],
            "val200": [(solid(2), 1)],
            "train800val200": [(solid(0), 0)],
            "test": [(solid(3), 6)],  # only the test list has label 6
        },
    )
    assert load_task("folder", "tune", (4, 4), root=root).num_classes == 7
    assert load_task("folder", "final", (4, 4), root=root).classes is None


def test_liberal_list_files(tmp_path):
    root = tmp_path / "t"
    (root / "my images").mkdir(parents=True)
    solid(5).save(root / "my images" / "a b.bmp")
    solid(6).convert("L").save(root / "my images" / "c.tif")
    elsewhere = tmp_path / "abs.webp"
    solid(7).save(elsewhere, lossless=True)
    (root / "train800.txt").write_text(f"# comment\n\nmy images/a b.bmp   1\n  my images/c.tif\t0\n{elsewhere} 2\n")
    (root / "val200.txt").write_text("my images/a b.bmp 2\n")
    task = load_task("folder", "tune", (3, 3), root=root, interpolation="nearest")
    assert task.train.labels.tolist() == [1, 0, 2]
    assert index_of(task.train.images[[0, 2]]).tolist() == [5, 7]
    assert torch.equal(task.train.images[1], pil_truth(root / "my images" / "c.tif", (3, 3)))


def test_list_files_with_a_byte_order_mark(tmp_path):
    """Editors on Windows write a UTF-8 BOM; it must not become part of the first path or class name."""
    root = small_task(tmp_path / "t", n={"train800": 4, "val200": 2})
    for name in ("train800.txt", "val200.txt", "classes.txt"):
        path = root / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    task = load_task("folder", "tune", (4, 4), root=root, interpolation="nearest")
    assert index_of(task.train.images).tolist() == [0, 1, 2, 3]
    assert task.train.labels.tolist() == [0, 1, 2, 0]
    assert task.classes == ["class0", "class1", "class2"]


# ---- image modes and sizes ----------------------------------------------------------------------


def _mode_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (13, 7, 3), dtype=np.uint8))
    return {
        "rgb_odd": rgb,
        "gray": Image.fromarray(rng.integers(0, 256, (50, 3), dtype=np.uint8)),
        "gray_alpha": Image.merge("LA", [Image.fromarray(rng.integers(0, 256, (9, 11), dtype=np.uint8))] * 2),
        "rgba": Image.fromarray(rng.integers(0, 256, (17, 5, 4), dtype=np.uint8)),
        "palette": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "bilevel": Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).convert("1"),
        "big": Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)),
    }


def test_every_mode_becomes_rgb_at_the_requested_size(tmp_path):
    images = _mode_images()
    palette_t = images["palette"].copy()
    palette_t.info["transparency"] = 0
    cmyk = images["rgb_odd"].convert("CMYK")
    deep = (np.arange(6 * 10).reshape(6, 10) * 1000).astype(np.uint16)  # 16-bit grayscale, full range
    samples = [(img, 0) for img in images.values()] + [(palette_t, 1)]
    root = write_noah(tmp_path / "modes", {"train800": samples, "val200": [(solid(0), 0)]})
    cmyk.save(root / "cmyk.jpg")
    Image.fromarray(deep).save(root / "deep.png")
    with open(root / "train800.txt", "a") as f:
        f.write("cmyk.jpg 1\ndeep.png 1\n")
    assert Image.open(root / "deep.png").mode.startswith("I")
    size = (10, 14)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's warning on palette transparency applied the wrong way
        task = load_task("folder", "tune", size, root=root, num_workers=2)
    assert task.train.images.shape == (len(samples) + 2, 3, 10, 14)
    names = list(images) + ["palette_transparent"]
    for i, name in enumerate(names):
        saved = root / "images" / "train800" / f"{i:06d}.png"
        truth = Image.open(saved)
        if truth.mode in ("P", "PA") and "transparency" in truth.info:
            truth = truth.convert("RGBA")
        assert torch.equal(task.train.images[i], pil_truth(truth, size)), name
    assert torch.equal(task.train.images[len(samples)], pil_truth(root / "cmyk.jpg", size))
    # 16-bit: scaled by range (PIL's own convert would clip everything above 255 to white)
    scaled = Image.fromarray(np.round(deep / 65535 * 255).astype(np.uint8))
    assert torch.equal(task.train.images[-1], pil_truth(scaled, size))
    assert len(torch.unique(task.train.images[-1])) > 10
    gray = task.train.images[1]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


# ---- bad inputs name what is wrong --------------------------------------------------------------


def test_missing_folder_and_missing_split_list(tmp_path):
    with pytest.raises(DataError) as err:
        load_task("folder", "tune", (8, 8), root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value) and "train800val200.txt" in str(err.value)
    root = small_task(tmp_path / "t", n={"train800": 2, "val200": 2})
    with pytest.raises(DataError) as err:
        load_task("folder", "final", (8, 8), root=root)
    assert str(root / "test.txt") in str(err.value)


def test_train800val200_falls_back_to_the_union(tmp_path):
    root = small_task(tmp_path / "t", n={"train800": 4, "val200": 3, "test": 2})
    task = load_task("folder", "final", (4, 4), root=root)
    assert index_of(task.train.images).tolist() == [0, 1, 2, 3, 1000, 1001, 1002]
    assert "train800 + val200" in task.source


def test_missing_image_names_path_and_line(tmp_path):
    root = small_task(tmp_path / "t")
    (root / "images" / "train800" / "000004.png").unlink()
    with pytest.raises(DataError) as err:
        load_task("folder", "tune", (8, 8), root=root)
    msg = str(err.value)
    assert str(root / "images" / "train800" / "000004.png") in msg and "train800.txt line 5" in msg


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_and_truncated_images_name_their_path(tmp_path, workers):
    root = small_task(tmp_path / "t", n={"train800": 150, "val200": 2})
    bad = root / "images" / "train800" / "000140.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=str(bad)):
        load_task("folder", "tune", (8, 8), root=root, num_workers=workers)
    jpeg = root / "images" / "train800" / "000141.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    solid(140).save(bad)
    lines = (root / "train800.txt").read_text().replace("000141.png", "000141.jpg")
    (root / "train800.txt").write_text(lines)
    with pytest.raises(DataError, match=str(jpeg)):
        load_task("folder", "tune", (8, 8), root=root, num_workers=workers)


def test_bad_labels_name_file_line_and_label(tmp_path):
    root = small_task(tmp_path / "t")  # classes.txt: 3 classes
    lines = (root / "val200.txt").read_text().splitlines()
    lines[3] = lines[3].rsplit(maxsplit=1)[0] + " 3"
    (root / "val200.txt").write_text("\n".join(lines))
    with pytest.raises(DataError) as err:
        load_task("folder", "tune", (8, 8), root=root)
    assert f"{root / 'val200.txt'} line 4: label 3 outside [0, 3)" in str(err.value)
    lines[3] = lines[3].rsplit(maxsplit=1)[0] + " -1"
    (root / "val200.txt").write_text("\n".join(lines))
    with pytest.raises(DataError, match="line 4: label -1"):
        load_task("folder", "tune", (8, 8), root=root)
    lines[3] = lines[3].rsplit(maxsplit=1)[0] + " cat"
    (root / "val200.txt").write_text("\n".join(lines))
    with pytest.raises(DataError, match="line 4: label 'cat' is not an integer"):
        load_task("folder", "tune", (8, 8), root=root)
    lines[3] = "lonely-token"
    (root / "val200.txt").write_text("\n".join(lines))
    with pytest.raises(DataError, match="line 4: expected"):
        load_task("folder", "tune", (8, 8), root=root)


def test_empty_split_names_the_file(tmp_path):
    root = small_task(tmp_path / "t")
    (root / "val200.txt").write_text("\n# nothing here\n")
    with pytest.raises(DataError, match=f"{root / 'val200.txt'} is empty"):
        load_task("folder", "tune", (8, 8), root=root)
    (tmp_path / "if").mkdir()
    (tmp_path / "if" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_task("imagefolder", "tune", (8, 8), root=tmp_path / "if")


def _unblock_readers(fifo: Path, after: float, stop: threading.Event) -> None:
    """After ``after`` seconds, open ``fifo`` for writing and close it: a reader blocked on it gets EOF."""
    if stop.wait(after):
        return
    while not stop.wait(0.05):
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: nobody has it open for reading (yet)
            continue


def test_fifo_or_directory_listed_as_an_image_fails_at_once(tmp_path):
    root = small_task(tmp_path / "t", n={"train800": 3, "val200": 2})
    fifo = root / "images" / "train800" / "000001.png"
    fifo.unlink()
    os.mkfifo(fifo)
    stop = threading.Event()  # a loader that opens the FIFO would block forever: unblock it, and fail slow
    watchdog = threading.Thread(target=_unblock_readers, args=(fifo, 3.0, stop), daemon=True)
    watchdog.start()
    try:
        start = time.perf_counter()
        with pytest.raises(DataError) as err:
            load_task("folder", "tune", (4, 4), root=root, num_workers=1)
        elapsed = time.perf_counter() - start
    finally:
        stop.set()
        watchdog.join()
    msg = str(err.value)
    assert str(fifo) in msg and "FIFO" in msg and f"{root / 'train800.txt'} line 2" in msg
    assert elapsed < 2.0
    fifo.unlink()
    fifo.mkdir()  # a directory under an image's name
    with pytest.raises(DataError) as err:
        load_task("folder", "tune", (4, 4), root=root)
    assert str(fifo) in str(err.value) and "directory" in str(err.value) and "line 2" in str(err.value)


# ---- imagefolder ---------------------------------------------------------------------------------


def test_imagefolder_subsample_counts_disjoint_seeded(tmp_path):
    truth = write_imagefolder(tmp_path, {"cat": (40, 5), "dog": (30, 4), "emu": (20, 3)})
    kw = dict(root=tmp_path, interpolation="nearest", n_train=50, n_val=20)
    tune = load_task("imagefolder", "tune", (4, 4), **kw)
    assert (tune.train.name, tune.eval.name) == ("train50", "val20")
    assert tune.classes == ["cat", "dog", "emu"] and tune.num_classes == 3
    train, val = index_of(tune.train.images), index_of(tune.eval.images)
    assert len(set(train)) == 50 and len(set(val)) == 20 and not set(train) & set(val)
    assert all(truth[k][0] == "train" for k in [*train, *val])
    assert [tune.classes[y] for y in tune.train.labels] == [truth[k][1] for k in train]
    again = load_task("imagefolder", "tune", (4, 4), **kw)
    assert torch.equal(again.train.images, tune.train.images) and torch.equal(again.eval.labels, tune.eval.labels)
    other = load_task("imagefolder", "tune", (4, 4), split_seed=1, **kw)
    assert set(index_of(other.train.images)) != set(train)
    final = load_task("imagefolder", "final", (4, 4), **kw)
    assert (final.train.name, final.eval.name) == ("train50val20", "test")
    assert index_of(final.train.images).tolist() == [*train, *val]
    test = index_of(final.eval.images)
    assert sorted(test) == sorted(k for k, (split, _) in truth.items() if split == "test")
    assert [final.classes[y] for y in final.eval.labels] == [truth[k][1] for k in test]


def test_imagefolder_without_subsampling(tmp_path):
    write_imagefolder(tmp_path, {"a": (30, 2), "b": (20, 2)})
    (tmp_path / "test").rename(tmp_path / "val")
    final = load_task("imagefolder", "final", (4, 4), root=tmp_path, subsample=False)
    assert len(final.train) == 50 and (final.eval.name, len(final.eval)) == ("val", 4)
    tune = load_task("imagefolder", "tune", (4, 4), root=tmp_path, subsample=False)
    assert (len(tune.train), len(tune.eval)) == (40, 10)
    assert not set(index_of(tune.train.images)) & set(index_of(tune.eval.images))
    with pytest.raises(DataError, match="fewer than n_train"):
        load_task("imagefolder", "tune", (4, 4), root=tmp_path)


def test_imagefolder_test_classes_must_exist_in_train(tmp_path):
    write_imagefolder(tmp_path, {"a": (3, 1)})
    (tmp_path / "test" / "zebra").mkdir()
    with pytest.raises(DataError, match="zebra"):
        load_task("imagefolder", "final", (4, 4), root=tmp_path, n_train=2, n_val=1)


# ---- digits (scikit-learn) -----------------------------------------------------------------------


def _digits_keys() -> tuple[Counter, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    u8 = np.floor(d.images * 255 / 16 + 0.5).astype(np.uint8)  # independent of the module's integer maths
    return Counter((u8[i].tobytes(), int(d.target[i])) for i in range(len(u8))), u8, d.target


def _keys(split: ImageSplit) -> Counter:
    assert torch.equal(split.images[:, 0], split.images[:, 1]) and torch.equal(split.images[:, 1], split.images[:, 2])
    return Counter((img[0].numpy().tobytes(), int(y)) for img, y in zip(split.images, split.labels))


def test_digits_partition_is_exact_and_seeded():
    everything, u8, target = _digits_keys()
    tune = load_task("digits", "tune", (8, 8), interpolation="nearest")
    final = load_task("digits", "final", (8, 8), interpolation="nearest")
    assert [len(tune.train), len(tune.eval), len(final.train), len(final.eval)] == [800, 200, 1000, 797]
    assert final.num_classes == 10 and final.classes == [str(d) for d in range(10)]
    train, val, trainval, test = (_keys(s) for s in (tune.train, tune.eval, final.train, final.eval))
    assert train + val == trainval  # union, nothing lost or duplicated
    assert torch.equal(final.train.images, torch.cat([tune.train.images, tune.eval.images]))
    assert trainval + test == everything  # an exact partition of sklearn's 1,797 images
    again = load_task("digits", "tune", (8, 8), interpolation="nearest")
    assert torch.equal(again.train.images, tune.train.images) and torch.equal(again.eval.labels, tune.eval.labels)
    other = load_task("digits", "tune", (8, 8), interpolation="nearest", split_seed=3)
    assert _keys(other.train) != train
    # resized: equal to PIL's own resize of the same 8x8 arrays
    big = load_task("digits", "tune", (20, 20))
    key = tune.train.images[0, 0].numpy().tobytes()
    first = next(i for i in range(len(u8)) if u8[i].tobytes() == key)
    assert torch.equal(big.train.images[0], pil_truth(Image.fromarray(u8[first]), (20, 20)))


# ---- Fashion-MNIST (Debian package) --------------------------------------------------------------


def _fashion_root() -> Path:
    """The Debian package's files; `make test` installs the package, so their absence is a broken setup."""
    from vpeft.data.arrays import fashion_files

    try:
        return fashion_files(None)["test_images"].parent
    except DataError as e:
        pytest.fail(f"{e} (make test installs it: scripts/sysdeps.sh)")


def _read_gz_or_raw(path_stem: Path, offset: int) -> np.ndarray:
    path = path_stem if path_stem.exists() else path_stem.with_name(path_stem.name + ".gz")
    raw = path.read_bytes()
    raw = gzip.decompress(raw) if path.suffix == ".gz" else raw
    return np.frombuffer(raw, dtype=np.uint8, offset=offset)


def test_fashion_mnist_from_the_debian_files():
    root = _fashion_root()
    final = load_task("fashion_mnist", "final", (28, 28))
    tune = load_task("fashion_mnist", "tune", (28, 28))
    assert [len(tune.train), len(tune.eval), len(final.train), len(final.eval)] == [800, 200, 1000, 10000]
    assert final.classes[0] == "T-shirt/top" and final.num_classes == 10
    test_images = _read_gz_or_raw(root / "t10k-images-idx3-ubyte", 16).reshape(10000, 28, 28)
    test_labels = _read_gz_or_raw(root / "t10k-labels-idx1-ubyte", 8)
    assert final.eval.labels.tolist() == test_labels.tolist()
    assert torch.equal(final.eval.images[:, 1], torch.from_numpy(test_images.copy()))
    train_images = _read_gz_or_raw(root / "train-images-idx3-ubyte", 16).reshape(60000, 28, 28)
    train_keys = {img.tobytes() for img in train_images}
    drawn = [img[0].numpy().tobytes() for img in final.train.images]
    assert len(set(drawn)) == 1000 and set(drawn) <= train_keys
    assert torch.equal(final.train.images, torch.cat([tune.train.images, tune.eval.images]))


def test_fashion_mnist_absent_files_say_how_to_get_them(tmp_path):
    with pytest.raises(DataError) as err:
        load_task("fashion_mnist", "tune", (28, 28), root=tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(err.value) and "root=" in str(err.value)


def test_idx_reader_rejects_truncated_files(tmp_path):
    from vpeft.data.arrays import read_idx

    header = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (3).to_bytes(4, "big")
    (tmp_path / "ok").write_bytes(header + bytes(range(18)))
    assert read_idx(tmp_path / "ok").tolist() == np.arange(18).reshape(2, 3, 3).tolist()
    (tmp_path / "gz").write_bytes(gzip.compress(header + bytes(range(18))))
    assert read_idx(tmp_path / "gz").shape == (2, 3, 3)
    (tmp_path / "short").write_bytes(header + bytes(5))
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")


# ---- VTAB tasks built from torchvision -----------------------------------------------------------


class FakeCIFAR100:
    """Stands in for torchvision.datasets.CIFAR100: solid images numbering the samples, no files."""

    calls: list[tuple[bool, bool]] = []
    present = True  # whether "the files" exist under root
    online = False

    def __init__(self, root, train=True, download=False, **kwargs):
        type(self).calls.append((train, download))
        if download and not self.online:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        if not download and not self.present:
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        self.offset = 0 if train else 5000
        self.targets = [(k * 7) % 100 for k in range(1300 if train else 150)]
        self.classes = [f"class{c}" for c in range(100)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return solid(self.offset + i), self.targets[i]


@pytest.fixture
def fake_cifar(monkeypatch):
    FakeCIFAR100.calls = []
    FakeCIFAR100.present, FakeCIFAR100.online = True, False
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    return FakeCIFAR100


def test_vtab_split_built_from_torchvision(tmp_path, fake_cifar):
    kw = dict(vtab_root=tmp_path / "vtab", download_root=tmp_path / "dl", interpolation="nearest")
    tune = load_task("cifar100", "tune", (2, 2), **kw)
    assert fake_cifar.calls == [(True, False)]  # tune never opens the test split, never downloads
    train, val = index_of(tune.train.images), index_of(tune.eval.images)
    assert len(set(train)) == 800 and len(set(val)) == 200 and not set(train) & set(val)
    assert max(*train, *val) < 1300  # all drawn from the official train split
    assert tune.train.labels.tolist() == [(k * 7) % 100 for k in train]
    assert tune.num_classes == 100 and tune.classes[3] == "class3"
    assert tune.source.startswith("torchvision:CIFAR100 (VTAB-1k split built: 800/200 from train, seed 0;")
    assert "official test" in tune.source
    final = load_task("cifar100", "final", (2, 2), **kw)
    assert index_of(final.train.images).tolist() == [*train, *val]
    assert index_of(final.eval.images).tolist() == list(range(5000, 5150))  # the official test, in order
    reseeded = load_task("cifar100", "final", (2, 2), split_seed=1, **kw)
    assert set(index_of(reseeded.train.images)) != set(train)
    assert torch.equal(reseeded.eval.images, final.eval.images) and "seed 1" in reseeded.source


def test_vtab_offline_failure_names_both_ways_out(tmp_path, fake_cifar):
    fake_cifar.present = False
    kw = dict(vtab_root=tmp_path / "vtab", download_root=tmp_path / "dl")
    with pytest.raises(OfflineError) as err:
        load_task("cifar100", "tune", (8, 8), **kw)
    msg = str(err.value)
    assert str(tmp_path / "vtab" / "cifar100") in msg and "train800.txt" in msg  # way 1: the task folder
    assert str(tmp_path / "dl") in msg and "torchvision.datasets.CIFAR100" in msg  # way 2: torchvision's files
    assert "URLError" in msg
    fake_cifar.calls = []
    with pytest.raises(DataError) as err:
        load_task("cifar100", "tune", (8, 8), download=False, **kw)
    assert not isinstance(err.value, OfflineError) and "download=False" in str(err.value)
    assert fake_cifar.calls == [(True, False)]  # no download attempted


def _raises_at_once(exc_type, *args, **kwargs) -> str:
    start = time.perf_counter()
    with pytest.raises(exc_type) as err:
        load_task(*args, **kwargs)
    assert time.perf_counter() - start < 2.0
    return str(err.value)


def test_wrong_root_fails_at_once_and_never_downloads(tmp_path, fake_cifar):
    small_task(tmp_path / "vtab" / "dtd", n={"train800": 2, "val200": 1})
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    # dataset=folder: missing, not a task folder, a VTAB root given as the task folder
    msg = _raises_at_once(DataError, "folder", "tune", (4, 4), root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in msg and "train800.txt" in msg
    msg = _raises_at_once(DataError, "folder", "tune", (4, 4), root=tmp_path / "empty", cache_dir=tmp_path / "c")
    assert f"{tmp_path / 'empty'} is not a task folder" in msg and "images/<split>/" in msg
    msg = _raises_at_once(DataError, "folder", "final", (4, 4), root=tmp_path / "vtab")
    assert "not a task folder" in msg and f"root={tmp_path / 'vtab' / 'dtd'}" in msg
    # a torchvision-built task with an explicit root that is wrong: reported, nothing opened or downloaded
    kw = dict(vtab_root=tmp_path / "vtab", download_root=tmp_path / "dl", download=True)
    for wrong in (tmp_path / "typo" / "cifar100", tmp_path / "a_file", tmp_path / "empty"):
        msg = _raises_at_once(DataError, "cifar100", "tune", (4, 4), root=wrong, **kw)
        assert str(wrong) in msg and "train800.txt" in msg, wrong
    (tmp_path / "vtab" / "cifar100").mkdir()  # the default place exists but holds no task
    msg = _raises_at_once(DataError, "cifar100", "tune", (4, 4), root=tmp_path / "vtab" / "cifar100", **kw)
    assert "not a task folder" in msg
    assert fake_cifar.calls == []
    # the default place, absent, still means "build it with torchvision" (how run.py passes it)
    (tmp_path / "vtab" / "cifar100").rmdir()
    task = load_task("cifar100", "tune", (2, 2), root=tmp_path / "vtab" / "cifar100", **kw)
    assert task.source.startswith("torchvision:CIFAR100") and fake_cifar.calls == [(True, False)]


class FakeEuroSAT:
    """torchvision's EuroSAT has no split: one ImageFolder over all 27,000 images."""

    def __init__(self, root, download=False, **kwargs):
        self.targets = [k % 10 for k in range(1500)]
        self.classes = [f"land{c}" for c in range(10)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return solid(i).convert("RGBA"), self.targets[i]


def test_vtab_split_where_torchvision_has_none(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "EuroSAT", FakeEuroSAT)
    kw = dict(vtab_root=tmp_path, download_root=tmp_path / "dl", interpolation="nearest")
    final = load_task("eurosat", "final", (2, 2), **kw)
    test = index_of(final.eval.images)
    assert len(test) == 300 and list(test) == sorted(test)  # 20% as test
    assert not set(test) & set(index_of(final.train.images))
    assert "no official split" in final.source and "tfds/VTAB" in final.source
    other = load_task("eurosat", "final", (2, 2), split_seed=5, **kw)
    assert torch.equal(other.eval.images, final.eval.images)  # the test split ignores split_seed


class FakeCaltech101(FakeEuroSAT):
    def __init__(self, root, download=False, **kwargs):
        self.y = [k // 35 for k in range(34 * 35)]  # 34 classes x 35 images
        self.targets = self.y
        self.categories = [f"c{c}" for c in range(34)]


def test_caltech101_takes_30_per_class_for_training(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "Caltech101", FakeCaltech101)
    final = load_task(
        "caltech101", "final", (2, 2), vtab_root=tmp_path, download_root=tmp_path, interpolation="nearest"
    )
    assert Counter(final.eval.labels.tolist()) == {c: 5 for c in range(34)}
    assert final.eval.labels.tolist() == [k // 35 for k in index_of(final.eval.images)]
    assert "30 images per class" in final.source and "BACKGROUND_Google" in final.source


def test_clevr_tasks_from_a_real_torchvision_clevr_tree(tmp_path):
    scenes = write_clevr(tmp_path / "dl", {"train": 1030, "val": 25})
    kw = dict(vtab_root=tmp_path / "vtab", download_root=tmp_path / "dl", interpolation="nearest", download=False)
    count = load_task("clevr_count", "final", (2, 2), **kw)
    numbers = {s["number"]: s for split in scenes.values() for s in split}
    val_numbers = [s["number"] for s in scenes["val"]]
    assert index_of(count.eval.images).tolist() == val_numbers  # CLEVR's val split is the test split
    for images, labels in ((count.train.images, count.train.labels), (count.eval.images, count.eval.labels)):
        assert labels.tolist() == [len(numbers[k]["objects"]) - 3 for k in index_of(images)]
    assert count.num_classes == 8 and count.classes[0] == "3"

    dist = load_task("clevr_dist", "tune", (2, 2), **kw)
    edges = [8.0, 8.5, 9.0, 9.5, 10.0]  # VTAB's thresholds 0, 8, 8.5, 9, 9.5, 10, 100

    def expected(k: int) -> int:
        closest = min(o["pixel_coords"][2] for o in numbers[k]["objects"])
        return sum(closest >= e for e in edges)

    assert dist.train.labels.tolist() == [expected(k) for k in index_of(dist.train.images)]
    assert dist.num_classes == 6 and len(set(dist.train.labels.tolist())) > 3
    assert CLEVRClosestObject.label(7.99) == 0 and CLEVRClosestObject.label(8.0) == 1
    assert CLEVRClosestObject.label(10.0) == 5


# ---- the cache -------------------------------------------------------------------------------------


def test_cache_hit_skips_decoding_and_key_follows_size(tmp_path, monkeypatch):
    root = small_task(tmp_path / "t")
    cache = tmp_path / "cache"
    first = load_task("folder", "tune", (8, 8), root=root, cache_dir=cache)
    assert not first.cache_hit and first.decode_seconds > 0
    assert len(list(cache.glob("*.safetensors"))) == 2  # only the protocol's two splits
    monkeypatch.setattr(decode_module, "decode_images", no_decoding)
    second = load_task("folder", "tune", (8, 8), root=root, cache_dir=cache)
    assert second.cache_hit and second.decode_seconds == 0
    assert torch.equal(second.train.images, first.train.images) and torch.equal(second.eval.labels, first.eval.labels)
    assert (second.num_classes, second.classes, second.source) == (first.num_classes, first.classes, first.source)
    assert second.train.images.is_contiguous() and second.train.images.dtype == torch.uint8
    with pytest.raises(AssertionError, match="decoded"):
        load_task("folder", "tune", (8, 9), root=root, cache_dir=cache)  # another size: another key
    with pytest.raises(AssertionError, match="decoded"):
        load_task("folder", "tune", (8, 8), interpolation="bilinear", root=root, cache_dir=cache)
    # editing a list file invalidates that folder's entries
    text = (root / "val200.txt").read_text()
    (root / "val200.txt").write_text(text.replace(" 0\n", " 1\n", 1))
    with pytest.raises(AssertionError, match="decoded"):
        load_task("folder", "tune", (8, 8), root=root, cache_dir=cache)


def test_corrupt_cache_file_is_rebuilt(tmp_path):
    root = small_task(tmp_path / "t")
    cache = tmp_path / "cache"
    first = load_task("folder", "final", (8, 8), root=root, cache_dir=cache)
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 2 and not list(cache.glob("*.tmp"))
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated
    with pytest.warns(CacheWarning, match=files[0].name):
        rebuilt = load_task("folder", "final", (8, 8), root=root, cache_dir=cache)
    assert not rebuilt.cache_hit
    assert torch.equal(rebuilt.train.images, first.train.images) and torch.equal(rebuilt.eval.images, first.eval.images)
    assert load_task("folder", "final", (8, 8), root=root, cache_dir=cache).cache_hit


def test_cached_torchvision_task_needs_neither_files_nor_network(tmp_path, fake_cifar):
    kw = dict(vtab_root=tmp_path / "vtab", download_root=tmp_path / "dl", cache_dir=tmp_path / "cache")
    first = load_task("cifar100", "tune", (4, 4), **kw)
    fake_cifar.present, fake_cifar.calls = False, []
    again = load_task("cifar100", "tune", (4, 4), **kw)
    assert again.cache_hit and fake_cifar.calls == [] and again.source == first.source
    assert torch.equal(again.train.images, first.train.images) and again.classes == first.classes
    with pytest.raises(OfflineError):
        load_task("cifar100", "tune", (4, 4), **{**kw, "split_seed": 1})  # another draw is another key


def test_cache_write_is_atomic_and_named_readably(tmp_path):
    root = small_task(tmp_path / "t")
    load_task("folder", "tune", (8, 6), root=root, cache_dir=tmp_path / "c")
    names = sorted(p.name for p in (tmp_path / "c").iterdir() if p.name != "digests")  # (the digests' memo)
    assert len(names) == 2 and all(n.startswith("folder-") and "-8x6-bicubic-" in n for n in names)
    assert all(os.path.getsize(tmp_path / "c" / n) > 0 for n in names)


def _rewrite_labels(path: Path) -> None:
    """Rewrite a cache file as a bit flip or a stray edit would leave it: same name, same metadata, other labels."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        images, labels = f.get_tensor("images"), f.get_tensor("labels")
    save_file({"images": images, "labels": (labels + 1) % 3}, str(path), metadata=meta)


def test_cache_checksum_catches_edited_content(tmp_path):
    root = small_task(tmp_path / "t")
    cache = tmp_path / "cache"
    first = load_task("folder", "tune", (8, 8), root=root, cache_dir=cache)
    truth = list_labels(root / "train800.txt")
    assert first.train.labels.tolist() == truth
    (train_file,) = cache.glob("folder-train800-*.safetensors")
    _rewrite_labels(train_file)
    with pytest.warns(CacheWarning, match=f"{train_file}.*checksum"):
        again = load_task("folder", "tune", (8, 8), root=root, cache_dir=cache)
    assert again.train.labels.tolist() == truth and not again.cache_hit
    assert torch.equal(again.train.images, first.train.images)
    rebuilt = load_task("folder", "tune", (8, 8), root=root, cache_dir=cache)  # the rebuilt file is good
    assert rebuilt.cache_hit and rebuilt.train.labels.tolist() == truth


def test_image_replaced_in_place_is_decoded_again(tmp_path, monkeypatch):
    root = small_task(tmp_path / "t")
    cache = tmp_path / "cache"
    first = load_task("folder", "tune", (4, 4), root=root, cache_dir=cache, interpolation="nearest")
    assert index_of(first.train.images)[3] == 3
    solid(500, (7, 9)).save(root / "images" / "train800" / "000003.png")  # another size on disk
    second = load_task("folder", "tune", (4, 4), root=root, cache_dir=cache, interpolation="nearest")
    assert index_of(second.train.images).tolist() == [0, 1, 2, 500, *range(4, 12)]
    # the same size on disk, written later: the mtime alone tells
    image = root / "images" / "train800" / "000004.png"
    before = image.stat()
    solid(600).save(image)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    third = load_task("folder", "tune", (4, 4), root=root, cache_dir=cache, interpolation="nearest")
    assert index_of(third.train.images).tolist() == [0, 1, 2, 500, 600, *range(5, 12)]
    monkeypatch.setattr(decode_module, "decode_images", no_decoding)  # unchanged files: served from the cache
    assert load_task("folder", "tune", (4, 4), root=root, cache_dir=cache, interpolation="nearest").cache_hit


def _cache_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]


def test_unwritable_cache_warns_once_and_loads(tmp_path):
    root = small_task(tmp_path / "t")
    truth = load_task("folder", "tune", (4, 4), root=root)
    (tmp_path / "a_file").write_text("")
    places = [tmp_path / "a_file" / "cache"]  # mkdir fails with NotADirectoryError, even for root
    if os.geteuid() != 0:  # permission bits do not stop root
        (tmp_path / "ro").mkdir(mode=0o555)
        places.append(tmp_path / "ro")
    for cache in places:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            task = load_task("folder", "tune", (4, 4), root=root, cache_dir=cache)
        found = _cache_warnings(caught)
        assert len(found) == 1 and str(cache) in found[0], found
        assert not task.cache_hit and torch.equal(task.train.images, truth.train.images)
        assert torch.equal(task.eval.labels, truth.eval.labels)


def test_cache_write_that_fails_midway_leaves_nothing(tmp_path):
    """A real failing write: the file-size limit makes write() fail with EFBIG, as a full disk does with ENOSPC."""
    root = small_task(tmp_path / "t")
    cache = tmp_path / "cache"
    cache.mkdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's signal kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (16384, hard))  # a split at 32x32 is 12 * 3 KiB
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            task = load_task("folder", "tune", (32, 32), root=root, cache_dir=cache, interpolation="nearest")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    found = _cache_warnings(caught)
    assert len(found) == 1 and str(cache) in found[0] and "File too large" in found[0], found
    assert index_of(task.train.images).tolist() == list(range(12)) and not task.cache_hit
    assert [p.name for p in cache.iterdir()] == ["digests"]  # the partial temp file is gone (the data's digest stays)


def test_stale_temp_files_of_killed_writers_are_removed(tmp_path):
    root = small_task(tmp_path / "t")
    cache = tmp_path / "cache"
    cache.mkdir()
    target = "folder-x-8x8-bicubic-0123456789abcdef.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    planted = {
        "old": cache / cache_module.temp_name(target),  # ours, but untouched for two hours
        "old_mkstemp": cache / f"{target}.k2j4_x9a.tmp",  # the pattern of earlier versions
        "dead_writer": cache / cache_module.temp_name(target, pid=int(dead.stdout)),
        "live_writer": cache / cache_module.temp_name(target),  # this process: a write in progress
        "other_host": cache / cache_module.temp_name(target, pid=int(dead.stdout), host="elsewhere"),
        "not_ours": cache / "notes.tmp",
    }
    for path in planted.values():
        path.write_bytes(b"\0" * 64)
    two_hours_ago = time.time() - 7200
    for key in ("old", "old_mkstemp", "not_ours"):
        os.utime(planted[key], (two_hours_ago, two_hours_ago))
    load_task("folder", "tune", (8, 8), root=root, cache_dir=cache)
    left = {key for key, path in planted.items() if path.exists()}
    assert left == {"live_writer", "other_host", "not_ours"}
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_cache_files_follow_the_umask(tmp_path):
    root = small_task(tmp_path / "t", n={"train800": 2, "val200": 1})
    for umask, mode in ((0o027, 0o640), (0o022, 0o644)):
        old = os.umask(umask)
        try:
            load_task("folder", "tune", (4, 4), root=root, cache_dir=tmp_path / f"c{umask:o}")
        finally:
            os.umask(old)
        files = [p for p in (tmp_path / f"c{umask:o}").rglob("*") if p.is_file()]  # the splits and digests' memo
        modes = {stat.S_IMODE(p.stat().st_mode) for p in files}
        assert len(files) == 4  # two splits, each with its digest
        assert modes == {mode}, (oct(umask), modes)


class FakeGTSRB:
    """Stands in for torchvision.datasets.GTSRB (and StanfordCars): (path, label) pairs in ``_samples``."""

    n_classes = 43

    def __init__(self, root, split="train", download=False, **kwargs):
        n, self.offset = (1100, 0) if split == "train" else (90, 5000)
        self._samples = [(f"{split}/{k:05d}.ppm", k % self.n_classes) for k in range(n)]
        self.decoded = 0

    def __len__(self):
        return len(self._samples)

    def __getitem__(self, i):
        self.decoded += 1
        return solid(self.offset + i), self._samples[i][1]


@pytest.mark.parametrize(
    "name, cls, n_classes", [("gtsrb", "GTSRB", 43), ("stanford_cars", "StanfordCars", 196), ("mnist", "MNIST", 10)]
)
def test_task_arithmetic_pool_tasks_beyond_vtab_are_split_as_vtab_splits(tmp_path, monkeypatch, name, cls, n_classes):
    """GTSRB, Stanford Cars and MNIST: 800/200 from the official train split, the official test split, each
    image read once; their configs point at <vtab_root>/<name>."""
    from hydra import compose, initialize_config_dir

    opened = []

    class Fake(FakeGTSRB):
        def __init__(self, root, split=None, train=None, download=False, **kwargs):
            self.n_classes = n_classes
            super().__init__(root, split or ("train" if train else "test"), download)
            if cls == "MNIST":  # MNIST keeps a targets list instead
                self.targets = [label for _, label in self._samples]
            opened.append(self)

    monkeypatch.setattr(torchvision.datasets, cls, Fake)
    kw = dict(vtab_root=tmp_path / "vtab", download_root=tmp_path / "dl", interpolation="nearest")
    final = load_task(name, "final", (2, 2), **kw)
    train, test = index_of(final.train.images), index_of(final.eval.images)
    assert len(set(train)) == 1000 and max(train) < 1100 and sorted(test) == list(range(5000, 5090))
    assert final.train.labels.tolist() == [k % n_classes for k in train]
    assert final.eval.labels.tolist() == [k % n_classes for k in range(90)] and final.num_classes == n_classes
    assert final.source.startswith(f"torchvision:{cls} (VTAB-1k split built: 800/200 from train, seed 0; official")
    assert sum(ds.decoded for ds in opened) == 1000 + 90  # train800val200 and test, each image once
    root = Path(__file__).resolve().parents[1]
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose("config", [f"dataset={name}", "paths.vtab_root=/data/vtab"])
    assert cfg.dataset.name == name and cfg.dataset.root == f"/data/vtab/{name}"
