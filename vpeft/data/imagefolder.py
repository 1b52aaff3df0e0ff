"""Class-subfolder datasets (torchvision's ImageFolder convention), sampled the VTAB-1k way.

``root/train/<class>/*`` gives the training data and ``root/test/<class>/*`` (or ``val/``) the
evaluation data. By default a seeded draw of ``n_train + n_val`` training images plays the part of
VTAB-1k's train800 / val200, so any folder of images becomes a 1k-example task.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from vpeft.data.base import DATASETS, Prepared, Request, Resolved, SplitItems, seeded_permutation
from vpeft.data.decode import open_image
from vpeft.data.folder import content_digest, file_signature
from vpeft.errors import ConfigError, DataError

LAYOUT = """\
    {root}/train/<class>/<image>   (one folder per class; classes sorted by name give labels 0, 1, ...)
    {root}/test/<class>/<image>    (or {root}/val/...; the same class names)"""


def _listing(directory: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    return make_dataset(directory, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)


def _digest(samples: list[tuple[str, int]], root: Path) -> str:
    """The cache key's part for the samples: relative paths, labels and exact stat fingerprints."""
    h = hashlib.sha256()
    for path, label in samples:
        h.update(f"{os.path.relpath(path, root)}\0{label}\0{file_signature(path, exact=True)}\n".encode())
    return h.hexdigest()


@DATASETS.register("imagefolder")
def imagefolder(req: Request) -> Resolved:
    """``root`` with ``train/`` and ``test/`` (or ``val/``) class subfolders."""
    opts = req.take_options(n_train=800, n_val=200, subsample=True)
    n_train, n_val, subsample = opts["n_train"], opts["n_val"], bool(opts["subsample"])
    for key in ("n_train", "n_val"):
        if not isinstance(opts[key], int) or opts[key] < 1:
            raise ConfigError(f"imagefolder option {key} must be a positive integer, got {opts[key]!r}")
    if req.root is None:
        raise ConfigError(f"dataset 'imagefolder' needs root=PATH laid out as:\n{LAYOUT.format(root='PATH')}")
    root = Path(req.root).expanduser().resolve()
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"no {train_dir} folder; an image folder dataset looks like:\n{LAYOUT.format(root=root)}")
    try:
        classes, class_to_idx = find_classes(train_dir)
    except FileNotFoundError:
        raise DataError(f"{train_dir} has no class folders; expected:\n{LAYOUT.format(root=root)}") from None
    train = _listing(train_dir, class_to_idx)
    if not train:
        raise DataError(f"{train_dir} holds no images ({', '.join(IMG_EXTENSIONS)}) in its class folders")

    final = req.protocol == "final"
    eval_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    evaluation: list[tuple[str, int]] = []
    if final:
        if eval_dir is None:
            raise DataError(
                f"protocol 'final' needs {root / 'test'} (or {root / 'val'}); expected:\n" + LAYOUT.format(root=root)
            )
        extra = sorted({e.name for e in os.scandir(eval_dir) if e.is_dir()} - set(classes))
        if extra:
            raise DataError(f"{eval_dir} has class folders absent from {train_dir}: {', '.join(extra)}")
        evaluation = _listing(eval_dir, class_to_idx)
        if not evaluation:
            raise DataError(f"{eval_dir} holds no images ({', '.join(IMG_EXTENSIONS)}) in its class folders")

    perm = seeded_permutation(len(train), req.split_seed)
    if subsample:
        if n_train + n_val > len(train):
            raise DataError(
                f"{train_dir} has {len(train)} images, fewer than n_train + n_val = {n_train + n_val}; "
                "lower them or pass subsample=False"
            )
        names = (f"train{n_train}", f"val{n_val}") if not final else (f"train{n_train}val{n_val}", eval_dir.name)
        chosen = {names[0]: perm[:n_train], names[1]: perm[n_train : n_train + n_val]}
        if final:
            chosen = {names[0]: perm[: n_train + n_val]}
        how = f"{n_train}/{n_val} seeded draw (seed {req.split_seed}) from train/"
    else:
        if final:
            names = ("train", eval_dir.name)
            chosen = {"train": np.arange(len(train))}
        else:
            if len(train) < 2:
                raise DataError(f"{train_dir} needs at least 2 images for an 80/20 tune split")
            n_hold = max(1, round(0.2 * len(train)))
            names = ("train80pct", "val20pct")
            chosen = {names[0]: perm[: len(train) - n_hold], names[1]: perm[len(train) - n_hold :]}
        how = f"all of train/ (tune: seeded 80/20 split, seed {req.split_seed})"
    source = f"imagefolder:{root} ({how}; eval on {names[1]})"

    samples = {name: [train[int(i)] for i in idx] for name, idx in chosen.items()}
    if final:
        samples[names[1]] = evaluation
    settings = ["imagefolder", f"n={n_train}/{n_val}", f"subsample={subsample}", f"seed={req.split_seed}"]
    identity = "|".join([*settings, str(root)] + [f"{n}:{_digest(s, root)}" for n, s in sorted(samples.items())])

    def digest(memo: Path | None) -> str:  # for records: what any copy of the folder elsewhere keeps
        parts = settings + [f"{n}:{content_digest(s, root, memo)}" for n, s in sorted(samples.items())]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def prepare(splits: tuple[str, ...]) -> Prepared:
        return Prepared(len(classes), list(classes), {s: _items(s, samples[s]) for s in splits})

    return Resolved(source, identity, prepare, splits=names, digest=digest)


def _items(split: str, samples: list[tuple[str, int]]) -> SplitItems:
    def load(i: int) -> tuple[Image.Image, int]:
        path, label = samples[i]
        return open_image(path), label

    return SplitItems(split, len(samples), load, lambda i: samples[i][0])
