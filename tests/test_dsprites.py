"""dSprites for dsprites_loc / dsprites_ori: the regenerated images against the factor definitions,
VTAB's label bins and splits, the official npz when present, and a tiny run end to end."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import small_task

from vpeft.data import dsprites as ds
from vpeft.data import load_task
from vpeft.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def index_of(shape=0, scale=5, orientation=0, x=15, y=15) -> int:
    return int(np.ravel_multi_index((0, shape, scale, orientation, x, y), ds.FACTOR_SIZES))


def one(**factors) -> np.ndarray:
    return ds.render(ds.latents_classes([index_of(**factors)]))[0]


def moments(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (x right, y up, pixels) and 2x2 covariance of the sprite's pixels."""
    rows, cols = np.nonzero(img)
    pts = np.stack([cols + 0.5, -(rows + 0.5)], axis=1)
    centre = pts.mean(0)
    d = pts - centre
    return centre, d.T @ d / len(d)


def rotation(theta: float) -> np.ndarray:
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


# -- the factors -------------------------------------------------------------------------------------


def test_factor_order_is_the_official_one():
    assert ds.N_IMAGES == 737_280
    c = ds.latents_classes(np.arange(ds.N_IMAGES))
    assert (c[:32, 5] == np.arange(32)).all() and (c[:32, :5] == 0).all()  # position y varies fastest
    assert c[32].tolist() == [0, 0, 0, 0, 1, 0] and c[-1].tolist() == [0, 2, 5, 39, 31, 31]
    v = ds.latents_values(c[[0, -1]])
    assert v[0].tolist() == [1, 1, 0.5, 0, 0, 0]
    assert v[1].tolist() == pytest.approx([1, 3, 1.0, 2 * np.pi, 1.0, 1.0])


def test_images_are_binary_64x64():
    rng = np.random.default_rng(1)
    imgs = ds.render(ds.latents_classes(rng.integers(0, ds.N_IMAGES, 300)))
    assert imgs.shape == (300, 64, 64) and imgs.dtype == np.uint8
    assert set(np.unique(imgs)) == {0, 1}
    assert (imgs.reshape(300, -1).sum(1) > 20).all()  # every sprite is visible
    border = np.concatenate([imgs[:, 0], imgs[:, -1], imgs[:, :, 0], imgs[:, :, -1]], axis=1)
    assert border.sum() == 0  # and whole: never clipped by the frame


def test_centroid_follows_the_position_factors():
    rng = np.random.default_rng(0)
    index = rng.integers(0, ds.N_IMAGES, 400)
    classes = ds.latents_classes(index)
    for img, c in zip(ds.render(classes), classes):
        (cx, cy), _ = moments(img)
        assert cx == pytest.approx(ds.centre_pixels(ds.POSITIONS[c[4]]), abs=0.6), c
        assert -cy == pytest.approx(ds.centre_pixels(ds.POSITIONS[c[5]]), abs=0.6), c  # rows grow downwards
    xs = [moments(one(x=x, shape=2))[0][0] for x in range(32)]
    assert np.all(np.diff(xs) > 0)


@pytest.mark.parametrize("shape", range(3))
def test_area_grows_with_scale(shape):
    for orientation in (0, 7, 23):
        areas = [int(one(shape=shape, scale=s, orientation=orientation).sum()) for s in range(6)]
        assert all(b > a for a, b in zip(areas, areas[1:])), (shape, areas)
        # the area goes with scale squared: four times from scale 0.5 to 1
        assert areas[-1] / areas[0] == pytest.approx(4.0, rel=0.12)
    square = one(shape=0, scale=5).sum()
    assert square == (2 * ds.UNIT) ** 2  # a 16-pixel square, axis-aligned at orientation 0


@pytest.mark.parametrize("shape", range(3))
def test_orientation_rotates_the_second_moments(shape):
    _, c0 = moments(one(shape=shape, scale=5, orientation=0))
    for k in (3, 10, 17, 26, 33):
        theta = ds.ORIENTATIONS[k]
        _, c = moments(one(shape=shape, scale=5, orientation=k))
        expected = rotation(theta) @ c0 @ rotation(theta).T
        assert c == pytest.approx(expected, abs=0.06 * np.trace(c0)), (shape, k)


def test_ellipse_major_axis_turns_with_orientation():
    for k in range(0, 40, 3):
        _, c = moments(one(shape=1, scale=5, orientation=k))
        values, vectors = np.linalg.eigh(c)
        major = vectors[:, 1]
        angle = np.arctan2(major[1], major[0]) % np.pi
        want = ds.ORIENTATIONS[k] % np.pi
        diff = min(abs(angle - want), np.pi - abs(angle - want))
        assert diff < np.radians(3), (k, np.degrees(angle), np.degrees(want))
        assert values[1] / values[0] == pytest.approx(4.0, rel=0.15)  # semi-axes 2:1


def test_the_three_shapes_differ():
    square, ellipse, heart = (one(shape=s, scale=5) for s in range(3))
    for a, b in ((square, ellipse), (square, heart), (ellipse, heart)):
        assert (a != b).sum() > 30
    _, c_square = moments(square)
    _, c_ellipse = moments(ellipse)
    assert c_square[0, 0] == pytest.approx(c_square[1, 1], rel=0.02)  # isotropic
    assert c_ellipse[0, 0] > 3 * c_ellipse[1, 1]  # long along x at orientation 0

    def skew_y(img):  # skewness of the pixels' heights
        rows, _ = np.nonzero(img)
        d = -(rows + 0.5) - np.mean(-(rows + 0.5))
        return float((d**3).mean() / (d**2).mean() ** 1.5)

    for scale in (0, 5):
        shapes = [one(shape=s, scale=scale) for s in range(3)]
        assert [abs(skew_y(img)) < 0.06 for img in shapes[:2]] == [True, True]  # symmetric top to bottom
        assert skew_y(shapes[2]) < -0.15  # the heart is not: its tip points down
    # a square is the same after a quarter turn (orientation 10 of 40 is 92.3 degrees: nearly the same)
    assert (one(shape=0, orientation=0) != one(shape=0, orientation=10)).sum() < 20
    assert (one(shape=2, orientation=0) != one(shape=2, orientation=10)).sum() > 30


def test_rendering_is_deterministic():
    index = np.random.default_rng(3).integers(0, ds.N_IMAGES, 500)
    a = ds.render(ds.latents_classes(index)).tobytes()
    b = ds.render(ds.latents_classes(index.copy())).tobytes()
    assert hashlib.sha256(a).hexdigest() == hashlib.sha256(b).hexdigest()


# -- VTAB's labels and splits --------------------------------------------------------------------------


def test_labels_are_vtabs_bins():
    # task_adaptation: label = floordiv(float32(class), float32(num_original / 16))
    loc, ori = ds.TASKS["dsprites_loc"], ds.TASKS["dsprites_ori"]
    assert (loc.tfds_feature, ori.tfds_feature) == ("label_x_position", "label_orientation")
    assert loc.division == 2.0 and ori.division == 2.5
    c = np.zeros((40, 6), dtype=np.int64)
    c[:, 3] = np.arange(40)
    c[:32, 4] = np.arange(32)
    want_ori = np.floor_divide(np.arange(40, dtype=np.float32), np.float32(40 / 16)).astype(np.int64)
    assert ori.labels(c).tolist() == want_ori.tolist()
    assert ori.labels(c)[:8].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert loc.labels(c[:32]).tolist() == [k // 2 for k in range(32)]
    everything = ds.latents_classes(np.arange(ds.N_IMAGES))
    assert np.bincount(loc.labels(everything)).tolist() == [ds.N_IMAGES // 16] * 16
    assert np.bincount(ori.labels(everything)).tolist() == [55296, 36864] * 8  # 3 and 2 orientations a bin
    assert len(loc.class_names()) == len(ori.class_names()) == 16
    # the labels come from x alone (loc) or orientation alone (ori)
    assert loc.labels(np.array([[0, 2, 5, 39, 7, 31]]))[0] == 3 and ori.labels(np.array([[0, 2, 5, 7, 31, 0]]))[0] == 2


def test_split_sizes_and_draws():
    parts = ds.partition()
    assert [len(parts[k]) for k in ("train", "val", "test")] == [589_824, 73_728, 73_728]
    slices = {k: set(v.tolist()) for k, v in parts.items()}
    got = {s: ds.split_indices(s, 0, ds.DEFAULT_TEST_SIZE) for s in ("train800", "val200", "train800val200", "test")}
    assert {s: len(v) for s, v in got.items()} == {
        "train800": 800,
        "val200": 200,
        "train800val200": 1000,
        "test": ds.DEFAULT_TEST_SIZE,
    }
    assert set(got["train800"].tolist()) <= slices["train"] and set(got["val200"].tolist()) <= slices["val"]
    assert set(got["test"].tolist()) <= slices["test"]
    assert got["train800val200"].tolist() == got["train800"].tolist() + got["val200"].tolist()
    assert len(ds.split_indices("test", 0, None)) == 73_728
    # the test images never depend on split_seed; the draws do; test_size takes a prefix
    assert (ds.split_indices("test", 5, 2000) == got["test"]).all()
    assert (ds.split_indices("test", 0, 500) == got["test"][:500]).all()
    assert not (ds.split_indices("train800", 1, 2000) == got["train800"]).all()


def test_load_task_regenerates_with_vtab_1k_splits(tmp_path):
    where = {"vtab_root": tmp_path / "vtab", "cache_dir": tmp_path / "cache", "test_size": 300}
    tune = load_task("dsprites_loc", "tune", (32, 32), **where)
    final = load_task("dsprites_ori", "final", (32, 32), **where)
    assert (len(tune.train), len(tune.eval), len(final.train), len(final.eval)) == (800, 200, 1000, 300)
    assert tune.num_classes == final.num_classes == 16
    for task in (tune, final):
        assert task.source.startswith("regenerated:dsprites (not read from the official file")
        assert task.train.images.shape[1] == 3  # grayscale made 3-channel
        assert (task.train.images[:, 0] == task.train.images[:, 1]).all()
        assert task.train.images.max() == 255 and task.train.images.min() == 0
    assert "label_x_position" in tune.source and "label_orientation" in final.source
    assert "the first 300 of the last-10% test slice" in final.source
    # labels are the binned factors of the drawn images
    index = ds.split_indices("train800", 0, 300)
    assert tune.train.labels.tolist() == (ds.latents_classes(index)[:, 4] // 2).tolist()
    # the same bytes on a second build (fresh cache) and from the cache
    again = load_task("dsprites_loc", "tune", (32, 32), **{**where, "cache_dir": tmp_path / "cache2"})
    assert torch.equal(again.train.images, tune.train.images) and torch.equal(again.eval.labels, tune.eval.labels)
    cached = load_task("dsprites_loc", "tune", (32, 32), **where)
    assert cached.cache_hit and torch.equal(cached.train.images, tune.train.images)
    assert (tmp_path / "vtab").exists() is False  # nothing written where task folders live


def test_test_size_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="test_size"):
        load_task("dsprites_loc", "final", (32, 32), vtab_root=tmp_path, test_size=0)
    with pytest.raises(ConfigError, match="exceeds"):
        load_task("dsprites_loc", "final", (32, 32), vtab_root=tmp_path, test_size=80_000)


def test_an_explicit_missing_root_is_an_error_not_a_regeneration(tmp_path):
    with pytest.raises(DataError, match="no task folder"):
        load_task("dsprites_loc", "tune", (32, 32), root=tmp_path / "nowhere", vtab_root=tmp_path / "vtab")


def test_a_task_folder_is_read_as_it_is(tmp_path):
    sizes = {"train800": 800, "val200": 200, "train800val200": 1000, "test": 9}  # a VTAB-1k folder's splits
    folder = small_task(tmp_path / "vtab" / "dsprites_ori", n=sizes, num_classes=16)
    task = load_task("dsprites_ori", "final", (8, 8), vtab_root=tmp_path / "vtab", test_size=100)
    assert task.source.startswith("folder") or str(folder) in task.source
    assert "regenerated" not in task.source and len(task.eval) == 9  # the folder's own test list


# -- the official file -----------------------------------------------------------------------------------


def write_npz(path: Path, n: int = 2400) -> tuple[np.ndarray, np.ndarray]:
    """A small file with the official keys: n images taken through the factor space, as the official ones are."""
    index = np.random.default_rng(7).choice(ds.N_IMAGES, n, replace=False)
    classes = ds.latents_classes(np.sort(index))
    imgs = ds.render(classes)
    imgs[:, 0, 0] = 1  # a mark the regenerated images never carry: the file's pixels are what is read
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path, imgs=imgs, latents_values=ds.latents_values(classes), latents_classes=classes, metadata=np.array([0])
    )
    return imgs, classes


@pytest.mark.parametrize("place", ["task_folder", "vtab_root", "root_is_the_file"])
def test_the_official_npz_is_read_when_present(tmp_path, place):
    vtab = tmp_path / "vtab"
    path = {"task_folder": vtab / "dsprites_loc", "vtab_root": vtab, "root_is_the_file": tmp_path / "f"}[place]
    imgs, classes = write_npz(path / ds.OFFICIAL_FILE)
    extra = {"root": path / ds.OFFICIAL_FILE} if place == "root_is_the_file" else {}
    task = load_task("dsprites_loc", "final", (64, 64), interpolation="nearest", vtab_root=vtab, test_size=100, **extra)
    assert task.source.startswith(f"npz:{path / ds.OFFICIAL_FILE} (the official dSprites file, 2,400 images")
    assert "regenerated" not in task.source
    assert (len(task.train), len(task.eval)) == (1000, 100)
    for split, got in (("train800val200", task.train), ("test", task.eval)):
        index = ds.split_indices(split, 0, 100, n=2400)
        assert torch.equal(got.images[:, 0], torch.from_numpy(imgs[index] * 255))
        assert got.labels.tolist() == (classes[index, 4] // 2).tolist()
        assert (got.images[:, :, 0, 0] == 255).all()  # the file's pixels, not regenerated ones


def test_a_broken_npz_is_a_data_error(tmp_path):
    path = tmp_path / "dsprites_ori" / ds.OFFICIAL_FILE
    path.parent.mkdir()
    np.savez(path, imgs=np.zeros((2400, 64, 64), np.uint8))  # no latents_classes
    with pytest.raises(DataError, match="latents_classes"):
        load_task("dsprites_ori", "tune", (32, 32), vtab_root=tmp_path)


# -- a run ---------------------------------------------------------------------------------------------------


def test_tiny_run_on_dsprites_loc_records_a_regenerated_source(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_run import QUICK, records, run_inproc

    from vpeft.results import read_record

    record = run_inproc(
        tmp_path,
        *QUICK,
        "dataset=dsprites_loc",
        "dataset.test_size=200",
        f"paths.vtab_root={tmp_path / 'vtab'}",
        "protocol=final",
    )
    assert record["status"] == "ok"
    [path] = records(tmp_path)
    saved = read_record(path)
    assert saved["status"] == "ok" and saved["dataset"] == "dsprites_loc"
    assert saved["data_source"].startswith("regenerated:dsprites")
    assert saved["data"]["n_train"] == 1000 and saved["data"]["n_eval"] == 200 and saved["data"]["num_classes"] == 16
    assert 0.0 <= saved["metrics"]["top1"] <= 100.0
