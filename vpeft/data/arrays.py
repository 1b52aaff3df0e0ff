"""Real datasets that live on this machine as arrays: scikit-learn's digits and Debian's Fashion-MNIST.

Both give a VTAB-1k style task (800/200 seeded draw, full test split) with no network at all,
which makes them the defaults for smoke runs and tests.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import numpy as np

from vpeft.data.base import DATASETS, N_TRAIN, N_VAL, Prepared, Request, Resolved, array_items, seeded_permutation
from vpeft.errors import ConfigError, DataError

DIGITS_POOL = 1000  # digits: 800/200 come from this many, the other 797 are the test split


def digits_to_uint8(values: np.ndarray) -> np.ndarray:
    """sklearn's 0..16 ink levels to 0..255, rounding half up: v * 255 / 16."""
    v = np.asarray(values).astype(np.int64)
    return ((v * 255 + 8) // 16).astype(np.uint8)


def _draw(n_pool: int, seed: int) -> dict[str, np.ndarray]:
    perm = seeded_permutation(n_pool, seed)
    train, val = perm[:N_TRAIN], perm[N_TRAIN : N_TRAIN + N_VAL]
    return {"train800": train, "val200": val, "train800val200": perm[: N_TRAIN + N_VAL]}


@DATASETS.register("digits")
def digits(req: Request) -> Resolved:
    """scikit-learn's 1,797 handwritten 8x8 digits (UCI), shipped inside scikit-learn."""
    req.take_options()
    if req.root is not None:
        raise ConfigError("dataset 'digits' is read from scikit-learn and takes no root")
    seed = req.split_seed
    source = (
        f"sklearn:digits (1,797 8x8 images; {N_TRAIN}/{N_VAL} drawn from a {DIGITS_POOL}-image pool, "
        f"seed {seed}; the remaining {1797 - DIGITS_POOL} as test)"
    )
    identity = f"sklearn:digits|pool={DIGITS_POOL}|seed={seed}|{N_TRAIN}/{N_VAL}"

    def prepare(splits: tuple[str, ...]) -> Prepared:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise DataError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
        data = load_digits()
        images, labels = digits_to_uint8(data.images), np.asarray(data.target, dtype=np.int64)
        index = _draw(len(labels), seed)  # the pool is the first DIGITS_POOL of the seeded permutation
        index["test"] = np.sort(seeded_permutation(len(labels), seed)[DIGITS_POOL:])
        items = {s: array_items(s, images[index[s]], labels[index[s]], f"digits[{s}]") for s in splits}
        return Prepared(10, [str(d) for d in range(10)], items)

    return Resolved(source, identity, prepare)


# ---- Fashion-MNIST (IDX files) ----------------------------------------------------------------

FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format), gzipped or not, as a numpy array of unsigned bytes."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX element type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(f"{path}: IDX header says {dims} but holds {len(raw) - offset} bytes (truncated?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find(directory: Path, stem: str) -> Path | None:
    for d in (directory, directory / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def _package_dirs() -> list[Path]:
    """Folders where dpkg says the Debian package put its files (empty when it is not installed)."""
    if shutil.which("dpkg") is None:
        return []
    try:
        out = subprocess.run(["dpkg", "-L", FASHION_PACKAGE], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({Path(line).parent for line in out.stdout.splitlines() if "idx" in line and "ubyte" in line})


def fashion_files(root: str | None) -> dict[str, Path]:
    """The four IDX files, from ``root`` or from the Debian package; DataError naming both ways when absent."""
    candidates = [Path(root).expanduser()] if root is not None else [*FASHION_DIRS, *_package_dirs()]
    for directory in candidates:
        found = {key: _find(directory, stem) for key, stem in FASHION_FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    where = ", ".join(str(c) for c in candidates)
    names = ", ".join(f"{s}[.gz]" for s in FASHION_FILES.values())
    raise DataError(
        f"Fashion-MNIST files not found (looked in {where}; need {names}). "
        f"Install them with `apt-get install {FASHION_PACKAGE}`, or pass dataset.root=DIR holding the four IDX files."
    )


@DATASETS.register("fashion_mnist")
def fashion_mnist(req: Request) -> Resolved:
    """Fashion-MNIST (Zalando, 70k 28x28 grayscale) from its IDX files."""
    req.take_options()
    files = fashion_files(req.root)
    seed = req.split_seed
    folder = files["train_images"].parent
    source = (
        f"idx:{folder} (Fashion-MNIST; {N_TRAIN}/{N_VAL} drawn from the 60,000-image train split, "
        f"seed {seed}; official 10,000-image test)"
    )
    stats = [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files.values()]
    identity = "|".join(["fashion_mnist", *stats, f"seed={seed}", f"{N_TRAIN}/{N_VAL}"])

    def prepare(splits: tuple[str, ...]) -> Prepared:
        items = {}
        if any(s != "test" for s in splits):
            images, labels = read_idx(files["train_images"]), read_idx(files["train_labels"]).astype(np.int64)
            _check(images, labels, files["train_images"])
            for split, idx in _draw(len(labels), seed).items():
                if split in splits:
                    items[split] = array_items(split, images[idx], labels[idx], f"{files['train_images']}")
        if "test" in splits:
            images, labels = read_idx(files["test_images"]), read_idx(files["test_labels"]).astype(np.int64)
            _check(images, labels, files["test_images"])
            items["test"] = array_items("test", images, labels, f"{files['test_images']}")
        from torchvision.datasets import FashionMNIST

        return Prepared(10, list(FashionMNIST.classes), items)

    return Resolved(source, identity, prepare)


def _check(images: np.ndarray, labels: np.ndarray, path: Path) -> None:
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"{path}: {images.shape} images do not pair with {labels.shape} labels")
    bad = np.flatnonzero((labels < 0) | (labels >= 10))
    if len(bad):
        raise DataError(f"{path}: label {labels[bad[0]]} at index {bad[0]} outside [0, 10)")
