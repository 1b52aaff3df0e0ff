"""Builders of small on-disk datasets for tests/test_data.py: NOAH task folders, image folders, CLEVR."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

# the real VTAB-1k task in ../shared beside the checkout (where CI puts it), or where $VPEFT_CIFAR10_TASK says
# (scripts/gpu_check.py unpacks it elsewhere on a GPU machine)
SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_CIFAR10 = Path(os.environ.get("VPEFT_CIFAR10_TASK") or SHARED / "data" / "vtab-1k" / "cifar10")


def color_of(k: int) -> tuple[int, int, int]:
    """A colour that encodes ``k`` (< 65536) exactly, so a decoded solid image says which sample it was."""
    return (k % 256, k // 256, 77)


def index_of(images) -> np.ndarray:
    """Sample numbers back from solid images made with ``color_of`` (any size, any filter)."""
    px = images[:, :, 0, 0].long().numpy()
    assert (px[:, 2] == 77).all()
    return px[:, 0] + 256 * px[:, 1]


def solid(k: int, size: tuple[int, int] = (5, 4)) -> Image.Image:
    return Image.new("RGB", size, color_of(k))


def write_noah(
    root: Path,
    splits: dict[str, list[tuple[Image.Image, int]]],
    classes: list[str] | None = None,
    ext: str = "png",
) -> Path:
    """A task folder in the VTAB-1k (NOAH) layout: images/<split>/NNNNNN.<ext> and <split>.txt."""
    root.mkdir(parents=True, exist_ok=True)
    for split, samples in splits.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (img, label) in enumerate(samples):
            rel = f"images/{split}/{i:06d}.{ext}"
            img.save(root / rel)
            lines.append(f"{rel} {label}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def small_task(root: Path, n: dict[str, int] | None = None, num_classes: int = 3) -> Path:
    """A NOAH folder of solid colour images: sample k of split s has colour ``color_of(offset_s + k)``."""
    n = n or {"train800": 12, "val200": 6, "train800val200": 18, "test": 9}
    splits, offset = {}, 0
    for split, count in n.items():
        splits[split] = [(solid(offset + k), (offset + k) % num_classes) for k in range(count)]
        offset += 1000
    return write_noah(root, splits, classes=[f"class{c}" for c in range(num_classes)])


def write_imagefolder(root: Path, per_class: dict[str, tuple[int, int]]) -> dict[int, tuple[str, str]]:
    """root/{train,test}/<class>/*.png of solid colours; returns sample number -> (split dir, class)."""
    truth, k = {}, 0
    for cls, counts in per_class.items():
        for split, count in zip(("train", "test"), counts):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                solid(k).save(folder / f"img{i:04d}.png")
                truth[k] = (split, cls)
                k += 1
    return truth


def write_clevr(root: Path, counts: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    """A tiny CLEVR_v1.0 tree as torchvision's CLEVRClassification expects it under ``root/clevr``.

    Images are solid colours numbering the scene; scenes carry random objects with pixel_coords.
    """
    rng = np.random.default_rng(seed)
    data = root / "clevr" / "CLEVR_v1.0"
    (data / "scenes").mkdir(parents=True, exist_ok=True)
    scenes_of, k = {}, 0
    for split, count in counts.items():
        (data / "images" / split).mkdir(parents=True, exist_ok=True)
        scenes = []
        for i in range(count):
            name = f"CLEVR_{split}_{i:06d}.png"
            solid(k, (3, 3)).save(data / "images" / split / name)
            objects = [
                {"pixel_coords": [float(rng.uniform(0, 480)), float(rng.uniform(0, 320)), float(rng.uniform(7, 14))]}
                for _ in range(int(rng.integers(3, 11)))
            ]
            scenes.append({"image_filename": name, "objects": objects, "number": k})
            k += 1
        (data / "scenes" / f"CLEVR_{split}_scenes.json").write_text(json.dumps({"scenes": scenes}))
        scenes_of[split] = scenes
    return scenes_of
