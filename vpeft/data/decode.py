"""Decode images of any mode and size into one uint8 ``[N, 3, H, W]`` tensor, on a thread pool.

PIL releases the GIL while it decodes and resamples, so threads give a real speed-up without the
pickling cost of processes. Every image is converted the same way, whatever its mode, so the
engine can assume RGB at the backbone's input size.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import numpy as np
import torch
from PIL import Image

from vpeft.errors import ConfigError, DataError
from vpeft.progress import progress

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
PROGRESS_MIN = 2000  # splits at least this large show their progress (vpeft.progress)
_CHUNK = 64  # images per thread-pool job: large enough to amortise scheduling, small enough to balance


def resampling(interpolation: str) -> Image.Resampling:
    """PIL's filter for timm's interpolation name (``bicubic`` etc.)."""
    try:
        return INTERPOLATIONS[str(interpolation).lower()]
    except KeyError:
        valid = ", ".join(INTERPOLATIONS)
        raise ConfigError(f"unknown interpolation {interpolation!r}; valid: {valid}") from None


def _scale_16bit(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit int) grayscale to 8 bits by range, where PIL's convert would clip at 255."""
    arr = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    return Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8))  # 2-D uint8 -> mode L


def floats_to_uint8(values: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1], the convention of float images and arrays, as uint8 (``v * 255`` rounded half up).

    PIL's own convert would clip them to 0 or 1 out of 255, a black image; values outside [0, 1] or
    not finite have no such reading and are refused (the caller names the file).
    """
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError("float pixels must be finite; found NaN or infinite values")
    if values.size and (values.min() < 0 or values.max() > 1):
        raise ValueError(
            f"float pixels must lie in [0, 1], found {values.min():g} to {values.max():g}; "
            "save the image as 8-bit or scale it to [0, 1]"
        )
    return np.floor(values * 255 + 0.5).astype(np.uint8)


def to_rgb_or_l(img: Image.Image) -> Image.Image:
    """The image as RGB, or as L when it is grayscale (resampling one channel is three times cheaper).

    Alpha is dropped as torchvision's and timm's loaders drop it (``convert("RGB")``); palette
    images with transparency go through RGBA so PIL applies the palette correctly.
    """
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode in ("1", "LA", "La"):
        return img.convert("L")
    if mode == "F":  # 32-bit float (a float TIFF): [0, 1] scaled, not clipped
        return Image.fromarray(floats_to_uint8(np.asarray(img)))
    if mode == "I" or mode.startswith("I;16"):
        return _scale_16bit(img)
    if mode in ("P", "PA") and (mode == "PA" or "transparency" in img.info):
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


def to_array(img: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """One image as ``[H, W, 3]`` uint8 at ``size`` = (H, W)."""
    img = to_rgb_or_l(img)
    height, width = size
    if img.size != (width, height):
        img = img.resize((width, height), resample)
    if img.mode == "L":
        img = img.convert("RGB")
    arr = np.asarray(img)
    if arr.shape != (height, width, 3):  # PIL guarantees this; a plug-in that does not is a data problem
        raise DataError(f"decoded image has shape {arr.shape}, expected {(height, width, 3)}")
    return arr


_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def open_image(path: str) -> Image.Image:
    """Open and fully read one file, so truncated or corrupt data fails here, naming the file.

    Only regular files are opened: reading a FIFO or a device listed by mistake would block the
    run forever (or read without end) instead of failing.
    """
    try:
        kind = stat.S_IFMT(os.stat(path).st_mode)
    except FileNotFoundError:
        raise DataError(f"image file missing: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    if kind != stat.S_IFREG:
        raise DataError(f"{path} is {_KINDS.get(kind, 'not a regular file')}, not an image file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()  # the file closes with the context; the copy keeps mode and info
    except FileNotFoundError:
        raise DataError(f"image file missing: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from exc


def decode_images(
    n: int,
    load: Callable[[int], Image.Image],
    size: tuple[int, int],
    interpolation: str,
    num_workers: int | None = None,
    desc: str = "decode",
    describe: Callable[[int], str] | None = None,
) -> torch.Tensor:
    """Decode ``n`` images, ``load(i)`` giving the i-th, into a contiguous uint8 ``[n, 3, H, W]`` tensor.

    ``describe(i)`` names the i-th image in errors raised by ``load`` that are not already a
    DataError (e.g. a torchvision dataset failing on one sample).
    """
    resample = resampling(interpolation)
    height, width = size
    out = torch.empty((n, 3, height, width), dtype=torch.uint8)
    target = out.numpy()
    stop = threading.Event()

    def work(start: int) -> int:
        end = min(start + _CHUNK, n)
        for i in range(start, end):
            if stop.is_set():  # the decode is being abandoned: leave at once
                return i - start
            try:
                target[i] = to_array(load(i), size, resample).transpose(2, 0, 1)
            except DataError:
                raise
            except Exception as exc:  # name the sample; the original error stays chained
                where = describe(i) if describe else f"image {i}"
                raise DataError(f"cannot decode {where}: {type(exc).__name__}: {exc}") from exc
        return end - start

    workers = max(1, num_workers if num_workers is not None else (os.cpu_count() or 1))
    with progress(total=n, desc=desc, unit="img", enabled=n >= PROGRESS_MIN) as bar:
        if workers == 1 or n <= _CHUNK:
            for start in range(0, n, _CHUNK):
                bar.update(work(start))
        else:
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vpeft-decode")
            try:
                pending = {pool.submit(work, start) for start in range(0, n, _CHUNK)}
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for future in done:
                        bar.update(future.result())  # a chunk's error is raised here
            finally:
                # after an error, Ctrl-C or SIGTERM the queued chunks are dropped and the running ones stop
                # at their next image: the process ends in a moment, well inside a scheduler's grace
                # period before SIGKILL, instead of decoding the rest of the split first
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
    return out
