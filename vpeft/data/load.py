"""``load_task``: a task's two protocol splits as uint8 tensors at the backbone's input size.

Each split is decoded once and cached; a later call with the same source, split, size and
interpolation reads the cache and never opens an image file (or the network): a task folder's
images are only stat'ed, so that an edited image leads to a fresh decode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vpeft.data import cache, decode
from vpeft.data.base import DATASETS, ImageSplit, Request, Resolved, SplitItems, TaskData
from vpeft.errors import ConfigError, DataError
from vpeft.vtab import PROTOCOL_SPLITS

log = logging.getLogger(__name__)


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return DATASETS.names()


def _size(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in size):
        raise ConfigError(f"image_size must be (H, W) of positive integers, got {image_size!r}")
    return int(size[0]), int(size[1])


def _decode(name: str, items: SplitItems, size: tuple[int, int], interpolation: str, workers: int | None):
    if items.n == 0:
        raise DataError(f"{name}: split {items.name} is empty")
    labels = np.empty(items.n, dtype=np.int64)

    def load(i: int):
        image, labels[i] = items.load(i)
        return image

    images = decode.decode_images(
        items.n, load, size, interpolation, workers, desc=f"decoding {name} {items.name}", describe=items.describe
    )
    return images, torch.from_numpy(labels)


def _store(path: Path, key: str, split: cache.CachedSplit) -> bool:
    """Cache one decoded split; on an OSError (read-only or full disk) warn and return False.

    The cache only saves time, so a folder that cannot take the file must not cost the decoded data.
    """
    try:
        cache.write(path, key, split.images, split.labels, split.num_classes, split.classes, split.source)
    except OSError as exc:
        cache.warn(
            f"cannot write the data cache in {path.parent} ({type(exc).__name__}: {exc}); "
            "going on without caching (the next load decodes again)"
        )
        return False
    return True


def _resolve(name, protocol, root, vtab_root, download_root, download, split_seed, options):
    if protocol not in PROTOCOL_SPLITS:
        raise ConfigError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOL_SPLITS)}")
    if not isinstance(split_seed, (int, np.integer)):
        raise ConfigError(f"split_seed must be an integer, got {split_seed!r}")
    request = Request(
        name=name,
        protocol=protocol,
        splits=PROTOCOL_SPLITS[protocol],
        root=None if root is None else os.fspath(root),
        vtab_root=None if vtab_root is None else os.fspath(vtab_root),
        download_root=None if download_root is None else os.fspath(download_root),
        download=bool(download),
        split_seed=int(split_seed),
        options=dict(options),
    )
    return request, DATASETS.get(name)(request)


# the form of ``data_digest``: 2 hashes folders' image bytes (1 hashed their sizes and mtimes, which a copy without
# ``cp -p`` changes); a record keeps it beside its digest, and one of another form is not compared
DIGEST_VERSION = 2


def _digest(resolved: Resolved, splits: tuple[str, str], cache_dir: str | os.PathLike | None) -> str:
    if resolved.digest is not None:
        return resolved.digest(Path(cache_dir) if cache_dir is not None else None)
    parts = [resolved.identity] + [resolved.split_identity(s) if resolved.split_identity else "" for s in splits]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def data_digest(
    name: str,
    protocol: str,
    root: str | os.PathLike | None = None,
    vtab_root: str | os.PathLike | None = None,
    download_root: str | os.PathLike | None = None,
    download: bool = True,
    split_seed: int = 0,
    num_workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    **options,
) -> str:
    """The digest ``load_task`` gives its task (``TaskData.digest``), without decoding or downloading anything.

    A finished run asks it whether its data changed since (a relabelled split, an image replaced). For folders
    it hashes the list files and the images' bytes, so any copy of the data elsewhere keeps the digest, whatever
    its mtimes; with ``cache_dir`` the images are read once per state of their files and then remembered
    (``folder.content_digest``), so asking again costs stat calls only.
    """
    request, resolved = _resolve(name, protocol, root, vtab_root, download_root, download, split_seed, options)
    return _digest(resolved, resolved.splits or request.splits, cache_dir)


def check_task(
    name: str,
    protocol: str,
    root: str | os.PathLike | None = None,
    vtab_root: str | os.PathLike | None = None,
    download_root: str | os.PathLike | None = None,
    download: bool = True,
    split_seed: int = 0,
    num_workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    **options,
) -> None:
    """Find the task's source as ``load_task`` would, reading and downloading nothing: a wrong root,
    a missing list or an unknown option fails in a moment, before a run spends time on its backbone."""
    _resolve(name, protocol, root, vtab_root, download_root, download, split_seed, options)


def load_task(
    name: str,
    protocol: str,
    image_size: int | Sequence[int],
    interpolation: str = "bicubic",
    root: str | os.PathLike | None = None,
    vtab_root: str | os.PathLike | None = None,
    download_root: str | os.PathLike | None = None,
    download: bool = True,
    cache_dir: str | os.PathLike | None = None,
    split_seed: int = 0,
    num_workers: int | None = None,
    **options,
) -> TaskData:
    """Load ``name`` under ``protocol`` ("tune": train800 -> val200, "final": train800val200 -> test).

    Args:
        name: a registered dataset (``list_datasets()``): a VTAB-1k task, ``folder``, ``imagefolder``,
            ``digits`` or ``fashion_mnist``.
        image_size: (H, W) of the backbone input; every image is resized straight to it (VTAB-1k).
        interpolation: PIL filter named as in timm's data config (bicubic, bilinear, nearest, lanczos).
        root: the task's folder; for VTAB names it defaults to ``<vtab_root>/<name>``.
        download_root: where torchvision may download a VTAB task that has no folder
            (default ``~/.cache/vpeft/torchvision``); ``download=False`` never touches the network.
        cache_dir: where decoded splits are kept (None: no cache).
        split_seed: seed of the 800/200 draws this layer makes itself (folders carry their own).
        num_workers: decoding threads (default: all cores).
        **options: source options, e.g. imagefolder's ``n_train``, ``n_val``, ``subsample``.
    """
    size = _size(image_size)
    interpolation = str(interpolation).lower()
    decode.resampling(interpolation)  # a bad name fails before any work
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 1):
        raise ConfigError(f"num_workers must be a positive integer or None, got {num_workers!r}")
    request, resolved = _resolve(name, protocol, root, vtab_root, download_root, download, split_seed, options)
    names = resolved.splits or request.splits
    digest = _digest(resolved, names, cache_dir)

    found: dict[str, cache.CachedSplit] = {}
    files = {}
    if cache_dir is not None:
        for split in names:
            content = resolved.split_identity(split) if resolved.split_identity is not None else ""
            key = cache.cache_key(resolved.identity, split, size, interpolation, content)
            files[split] = (cache.cache_path(cache_dir, name, split, size, interpolation, key), key)
            hit = cache.read(files[split][0], key, size)
            if hit is not None:
                found[split] = hit
                log.info("%s %s: read from cache %s", name, split, files[split][0])

    missing = [split for split in names if split not in found]
    seconds = 0.0
    num_classes, classes = None, None
    if missing:
        start = time.perf_counter()
        prepared = resolved.prepare(tuple(missing))
        num_classes, classes = prepared.num_classes, prepared.classes
        writable = cache_dir is not None
        for split in missing:
            images, labels = _decode(name, prepared.splits[split], size, interpolation, num_workers)
            found[split] = cache.CachedSplit(images, labels, num_classes, classes, resolved.source)
            if writable:
                path, key = files[split]
                writable = _store(path, key, found[split])
                if writable:
                    log.info("%s %s: cached at %s", name, split, path)
        seconds = time.perf_counter() - start
    else:
        num_classes, classes = found[names[0]].num_classes, found[names[0]].classes

    train, evaluation = found[names[0]], found[names[1]]
    return TaskData(
        name=name,
        num_classes=num_classes,
        classes=classes,
        train=ImageSplit(train.images, train.labels, names[0]),
        eval=ImageSplit(evaluation.images, evaluation.labels, names[1]),
        source=resolved.source,
        decode_seconds=seconds,
        cache_hit=not missing,
        digest=digest,
    )
