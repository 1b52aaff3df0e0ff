"""Features computed once: the bare backbone's features of a probe split, kept in one safetensors file each.

The key covers everything the features depend on (the backbone and its weights, the split's pixels and
labels, the precision); the file carries a SHA-256 of its tensors, so a corrupt or tampered file is
detected, reported and recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vpeft.files import atomic_path

FORMAT = "vpeft.features/1"


def tensor_digest(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def feature_key(**parts: Any) -> str:
    """A digest of what the features depend on (JSON of ``parts``, sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def read_features(path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(features, labels) from ``path`` when it holds ``key``'s and its checksum holds; None otherwise (a corrupt
    file is reported)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        feats, labels = tensors["features"], tensors["labels"]
    except (OSError, SafetensorError, KeyError, ValueError, RuntimeError) as e:
        warnings.warn(f"feature cache {path} is unreadable ({e}): computing the features again", stacklevel=2)
        return None
    if meta.get("format") != FORMAT or meta.get("key") != key or meta.get("sha256") != tensor_digest(feats, labels):
        warnings.warn(f"feature cache {path} does not match its checksum or key: computing the features again",
                      stacklevel=2)  # fmt: skip
        return None
    return feats, labels


def write_features(path: Path, key: str, features: torch.Tensor, labels: torch.Tensor, **info: str) -> Path:
    """Write (features, labels) atomically with their key and checksum."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"features": features.contiguous(), "labels": labels.contiguous()}
    meta = {"format": FORMAT, "key": key, "sha256": tensor_digest(features, labels), **info}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def cache_file(root: str | os.PathLike, key: str) -> Path:
    return Path(root) / f"{key}.safetensors"
