"""Decoded splits on disk: one safetensors file per (source, split, size, interpolation).

Decoding and resizing a test split of 10k-20k images takes minutes; reading the same pixels back
from a safetensors file takes about a second. Files are written once, atomically, with a CRC-32 of
their content, metadata included; a file that fails to read back whole, or whose content no longer
matches its checksum, is warned about and rebuilt. The cache only saves time: a folder that cannot
be written is warned about and loading goes on without it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import struct
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from vpeft.data.base import FORMAT_VERSION

log = logging.getLogger(__name__)

STALE_SECONDS = 3600  # a temp file untouched this long belongs to a writer that died (a write rewrites it)
_DTYPES = {torch.uint8: "U8", torch.int64: "I64"}


class CacheWarning(UserWarning):
    """The decoded-data cache could not be used as is; loading went on (decoding again, or not caching)."""


@dataclass
class CachedSplit:
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    classes: list[str] | None
    source: str


def cache_key(identity: str, split: str, size: tuple[int, int], interpolation: str, files: str = "") -> str:
    """A digest of everything the decoded pixels depend on; ``files`` covers the split's own source files."""
    parts = {
        "format": FORMAT_VERSION,
        "identity": identity,
        "split": split,
        "size": list(size),
        "interpolation": interpolation,
    }
    if files:
        parts["files"] = files
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_path(
    cache_dir: str | os.PathLike, name: str, split: str, size: tuple[int, int], interp: str, key: str
) -> Path:
    """Readable file name (task, split, size) plus the key that makes it unique."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-{split}-{size[0]}x{size[1]}-{interp}")
    return Path(cache_dir) / f"{stem}-{key[:16]}.safetensors"


CHECKSUM = "crc32-meta"  # what ``checksum`` covers, named in its value; "crc32" (the tensors only) is rebuilt


def checksum(images: torch.Tensor, labels: torch.Tensor, meta: dict[str, str]) -> str:
    """CRC-32 of the metadata (every field but the checksum), then the labels' and the images' bytes.

    The metadata counts as content: a ``num_classes`` edited in the header would size the head. About
    0.15 s per GB, so a cache hit stays cheap.
    """
    fields = {k: v for k, v in meta.items() if k != "checksum"}
    crc = zlib.crc32(json.dumps(fields, sort_keys=True).encode())
    for tensor in (labels, images):
        crc = zlib.crc32(tensor.contiguous().numpy(), crc)
    return f"{CHECKSUM}:{crc:08x}"


def warn(message: str) -> None:
    """A CacheWarning pointing at the caller of ``load_task``: the cache is skipped, never fatal."""
    warnings.warn(message, CacheWarning, stacklevel=3)


def read(path: Path, key: str, size: tuple[int, int]) -> CachedSplit | None:
    """The cached split at ``path``, or None when it is absent, stale, unreadable or fails its checksum."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                raise ValueError("its key differs from the requested one")
            if not meta.get("checksum", "").startswith(f"{CHECKSUM}:"):  # written before it covered the metadata
                log.info("cache file %s has no checksum of its metadata; decoding again", path)
                return None
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
        ok = (
            images.dtype == torch.uint8
            and labels.dtype == torch.int64
            and images.ndim == 4
            and tuple(images.shape[1:]) == (3, *size)
            and labels.shape == (images.shape[0],)
        )
        if not ok:
            raise ValueError("contents do not match the key")
        found = checksum(images, labels, meta)
        if found != meta["checksum"]:
            raise ValueError(f"checksum mismatch: content {found}, written as {meta['checksum']}")
        classes = json.loads(meta["classes"])
        return CachedSplit(images, labels, int(meta["num_classes"]), classes, meta["source"])
    except Exception as exc:  # any failure to read back whole means: rebuild
        warn(f"ignoring cache file {path} ({type(exc).__name__}: {exc}); decoding again")
        return None


# ---- writing -------------------------------------------------------------------------------------

_HOST = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname()) or "host"
# ".<target>.<host>.<pid>.<token>.tmp" (this writer), or "<target>.<random>.tmp" (mkstemp, older versions)
_TEMP = re.compile(r"^\.?(?P<target>.+\.safetensors)\.(?:(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.)?[A-Za-z0-9_]+\.tmp$")


def temp_name(target: str, pid: int | None = None, host: str | None = None) -> str:
    """The hidden temp file a writer fills before renaming it to ``target``; host and pid say whose it is."""
    return f".{target}.{host or _HOST}.{os.getpid() if pid is None else pid}.{secrets.token_hex(4)}.tmp"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def sweep(folder: Path, now: float | None = None) -> list[Path]:
    """Remove temp files that writers killed mid-write left behind (each as big as a split); return them.

    A temp file goes when it is older than ``STALE_SECONDS``, or when its name says it is this
    host's and its process is gone. Anything else in the folder is left alone.
    """
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not entry.is_file(follow_symlinks=False):
            continue
        dead = match["pid"] is not None and match["host"] == _HOST and not _alive(int(match["pid"]))
        if now - st.st_mtime > STALE_SECONDS or dead:
            try:
                os.unlink(entry.path)
            except OSError:
                continue
            log.info("removed %s, left by an interrupted cache write", entry.path)
            removed.append(Path(entry.path))
    return removed


def _header(images: torch.Tensor, labels: torch.Tensor, meta: dict[str, str]) -> bytes:
    """The safetensors header: little-endian u64 length, then JSON padded with spaces to 8 bytes."""
    fields: dict[str, object] = {"__metadata__": meta}
    offset = 0
    for name, tensor in (("images", images), ("labels", labels)):
        nbytes = tensor.numel() * tensor.element_size()
        fields[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(fields, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text


def write(
    path: Path,
    key: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    classes: list[str] | None,
    source: str,
) -> None:
    """Write atomically (temp file in the same folder, then rename): readers never see half a file.

    The file is written here in the safetensors format rather than by safetensors itself, whose
    Rust writer reports a full disk as a SafetensorError: this way every I/O failure is an OSError
    that the caller can tell from a bug. The file's mode follows the umask, like any file the user
    creates. Raises OSError when the folder cannot be created or written.
    """
    images, labels = images.contiguous(), labels.contiguous()
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    sweep(folder)
    meta = {
        "key": key,
        "format": str(FORMAT_VERSION),
        "num_classes": str(num_classes),
        "classes": json.dumps(classes),
        "source": source,
    }
    meta["checksum"] = checksum(images, labels, meta)
    for _ in range(100):
        tmp = folder / temp_name(path.name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise OSError(errno.EEXIST, "no free temp file name", str(folder))
    try:
        with open(fd, "wb") as f:
            f.write(_header(images, labels, meta))
            f.write(images.numpy())
            f.write(labels.numpy())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
