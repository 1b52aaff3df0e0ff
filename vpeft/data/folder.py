"""Task folders in the VTAB-1k (NOAH) layout: four list files of ``<image path> <label>`` lines.

This is the layout the public VTAB-1k mirrors and most vision-PEFT code read; see
``vpeft.data.base.LAYOUT``. Parsing is liberal (any relative or absolute path, any extension PIL
reads, paths with spaces), checking is strict (every label in range, every image readable).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vpeft.data.base import DATASETS, Prepared, Request, Resolved, SplitItems, layout
from vpeft.data.decode import open_image
from vpeft.errors import ConfigError, DataError
from vpeft.files import write_text_atomic
from vpeft.vtab import NUM_CLASSES, SPLIT_SIZES, SPLITS


@dataclass(frozen=True)
class Entry:
    path: Path  # the image file
    label: int
    list_file: Path
    line: int  # 1-based line in list_file

    def where(self) -> str:
        return f"{self.list_file} line {self.line}"


def read_list(list_file: Path) -> list[Entry]:
    """Parse one list file; the label is the last whitespace-separated field, the path the rest.

    Read as ``utf-8-sig``: editors on Windows start files with a byte-order mark, which would
    otherwise become an invisible first character of the first path.
    """
    root = list_file.parent
    entries = []
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"split list {list_file} is missing; a task folder looks like:\n{layout(root)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read split list {list_file}: {exc}") from exc
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{list_file} line {number}: expected '<image path> <label>', got {line!r}")
        rel, label = parts
        try:
            value = int(label)
        except ValueError:
            raise DataError(f"{list_file} line {number}: label {label!r} is not an integer") from None
        path = Path(rel.strip())
        entries.append(Entry(path if path.is_absolute() else root / path, value, list_file, number))
    if not entries:
        raise DataError(f"split list {list_file} is empty: no '<image path> <label>' lines")
    return entries


def read_classes(root: Path) -> list[str] | None:
    """``classes.txt`` (label i is line i), or None when the folder has none."""
    path = root / "classes.txt"
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path} is empty; remove it or list one class name per line (label i is line i)")
    return names


def file_signature(path: str | os.PathLike, exact: bool) -> str:
    """A file's stat fingerprint: size, mtime and type; ``exact`` adds ctime and inode.

    A copy keeps size and mtime (rsync -a, cp -p, tar) but not ctime or inode, and an edit in place
    that restores size and mtime still moves ctime: the cache, which must never serve stale pixels,
    takes the exact form; a record, which must survive its data being copied elsewhere, the other.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"unreadable:{exc.errno}"
    sig = f"{st.st_size}:{st.st_mtime_ns}:{stat.S_IFMT(st.st_mode):o}"
    return f"{sig}:{st.st_ctime_ns}:{st.st_ino}" if exact else sig


def _stat(path: Path) -> str:
    return f"{path.name}:{file_signature(path, exact=True)}"


def files_digest(entries: list[Entry], root: Path | None = None, memo: Path | None = None) -> str:
    """What a split's pixels depend on: each listed path, its label, and its file.

    Without ``root`` the exact form for the cache key, from stat calls only so that a cache hit on 10k images
    stays cheap: absolute paths and stat fingerprints with ctime and inode (an image rewritten in place changes
    it even when it keeps its size and mtime). With ``root`` the portable form for records (``content_digest``).
    """
    if root is not None:
        return content_digest([(e.path, e.label) for e in entries], root, memo)
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.path}\0{e.label}\0{file_signature(e.path, exact=True)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def content_digest(samples: list[tuple[str | os.PathLike, int]], root: Path, memo: Path | None = None) -> str:
    """The portable digest of labelled image files, as records keep it: each path relative to ``root``, its label
    and the SHA-256 of its bytes. Any copy of the data (however its mtimes came out: ``cp``, a fresh download, a
    re-extracted archive) has the same digest; a relabelled or replaced image changes it.

    The bytes are read once per state of the files: with a ``memo`` folder (under the data cache) the result is
    kept there under the exact stat fingerprint of every file (path, size, mtime, ctime, inode), which any write
    to any of them changes, so later calls cost stat calls only.
    """
    exact = hashlib.sha256()
    for path, label in samples:
        line = f"{os.fspath(path)}\0{label}\0{file_signature(path, exact=True)}\n"
        exact.update(line.encode("utf-8", "surrogateescape"))
    memo_file = Path(memo) / "digests" / f"{exact.hexdigest()}.txt" if memo is not None else None
    if memo_file is not None:
        try:
            known = memo_file.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            known = ""
        if len(known) == 64 and all(c in "0123456789abcdef" for c in known):
            return known
    h = hashlib.sha256(b"content\n")
    for path, label in samples:
        try:
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):  # a FIFO would block the read: decoding names what it is
                content = f"not a file:{stat.S_IFMT(mode):o}"
            else:
                with open(path, "rb") as f:
                    content = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as exc:
            content = f"unreadable:{exc.errno}"
        h.update(f"{os.path.relpath(path, root)}\0{label}\0{content}\n".encode("utf-8", "surrogateescape"))
    digest = h.hexdigest()
    if memo_file is not None:
        with contextlib.suppress(OSError):  # a read-only cache: the digest is still right, only not remembered
            write_text_atomic(memo_file, digest + "\n")
    return digest


def _text_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return "absent"
    except OSError as exc:
        return f"unreadable:{exc.errno}"


def _task_folders_in(root: Path, limit: int = 1000) -> list[str]:
    """Names of subfolders that look like task folders (a VTAB-1k root given as a task folder)."""
    found = []
    try:
        with os.scandir(root) as it:
            for k, entry in enumerate(it):
                if k >= limit:
                    break
                if entry.is_dir() and any((Path(entry.path) / f"{s}.txt").is_file() for s in SPLITS):
                    found.append(entry.name)
    except OSError:
        pass
    return sorted(found)


def _check_lists(root: Path, lists: dict[str, Path], splits: tuple[str, ...], union: bool) -> None:
    """Fail at once, before any cache lookup or decoding, when the folder lacks a list the protocol needs."""
    missing = [lists[s] for s in splits if not (s == "train800val200" and union) and not lists[s].is_file()]
    if not missing:
        return
    if not any(p.is_file() for p in lists.values()):
        inside = _task_folders_in(root)
        hint = ""
        if inside:
            shown = ", ".join(inside[:5]) + (", ..." if len(inside) > 5 else "")
            hint = f" It holds task folders ({shown}): pass one of them, e.g. root={root / inside[0]}."
        names = ", ".join(p.name for p in lists.values())
        raise DataError(
            f"{root} is not a task folder: it has none of {names}.{hint} A task folder looks like:\n{layout(root)}"
        )
    raise DataError(f"split list {missing[0]} is missing; a task folder looks like:\n{layout(root)}")


def _check_vtab_task(name: str, root: Path, lists: dict[str, Path], listed: Callable[[Path], list[Entry]]) -> None:
    """A folder read under a VTAB-1k task's name must hold that task: its classes and VTAB-1k's split sizes.

    Otherwise a 10-class folder named cifar100 trains, is recorded as cifar100 and ranks in the VTAB means.
    Only the list files are read (no image), so this fails in a moment, before the backbone loads.
    """
    expected = NUM_CLASSES[name]
    present = {split: listed(path) for split, path in lists.items() if path.is_file()}
    classes = read_classes(root)
    if classes is not None:
        found, why = len(classes), f"{root / 'classes.txt'} lists {len(classes)}"
    else:
        found = max(e.label for entries in present.values() for e in entries) + 1
        why = f"its largest label is {found - 1}; no classes.txt"
    problems = [f"{found} classes ({why})"] if found != expected else []
    outside = next((e for entries in present.values() for e in entries if not 0 <= e.label < expected), None)
    if outside is not None:
        problems.append(f"label {outside.label} outside [0, {expected}) at {outside.where()}")
    for split, n in SPLIT_SIZES.items():
        if split in present and len(present[split]) != n:
            problems.append(f"{lists[split].name} lists {len(present[split])} images, not {n}")
    if problems:
        sizes = ", ".join(f"{split} {n}" for split, n in SPLIT_SIZES.items())
        raise DataError(
            f"{name}: the folder {root} does not hold VTAB-1k's {name} ({expected} classes; {sizes} images, "
            f"a test split of its own): it has {'; '.join(problems)}. For a task of your own, "
            f"use dataset=folder dataset.root={root}"
        )


def resolve_folder(root: str | os.PathLike, req: Request) -> Resolved:
    """A task folder: source, cache identity (list files, and each split's image files) and a lazy opener.

    A missing folder, or one without the lists the protocol needs, fails here, before anything is
    decoded or downloaded; so does a folder read under a VTAB-1k task's name that does not hold that task.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"no task folder at {root}; a task folder looks like:\n{layout(root)}")
    lists = {split: root / f"{split}.txt" for split in SPLITS}
    union = "train800val200" in req.splits and not lists["train800val200"].is_file()
    union = union and lists["train800"].is_file() and lists["val200"].is_file()
    _check_lists(root, lists, req.splits, union)
    identity = "|".join(["folder", str(root)] + [_stat(p) for p in (*lists.values(), root / "classes.txt")])
    source = f"folder:{root}"
    if union:
        source += " (train800val200 = train800 + val200: the folder has no train800val200.txt)"
    parsed: dict[Path, list[Entry]] = {}  # each list read once per call, so the key and the decode agree

    def listed(list_file: Path) -> list[Entry]:
        if list_file not in parsed:
            parsed[list_file] = read_list(list_file)
        return parsed[list_file]

    def entries(split: str) -> list[Entry]:
        if split == "train800val200" and union:
            return listed(lists["train800"]) + listed(lists["val200"])
        return listed(lists[split])

    if req.name in NUM_CLASSES:
        _check_vtab_task(req.name, root, lists, listed)

    def digest(memo: Path | None) -> str:
        h = hashlib.sha256(b"folder\n")
        for path in (*lists.values(), root / "classes.txt"):  # labels, paths and class names as written
            h.update(f"{path.name}:{_text_digest(path)}\n".encode())
        for split in req.splits:
            h.update(f"{split}:{files_digest(entries(split), root, memo)}\n".encode())
        return h.hexdigest()

    def prepare(splits: tuple[str, ...]) -> Prepared:
        classes = read_classes(root)
        needed = {s: entries(s) for s in splits}
        if classes is not None:
            num_classes = len(classes)
            why = f"{root / 'classes.txt'} lists {num_classes} classes"
        else:  # max label + 1 over every split list present, so tune and final agree
            present = [listed(p) for p in lists.values() if p.is_file()]
            num_classes = max(e.label for split_list in present for e in split_list) + 1
            why = f"max label + 1 over the folder's split lists is {num_classes} (no classes.txt)"
        for split_entries in needed.values():
            for e in split_entries:
                if not 0 <= e.label < num_classes:
                    raise DataError(f"{e.where()}: label {e.label} outside [0, {num_classes}) ({why})")
        return Prepared(num_classes, classes, {s: _items(s, split_entries) for s, split_entries in needed.items()})

    return Resolved(source, identity, prepare, split_identity=lambda split: files_digest(entries(split)), digest=digest)


def _items(split: str, entries: list[Entry]) -> SplitItems:
    def load(i: int) -> tuple[Image.Image, int]:
        e = entries[i]
        try:
            return open_image(str(e.path)), e.label
        except DataError as exc:
            raise DataError(f"{exc} (listed in {e.where()})") from exc.__cause__

    return SplitItems(split, len(entries), load, lambda i: f"{entries[i].path} ({entries[i].where()})")


@DATASETS.register("folder")
def folder(req: Request) -> Resolved:
    """Any task folder in the VTAB-1k layout, given as ``root=PATH``."""
    req.take_options()
    if req.root is None:
        raise ConfigError(f"dataset 'folder' needs root=PATH, a task folder laid out as:\n{layout('PATH')}")
    return resolve_folder(req.root, req)
