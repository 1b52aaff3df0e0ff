"""VTAB-1k tasks built from torchvision datasets when no task folder exists, and the task-arithmetic
pool's tasks outside VTAB (MNIST, GTSRB, Stanford Cars) split the same way.

VTAB-1k draws 1,000 training images from a dataset's official training data (train and val
together where both exist), 800 to train on and 200 to validate with, and tests on the official
test split. Where torchvision has no official split, the tfds definition VTAB uses is followed and
the source string says so. The test split never depends on ``split_seed``.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vpeft.data.base import N_TRAIN, N_VAL, Prepared, Request, Resolved, SplitItems, layout, seeded_permutation
from vpeft.data.decode import open_image
from vpeft.errors import DataError, OfflineError

# Seed of the fixed train/test partitions carved out where torchvision has no official split.
PARTITION_SEED = 0


@dataclass(frozen=True)
class TorchvisionTask:
    """How one VTAB-1k task maps onto a torchvision dataset."""

    dataset: str  # class name in torchvision.datasets (or in this module, for derived labels)
    num_classes: int
    pool: tuple[dict[str, Any], ...]  # constructor kwargs of the official splits the 1k is drawn from
    test: dict[str, Any] | None  # the official test split; None: carved out of the data (below)
    test_fraction: float | None = None  # no official split: a fixed random share is the test split
    per_class_train: int | None = None  # no official split: this many per class train, the rest test
    target: Callable[[Any], int] | None = None  # dataset target -> VTAB label
    classes: tuple[str, ...] | None = None  # when the dataset object carries no class names
    requires: tuple[str, ...] = ()  # Python packages the torchvision class needs
    files_of: str | None = None  # the torchvision class whose files ``dataset`` reads, when not itself
    note: str = ""  # how it departs from VTAB's tfds definition, if at all

    def describe(self, split_seed: int) -> str:
        if self.test is not None:
            pool = "+".join(_split_name(kw) for kw in self.pool)
            name = _split_name(self.test)
            test = "official test" if name == "test" else f"official {name} split as test"
        elif self.test_fraction is not None:
            pool = f"the {1 - self.test_fraction:.0%} not held out"
            test = (
                f"no official split: a fixed {self.test_fraction:.0%} (seed {PARTITION_SEED}) held out as test, "
                "as tfds/VTAB define it"
            )
        else:
            pool = f"{self.per_class_train} images per class (fixed, seed {PARTITION_SEED})"
            test = "no official split: the rest as test, as tfds/VTAB define it"
        note = f"; {self.note}" if self.note else ""
        built = f"VTAB-1k split built: {N_TRAIN}/{N_VAL} from {pool}, seed {split_seed}"
        return f"torchvision:{self.files_of or self.dataset} ({built}; {test}{note})"


def _split_name(kwargs: dict[str, Any]) -> str:
    if "train" in kwargs:
        return "train" if kwargs["train"] else "test"
    return str(kwargs.get("split", "all"))


class CLEVRClosestObject:
    """CLEVR labelled with VTAB's clevr_dist target: the depth of the closest object, in 6 bins.

    VTAB bins the smallest ``pixel_coords[2]`` of a scene's objects at thresholds
    0, 8, 8.5, 9, 9.5, 10, 100; the scenes' JSON files carry the coordinates. torchvision's
    CLEVRClassification fetches and checks the files; this reads the same layout.
    """

    THRESHOLDS = np.array([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])

    def __init__(self, root: str, split: str = "train", download: bool = False):
        import torchvision.datasets as tvd

        tvd.CLEVRClassification(root, split=split, download=download)  # downloads or checks the files
        data = Path(root) / "clevr" / "CLEVR_v1.0"
        with open(data / "scenes" / f"CLEVR_{split}_scenes.json") as f:
            scenes = json.load(f)["scenes"]
        depth = {s["image_filename"]: min(o["pixel_coords"][2] for o in s["objects"]) for s in scenes}
        self.files = sorted((data / "images" / split).glob("*"))
        self.targets = [self.label(depth[f.name]) for f in self.files]

    @classmethod
    def label(cls, distance: float) -> int:
        """VTAB's ``argmax(thresholds - d > 0) - 1``: the bin whose lower edge is the last one <= d."""
        return int(np.searchsorted(cls.THRESHOLDS, distance, side="right")) - 1

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return open_image(str(self.files[i])), self.targets[i]


TASKS: dict[str, TorchvisionTask] = {
    "cifar100": TorchvisionTask("CIFAR100", 100, ({"train": True},), {"train": False}),
    "caltech101": TorchvisionTask(
        "Caltech101",
        101,
        ({},),
        None,
        per_class_train=30,
        note="101 classes: torchvision drops BACKGROUND_Google, which tfds/VTAB keep as a 102nd",
    ),
    "dtd": TorchvisionTask("DTD", 47, ({"split": "train"}, {"split": "val"}), {"split": "test"}),
    "oxford_flowers102": TorchvisionTask("Flowers102", 102, ({"split": "train"}, {"split": "val"}), {"split": "test"}),
    "oxford_iiit_pet": TorchvisionTask("OxfordIIITPet", 37, ({"split": "trainval"},), {"split": "test"}),
    "svhn": TorchvisionTask("SVHN", 10, ({"split": "train"},), {"split": "test"}, classes=tuple("0123456789")),
    "sun397": TorchvisionTask(
        "SUN397", 397, ({},), None, test_fraction=0.2, note="tfds's sun397/tfds split itself is not reproducible"
    ),
    "patch_camelyon": TorchvisionTask(
        "PCAM",
        2,
        ({"split": "train"}, {"split": "val"}),
        {"split": "test"},
        classes=("no metastatic tissue", "metastatic tissue"),
        requires=("h5py",),
    ),
    "eurosat": TorchvisionTask(
        "EuroSAT", 10, ({},), None, test_fraction=0.2, note="tfds's own order is not reproducible"
    ),
    "clevr_count": TorchvisionTask(
        "CLEVRClassification",
        8,
        ({"split": "train"},),
        {"split": "val"},
        target=lambda n: int(n) - 3,
        classes=tuple(str(k) for k in range(3, 11)),
        note="CLEVR's test split has no labels, so VTAB tests on val; label = number of objects - 3",
    ),
    "clevr_dist": TorchvisionTask(
        "CLEVRClosestObject",
        6,
        ({"split": "train"},),
        {"split": "val"},
        files_of="CLEVRClassification",
        note="CLEVR's test split has no labels, so VTAB tests on val; label = VTAB's closest-object depth bin "
        "from the scenes' JSON",
    ),
}

# The task-arithmetic pool (Ilharco et al., ICLR 2023: SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST,
# DTD) beyond VTAB-1k's tasks, with VTAB-1k's 800/200 drawn from the official train split and the
# official test split (the literature trains these on the whole train split: the source string says 1k).
EXTRA_TASKS: dict[str, TorchvisionTask] = {
    "mnist": TorchvisionTask("MNIST", 10, ({"train": True},), {"train": False}, classes=tuple("0123456789")),
    "gtsrb": TorchvisionTask(
        "GTSRB", 43, ({"split": "train"},), {"split": "test"}, classes=tuple(str(k) for k in range(43))
    ),
    "stanford_cars": TorchvisionTask(
        "StanfordCars",
        196,
        ({"split": "train"},),
        {"split": "test"},
        note="torchvision's download of Stanford Cars no longer works: its files go under the download root by hand",
    ),
}
TASKS.update(EXTRA_TASKS)


def _dataset_class(name: str) -> Callable[..., Any]:
    import torchvision.datasets as tvd

    return getattr(tvd, name) if hasattr(tvd, name) else globals()[name]


def _targets(ds: Any) -> np.ndarray:
    """All targets of a dataset, from its label list when it keeps one (no image decoding)."""
    for attr in ("targets", "y", "labels", "_labels"):
        values = getattr(ds, attr, None)
        if values is not None and len(values) == len(ds):
            return np.asarray(values, dtype=np.int64)
    return np.asarray([ds[i][1] for i in range(len(ds))], dtype=np.int64)


def _partition(spec: TorchvisionTask, ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """(train pool, test) indices of a dataset that torchvision does not split."""
    n = len(ds)
    rng = np.random.default_rng(PARTITION_SEED)
    if spec.test_fraction is not None:
        perm = rng.permutation(n)
        n_test = round(spec.test_fraction * n)
        return np.sort(perm[n_test:]), np.sort(perm[:n_test])
    targets = _targets(ds)
    train, test = [], []
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        train.append(idx[: spec.per_class_train])
        test.append(idx[spec.per_class_train :])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _ways_out(name: str, spec: TorchvisionTask, folder: str, download_root: str) -> str:
    cls = spec.files_of or spec.dataset
    return (
        "Two ways out:\n"
        f"  1. put the task folder at {folder}, laid out as\n{layout(folder)}\n"
        f"  2. put the files torchvision.datasets.{cls} reads under {download_root} "
        f"(run torchvision.datasets.{cls}({download_root!r}, download=True) once where the network "
        "is reachable and copy the result), then load again."
    )


def resolve_torchvision(name: str, req: Request, folder: str, download_root: str) -> Resolved:
    """The task built from torchvision: identity is known without opening the dataset, so cache hits are free."""
    spec = TASKS[name]
    source = spec.describe(req.split_seed)
    identity = f"torchvision:{name}|{spec.dataset}|{spec.pool}|{spec.test}|{spec.test_fraction}|"
    identity += f"{spec.per_class_train}|partition={PARTITION_SEED}|seed={req.split_seed}|{N_TRAIN}/{N_VAL}"
    fetched = spec.files_of or spec.dataset  # the torchvision class whose files are needed

    def open_split(kwargs: dict[str, Any]) -> Any:
        for package in spec.requires:
            if importlib.util.find_spec(package) is None:
                raise DataError(f"{name}: torchvision.datasets.{spec.dataset} needs {package}: pip install {package}")
        cls = _dataset_class(spec.dataset)
        try:
            return cls(download_root, **kwargs, download=False)
        except (RuntimeError, OSError) as missing:
            if not req.download:
                raise DataError(
                    f"{name}: no task folder at {folder}, and torchvision.datasets.{fetched} found no files "
                    f"under {download_root} ({missing}); download=False forbids fetching them. "
                    + _ways_out(name, spec, folder, download_root)
                ) from missing
        try:
            return cls(download_root, **kwargs, download=True)
        except (OSError, RuntimeError, ValueError, ImportError) as exc:
            raise OfflineError(
                f"{name}: no task folder at {folder}, and torchvision could not download {fetched} "
                f"into {download_root} ({type(exc).__name__}: {exc}). " + _ways_out(name, spec, folder, download_root)
            ) from exc

    def prepare(splits: tuple[str, ...]) -> Prepared:
        pool_sets = [open_split(kw) for kw in spec.pool]
        if spec.test is None:
            (whole,) = pool_sets
            pool_idx, test_idx = _partition(spec, whole)
            pool = [(whole, int(i)) for i in pool_idx]
            test_ds = whole
        else:
            pool = [(ds, i) for ds in pool_sets for i in range(len(ds))]
            test_ds, test_idx = None, None
        if len(pool) < N_TRAIN + N_VAL:
            raise DataError(f"{name}: {spec.dataset} has {len(pool)} training images, fewer than {N_TRAIN + N_VAL}")
        perm = seeded_permutation(len(pool), req.split_seed)
        draws = {"train800": perm[:N_TRAIN], "val200": perm[N_TRAIN : N_TRAIN + N_VAL]}
        draws["train800val200"] = perm[: N_TRAIN + N_VAL]  # train800 then val200
        items = {}
        for split in splits:
            if split == "test":
                if test_ds is None:
                    test_ds = open_split(spec.test)
                    test_idx = np.arange(len(test_ds))
                chosen = [(test_ds, int(i)) for i in test_idx]
            else:
                chosen = [pool[int(k)] for k in draws[split]]
            items[split] = _items(name, spec, split, chosen)
        classes = getattr(pool_sets[0], "classes", None) or getattr(pool_sets[0], "categories", None) or spec.classes
        classes = list(classes) if classes is not None and len(classes) == spec.num_classes else None
        return Prepared(spec.num_classes, classes, items)

    return Resolved(source, identity, prepare)


def _items(name: str, spec: TorchvisionTask, split: str, chosen: list[tuple[Any, int]]) -> SplitItems:
    def load(k: int) -> tuple[Image.Image, int]:
        ds, i = chosen[k]
        image, target = ds[i]
        label = spec.target(target) if spec.target else int(target)
        if not 0 <= label < spec.num_classes:
            raise DataError(
                f"{name}: {spec.dataset} sample {i} has label {label}, outside [0, {spec.num_classes}) ({split})"
            )
        return image, label

    return SplitItems(split, len(chosen), load, lambda k: f"{spec.dataset} sample {chosen[k][1]} ({name} {split})")
