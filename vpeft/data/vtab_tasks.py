"""The 19 VTAB-1k task names: a task folder when one exists, else torchvision where it can build the task
(dsprites_loc and dsprites_ori: else the official npz, else regenerated; see vpeft.data.dsprites)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from vpeft.data.base import DATASETS, Request, Resolved, layout
from vpeft.data.dsprites import TASKS as DSPRITES_TASKS
from vpeft.data.dsprites import resolve_dsprites
from vpeft.data.folder import resolve_folder
from vpeft.data.torchvision_tasks import EXTRA_TASKS, TASKS, resolve_torchvision
from vpeft.errors import DataError
from vpeft.vtab import TASKS as VTAB_TASKS

# Where torchvision downloads a task when the caller names no download_root.
DEFAULT_DOWNLOAD_ROOT = Path.home() / ".cache" / "vpeft" / "torchvision"


def _absolute(path: str | Path) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def resolve_vtab(name: str, req: Request) -> Resolved:
    """``root``, else ``<vtab_root>/<name>``, when it exists; else torchvision; else an error showing the layout.

    Only the default place, ``<vtab_root>/<name>``, may be absent and stand for "build it with
    torchvision". A path that exists but is no task folder, or a ``root`` other than the default
    that does not exist, is a mistake: it fails at once, showing the layout, and nothing is downloaded.
    """
    req.take_options()
    default = Path(req.vtab_root) / name if req.vtab_root else None
    folder = Path(req.root) if req.root is not None else default
    explicit = req.root is not None and (default is None or _absolute(req.root) != _absolute(default))
    if folder is not None and os.path.lexists(folder.expanduser()):
        if not folder.expanduser().is_dir():
            shown = folder.expanduser().absolute()
            raise DataError(f"{name}: {shown} is not a folder; a task folder looks like:\n{layout(shown)}")
        return resolve_folder(folder, req)
    if explicit:
        shown = Path(_absolute(req.root))
        where = f"<vtab_root>/{name}" if default is None else _absolute(default)
        raise DataError(
            f"{name}: root={req.root}: no task folder at {shown}. Point root= at the task folder, laid out as:\n"
            f"{layout(shown)}\nor leave root unset: {name} is then read from {where}"
            + (", or built with torchvision when that folder is absent." if name in TASKS else ".")
        )
    shown = str(folder.expanduser().resolve()) if folder is not None else f"<vtab_root>/{name}"
    if name in TASKS:
        download_root = str(Path(req.download_root or DEFAULT_DOWNLOAD_ROOT).expanduser().resolve())
        return resolve_torchvision(name, req, shown, download_root)
    buildable = ", ".join(sorted(TASKS))
    raise DataError(
        f"{name}: no task folder at {shown}, and torchvision cannot build {name} (it can build: {buildable}). "
        f"Put the VTAB-1k task folder there (or pass root=/vtab_root=), laid out as:\n{layout(shown)}"
    )


for _task in VTAB_TASKS:  # dSprites: the official npz, a task folder, or regenerated (vpeft.data.dsprites)
    _resolver = resolve_dsprites if _task in DSPRITES_TASKS else resolve_vtab
    DATASETS.register(_task)(functools.partial(_resolver, _task))
for _task in EXTRA_TASKS:  # the task-arithmetic pool beyond VTAB: a task folder, else torchvision
    DATASETS.register(_task)(functools.partial(resolve_vtab, _task))
