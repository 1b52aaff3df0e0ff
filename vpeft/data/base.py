"""The dataset layer's types: what a run receives, and what each source hands to the loader."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vpeft.data.decode import floats_to_uint8
from vpeft.errors import ConfigError
from vpeft.registry import Registry

# A cache file whose format version differs is never read: bump when decoding changes pixels.
FORMAT_VERSION = 1
N_TRAIN, N_VAL = 800, 200  # the VTAB-1k draw

LAYOUT = """\
    {root}/
      train800.txt  val200.txt  train800val200.txt  test.txt
                    # one line per image: "images/<split>/000000.jpg <label>" (path relative to the folder)
      images/<split>/000000.jpg ...
      classes.txt   # optional: label i is line i"""


def layout(root: object) -> str:
    """The VTAB-1k (NOAH) folder layout, drawn at ``root``, for error messages."""
    return LAYOUT.format(root=root)


@dataclass
class ImageSplit:
    """One split, decoded once: the engine indexes these tensors directly."""

    images: torch.Tensor  # uint8 [N, 3, H, W], contiguous, CPU
    labels: torch.Tensor  # int64 [N]
    name: str  # "train800", "val200", "train800val200", "test"

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TaskData:
    """A task under one protocol: the split trained on and the split evaluated on."""

    name: str
    num_classes: int
    classes: list[str] | None
    train: ImageSplit
    eval: ImageSplit
    source: str  # where the data came from, recorded with every run
    decode_seconds: float  # time spent decoding in this call (0 on a full cache hit)
    cache_hit: bool
    digest: str = ""  # what the two splits' content depends on (``data_digest``), recorded with every run


@dataclass
class Request:
    """The arguments of one ``load_task`` call, as a source sees them."""

    name: str
    protocol: str
    splits: tuple[str, str]  # (trained on, evaluated on) for the protocol
    root: str | None
    vtab_root: str | None
    download_root: str | None
    download: bool
    split_seed: int
    options: dict[str, Any] = field(default_factory=dict)

    def take_options(self, **defaults: Any) -> dict[str, Any]:
        """This source's options with defaults filled in; an unknown key is an error listing the valid ones."""
        unknown = sorted(set(self.options) - set(defaults))
        if unknown:
            valid = ", ".join(sorted(defaults)) or "none"
            raise ConfigError(f"dataset {self.name!r} has no option(s) {', '.join(unknown)}; valid options: {valid}")
        return {**defaults, **self.options}


@dataclass
class SplitItems:
    """A split before decoding: how many images, how to open the i-th, and its label.

    ``load(i)`` returns ``(image, label)``; sources that know labels up front (list files) return
    them from memory, sources that learn them with the sample (torchvision) return the sample's.
    """

    name: str
    n: int
    load: Callable[[int], tuple[Image.Image, int]]
    describe: Callable[[int], str]  # names the i-th image in errors


@dataclass
class Prepared:
    """A source after its (possibly costly) opening: class names and the needed splits' items."""

    num_classes: int
    classes: list[str] | None
    splits: dict[str, SplitItems]


@dataclass
class Resolved:
    """A source resolved cheaply: enough to name and find its cached splits without opening it."""

    source: str  # human-readable provenance, recorded with the run
    identity: str  # what the splits' content depends on (hashed into the cache key)
    prepare: Callable[[tuple[str, ...]], Prepared]  # opens the source for the named splits
    splits: tuple[str, str] | None = None  # (train, eval) split names when not the protocol's own
    # what one split's pixels depend on beyond ``identity``, e.g. its image files' sizes and mtimes;
    # asked before every cache lookup, so it must stay cheap (stat calls, no image bytes read)
    split_identity: Callable[[str], str] | None = None
    # the protocol's data as a record keeps it, unchanged by any copy of the data elsewhere (paths relative to the
    # folder, the files' bytes: ``folder.content_digest``), given the data cache folder to remember it in (or None);
    # None: ``identity`` and each ``split_identity``
    digest: Callable[[Path | None], str] | None = None


def array_items(name: str, images: np.ndarray, labels: np.ndarray, where: str) -> SplitItems:
    """Items over in-memory arrays (``[N, H, W]`` grayscale or ``[N, H, W, 3]`` RGB): uint8, or floats in [0, 1]."""
    floats = np.issubdtype(images.dtype, np.floating)
    if not (images.dtype == np.uint8 or floats) or images.ndim not in (3, 4):
        raise ValueError(f"array_items needs uint8 or float [N,H,W] or [N,H,W,3], got {images.dtype} {images.shape}")

    def load(i: int) -> tuple[Image.Image, int]:
        pixels = floats_to_uint8(images[i]) if floats else images[i]
        return Image.fromarray(pixels), int(labels[i])  # 2-D uint8 -> L, [H,W,3] -> RGB

    return SplitItems(name, len(labels), load, lambda i: f"{where}[{i}]")


def seeded_permutation(n: int, seed: int) -> np.ndarray:
    """The draw order every source uses: numpy's PCG64 seeded with ``seed``, stable across platforms."""
    return np.random.default_rng(seed).permutation(n)


DATASETS: Registry[Callable[[Request], Resolved]] = Registry("dataset")
