"""dSprites for VTAB-1k's dsprites_loc and dsprites_ori: the official file when present, else regenerated.

dSprites (Matthey et al. 2017, github.com/deepmind/dsprites-dataset) holds every combination of
six factors exactly once, 737,280 binary 64x64 images, stored in a fixed order (the last factor
varies fastest)::

    color        1   white
    shape        3   square, ellipse, heart
    scale        6   linspace(0.5, 1, 6)
    orientation 40   linspace(0, 2 pi, 40)
    position x  32   linspace(0, 1, 32)
    position y  32   linspace(0, 1, 32)

VTAB (google-research/task_adaptation, ``data/dsprites.py``) predicts a binned factor with 16
classes: ``label = floor(factor_class / (num_factor_classes / 16))``, i.e. x position // 2 for
dsprites_loc and floor(orientation / 2.5) for dsprites_ori. It cuts tfds's shuffled train split
into 80% train, 10% val and the last 10% as test; VTAB-1k draws its 800 from the train slice and
its 200 from the val slice.

Sources, in this order (``root`` defaults to ``<vtab_root>/<task>``):

1. the official ``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz`` (keys ``imgs``,
   ``latents_values``, ``latents_classes``): ``root`` itself, or that file inside ``root``;
2. a task folder in the NOAH layout at ``root``: read as every VTAB-1k task folder is
   (``vtab_folder.resolve_vtab``), its own test list included;
3. the official npz in ``<vtab_root>`` or ``<vtab_root>/dsprites`` (one copy for both tasks);
4. otherwise the images are regenerated here (``render``), deterministically, and the record's
   ``data_source`` starts with ``regenerated:``. A ``root`` set elsewhere than the default that
   does not exist is an error, as for every VTAB-1k task: nothing is regenerated behind it.

The official generator (DeepMind's, written with the LOVE framework) is not public, so the
rasteriser follows the published factor definitions, not the original pixels. Its choices:
pixel (row i, column j) is sampled at its centre (j + 0.5, i + 0.5) of a 64-pixel frame; a
sprite's centroid sits at ``64 * (0.2 + 0.6 * position)`` along x (columns, rightwards) and y
(rows, downwards), so the largest sprite never leaves the frame; at scale 1 the square has a
16-pixel side, the ellipse semi-axes of 11.6 and 5.8 pixels (major axis horizontal at
orientation 0), the heart (the curve (u^2 + v^2 - 1)^3 <= u^2 v^3, tip down at orientation 0,
centred on its centroid) a width of 20 pixels; orientation turns the sprite anticlockwise as
displayed; pixels are 0 or 1 as in the official ``imgs``, and 0 or 255 once they reach the
pipeline (VTAB multiplies by 255), grayscale, made 3-channel by the decoder like every
grayscale source.

Splits, the same for the official file and the regenerated set (both enumerate the factors in the
official order): a fixed permutation (seed ``PARTITION_SEED``) stands for tfds's shuffle; its first
80% are the train slice, the next 10% the val slice, the last 10% (73,728 images) the test slice.
train800 is a ``split_seed`` draw from the train slice, val200 one from the val slice,
train800val200 their union; test is the first ``test_size`` images of the test slice (default
``DEFAULT_TEST_SIZE`` so that CPU runs stay small; ``test_size=null`` takes all 73,728, as VTAB
does). The test images never depend on ``split_seed``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np

from vpeft.data.base import N_TRAIN, N_VAL, Prepared, Request, Resolved, array_items, seeded_permutation
from vpeft.data.vtab_folder import resolve_vtab
from vpeft.errors import ConfigError, DataError

OFFICIAL_FILE = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
FACTORS = ("color", "shape", "scale", "orientation", "position_x", "position_y")
FACTOR_SIZES = (1, 3, 6, 40, 32, 32)
N_IMAGES = int(np.prod(FACTOR_SIZES))  # 737,280
SHAPES = ("square", "ellipse", "heart")
SCALES = np.linspace(0.5, 1.0, 6)
ORIENTATIONS = np.linspace(0.0, 2 * np.pi, 40)
POSITIONS = np.linspace(0.0, 1.0, 32)
IMAGE_SIZE = 64

# VTAB's splits of the shuffled data (task_adaptation/data/dsprites.py)
TRAIN_SPLIT_PERCENT, VAL_SPLIT_PERCENT = 80, 10
PARTITION_SEED = 0  # the fixed shuffle standing for tfds's
DEFAULT_TEST_SIZE = 2000  # first images of the 73,728-image test slice; null: all of them
GENERATOR_VERSION = 1  # bump when ``render`` changes pixels (it is part of the cache key)

# geometry of ``render``, in pixels of the 64-pixel frame
CENTRE_LO, CENTRE_SPAN = 0.2, 0.6  # centroid = 64 * (CENTRE_LO + CENTRE_SPAN * position)
UNIT = 8.0  # half the square's side at scale 1
ELLIPSE_AXES = (1.45, 0.725)  # semi-axes in UNITs
HEART_SIZE = 1.1  # the heart curve's coordinates times this, in UNITs
_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class DspritesTask:
    """One VTAB dSprites task: the factor it bins and into how many classes."""

    factor: str  # "position_x" or "orientation"
    tfds_feature: str  # its name in tfds / VTAB
    num_classes: int = 16

    @property
    def column(self) -> int:
        return FACTORS.index(self.factor)

    @property
    def division(self) -> float:
        """VTAB's ``class_division_factor``: original classes per class."""
        return FACTOR_SIZES[self.column] / self.num_classes

    def labels(self, latents_classes: np.ndarray) -> np.ndarray:
        """VTAB's ``floordiv(float(factor class), num_original / num_classes)``."""
        factor = np.asarray(latents_classes)[..., self.column].astype(np.float64)
        return np.floor_divide(factor, self.division).astype(np.int64)

    def class_names(self) -> list[str]:
        """Each class's range of factor values, e.g. ``x 0.000-0.032`` or ``orientation 0.0-18.5 deg``."""
        size = FACTOR_SIZES[self.column]
        classes = np.zeros((size, len(FACTORS)), dtype=np.int64)
        classes[:, self.column] = np.arange(size)
        members = self.labels(classes)
        names = []
        for c in range(self.num_classes):
            lo, hi = np.flatnonzero(members == c)[[0, -1]]
            if self.factor == "orientation":
                names.append(f"orientation {np.degrees(ORIENTATIONS[lo]):.1f}-{np.degrees(ORIENTATIONS[hi]):.1f} deg")
            else:
                names.append(f"x {POSITIONS[lo]:.3f}-{POSITIONS[hi]:.3f}")
        return names


TASKS: dict[str, DspritesTask] = {
    "dsprites_loc": DspritesTask("position_x", "label_x_position"),
    "dsprites_ori": DspritesTask("orientation", "label_orientation"),
}


# ---- factors and rendering ------------------------------------------------------------------------


def latents_classes(index: np.ndarray | int) -> np.ndarray:
    """Factor classes ``[N, 6]`` of images numbered in the official file's order."""
    index = np.asarray(index, dtype=np.int64)
    if index.size and (index.min() < 0 or index.max() >= N_IMAGES):
        raise ValueError(f"dSprites image numbers lie in [0, {N_IMAGES})")
    return np.stack(np.unravel_index(index, FACTOR_SIZES), axis=-1).astype(np.int64)


def latents_values(classes: np.ndarray) -> np.ndarray:
    """Factor values ``[N, 6]`` as the official ``latents_values`` (colour 1, shape 1..3)."""
    c = np.asarray(classes, dtype=np.int64).reshape(-1, len(FACTORS))
    return np.stack(
        [
            np.ones(len(c)),
            c[:, 1] + 1.0,
            SCALES[c[:, 2]],
            ORIENTATIONS[c[:, 3]],
            POSITIONS[c[:, 4]],
            POSITIONS[c[:, 5]],
        ],
        axis=1,
    )


def centre_pixels(position: np.ndarray | float) -> np.ndarray:
    """Where a position factor value puts the sprite's centroid, in pixels (0..64) along its axis."""
    return IMAGE_SIZE * (CENTRE_LO + CENTRE_SPAN * np.asarray(position, dtype=np.float64))


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u * u + v * v - 1.0) ** 3 - u * u * v**3 <= 0.0


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 1.0


def _ellipse(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u / ELLIPSE_AXES[0]) ** 2 + (v / ELLIPSE_AXES[1]) ** 2 <= 1.0


def _heart_at(u: np.ndarray, v: np.ndarray, lift: float) -> np.ndarray:
    return _heart(u / HEART_SIZE, v / HEART_SIZE + lift)


@functools.cache
def heart_centroid() -> float:
    """The heart curve's centroid height (its width is symmetric), on a fine grid: about 0.2935."""
    g = np.linspace(-1.5, 1.5, 3001)
    u, v = np.meshgrid(g, g)
    return float(v[_heart(u, v)].mean())


def render(classes: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 64, 64]`` images of 0 and 1 for factor classes ``[N, 6]`` (see the module's docstring)."""
    classes = np.asarray(classes, dtype=np.int64).reshape(-1, len(FACTORS))
    if len(classes) and ((classes < 0) | (classes >= np.array(FACTOR_SIZES))).any():
        raise ValueError(f"factor classes must lie below {FACTOR_SIZES}")
    out = np.empty((len(classes), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    grid = np.arange(IMAGE_SIZE, dtype=np.float64) + 0.5
    lift = heart_centroid()
    for start in range(0, len(classes), _CHUNK):
        c = classes[start : start + _CHUNK]
        unit = (UNIT * SCALES[c[:, 2]])[:, None, None]
        theta = ORIENTATIONS[c[:, 3]][:, None, None]
        cx = centre_pixels(POSITIONS[c[:, 4]])[:, None, None]
        cy = centre_pixels(POSITIONS[c[:, 5]])[:, None, None]
        dx = grid[None, None, :] - cx  # rightwards
        dy = cy - grid[None, :, None]  # upwards
        cos, sin = np.cos(theta), np.sin(theta)
        u = (cos * dx + sin * dy) / unit  # the sprite's own frame, turned back by theta
        v = (-sin * dx + cos * dy) / unit
        inside = np.empty(u.shape, dtype=bool)
        for k, test in enumerate((_square, _ellipse, functools.partial(_heart_at, lift=lift))):
            mine = c[:, 1] == k
            if mine.any():
                inside[mine] = test(u[mine], v[mine])
        out[start : start + _CHUNK] = inside
    return out


# ---- VTAB's splits --------------------------------------------------------------------------------


def partition(n: int = N_IMAGES) -> dict[str, np.ndarray]:
    """VTAB's train / val / test slices of ``n`` images (80% / 10% / rest) after the fixed shuffle."""
    perm = seeded_permutation(n, PARTITION_SEED)
    n_train = TRAIN_SPLIT_PERCENT * n // 100
    n_val = VAL_SPLIT_PERCENT * n // 100
    return {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}


def split_indices(split: str, split_seed: int, test_size: int | None, n: int = N_IMAGES) -> np.ndarray:
    """Image numbers of one VTAB-1k split."""
    parts = partition(n)
    if len(parts["train"]) < N_TRAIN or len(parts["val"]) < N_VAL:
        raise DataError(f"dSprites: {n} images give slices too small for {N_TRAIN}/{N_VAL}")
    train = parts["train"][seeded_permutation(len(parts["train"]), split_seed)[:N_TRAIN]]
    val = parts["val"][seeded_permutation(len(parts["val"]), split_seed)[:N_VAL]]
    if split == "train800":
        return train
    if split == "val200":
        return val
    if split == "train800val200":
        return np.concatenate([train, val])
    if split == "test":
        return parts["test"] if test_size is None else parts["test"][:test_size]
    raise ValueError(f"unknown split {split!r}")


# ---- the source -----------------------------------------------------------------------------------


def _test_size(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"dsprites: test_size must be a positive integer or null (all), got {value!r}")
    return int(value)


def _absolute(path: str | Path) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def _npz_in(path: Path | None) -> Path | None:
    """``path`` when it is an npz file, else the official file inside the folder ``path``, if there."""
    if path is None:
        return None
    path = path.expanduser()
    for candidate in (path, path / OFFICIAL_FILE):
        if candidate.is_file() and candidate.suffix == ".npz":
            return candidate
    return None


def load_official(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(imgs ``[N, 64, 64]``, latents_classes ``[N, 6]``) of an official dSprites npz, checked."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("imgs", "latents_classes") if k not in data.files]
            if missing:
                raise DataError(
                    f"{path}: no {', '.join(missing)} (an official dSprites npz holds imgs, latents_values, "
                    "latents_classes)"
                )
            imgs, classes = data["imgs"], data["latents_classes"]
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read it as the dSprites npz ({type(exc).__name__}: {exc})") from exc
    if imgs.ndim != 3 or classes.shape != (len(imgs), len(FACTORS)):
        raise DataError(f"{path}: imgs {imgs.shape} and latents_classes {classes.shape} do not pair")
    if len(classes) and ((classes < 0) | (classes >= np.array(FACTOR_SIZES))).any():
        raise DataError(f"{path}: latents_classes outside the factor sizes {FACTOR_SIZES}")
    return imgs, classes.astype(np.int64)


def _file_count(path: Path) -> int:
    """Images in an npz, from its imgs array's header (the pixels are not decompressed); its keys checked."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z, z.open("imgs.npy") as f:
            if "latents_classes.npy" not in z.namelist():
                raise DataError(
                    f"{path}: no latents_classes (an official dSprites npz holds imgs, latents_values, latents_classes)"
                )
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read(f)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a dSprites npz with an imgs array ({type(exc).__name__}: {exc})") from exc
    return int(shape[0])


def resolve_dsprites(name: str, req: Request) -> Resolved:
    """The official npz in the task's folder; else a NOAH task folder; else the npz under vtab_root;
    else regenerated images (see the module's docstring)."""
    task = TASKS[name]
    opts = req.take_options(test_size=DEFAULT_TEST_SIZE)
    test_size = _test_size(opts["test_size"])
    default = Path(req.vtab_root) / name if req.vtab_root else None
    folder = Path(req.root) if req.root is not None else default
    explicit = req.root is not None and (default is None or _absolute(req.root) != _absolute(default))
    npz = _npz_in(folder)
    if npz is None and folder is not None and os.path.lexists(folder.expanduser()):
        rest = {k: v for k, v in req.options.items() if k != "test_size"}  # a folder carries its own test list
        return resolve_vtab(name, dataclasses.replace(req, options=rest))
    if npz is None and req.vtab_root is not None:
        npz = _npz_in(Path(req.vtab_root)) or _npz_in(Path(req.vtab_root) / "dsprites")
    if npz is None and explicit:  # a root that is not there: the folder layout's error, nothing regenerated
        return resolve_vtab(name, dataclasses.replace(req, options={}))
    seed = req.split_seed
    rule = (
        f"label = floor({task.factor} class / {task.division:g}), {task.num_classes} classes as VTAB's "
        f"{task.tfds_feature}"
    )
    test_text = "all" if test_size is None else f"the first {test_size:,}"
    rest_pct = 100 - TRAIN_SPLIT_PERCENT - VAL_SPLIT_PERCENT
    splits = (
        f"VTAB-1k split built: {N_TRAIN} from the {TRAIN_SPLIT_PERCENT}% train slice and {N_VAL} from the "
        f"{VAL_SPLIT_PERCENT}% val slice of a fixed shuffle (seed {PARTITION_SEED}), seed {seed}; test: {test_text} "
        f"of the last-{rest_pct}% test slice"
    )
    if npz is not None:
        n = _file_count(npz)
        st = npz.stat()
        source = f"npz:{npz} (the official dSprites file, {n:,} images; {splits}; {rule})"
        identity = f"dsprites-npz:{name}|{_absolute(npz)}:{st.st_size}:{st.st_mtime_ns}|n={n}"
    else:
        n = N_IMAGES
        source = (
            f"regenerated:dsprites (not read from the official file: the {N_IMAGES:,}-image set rasterised by "
            f"vpeft.data.dsprites v{GENERATOR_VERSION} from the dSprites factor definitions; {splits}; {rule})"
        )
        identity = f"dsprites-regenerated:{name}|v{GENERATOR_VERSION}"
    identity += f"|partition={PARTITION_SEED}|seed={seed}|test={test_size}|{N_TRAIN}/{N_VAL}"
    n_test = n - TRAIN_SPLIT_PERCENT * n // 100 - VAL_SPLIT_PERCENT * n // 100
    if test_size is not None and test_size > n_test:
        raise ConfigError(f"{name}: test_size={test_size} exceeds the test slice of {n_test:,} images")

    def prepare(wanted: tuple[str, ...]) -> Prepared:
        official = load_official(npz) if npz is not None else None
        if official is not None and len(official[0]) != n:
            raise DataError(f"{npz}: holds {len(official[0])} images, its header said {n}; was it replaced?")
        items = {}
        for split in wanted:
            index = split_indices(split, seed, test_size, n)
            if official is not None:
                images = np.where(official[0][index] != 0, 255, 0).astype(np.uint8)  # 0/1 -> 0/255, as VTAB
                classes = official[1][index]
            else:
                classes = latents_classes(index)
                images = render(classes) * np.uint8(255)
            items[split] = array_items(split, images, task.labels(classes), f"{name}[{split}]")
        return Prepared(task.num_classes, task.class_names(), items)

    return Resolved(source, identity, prepare)
