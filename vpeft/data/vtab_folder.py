"""A VTAB-1k task by name: its task folder when one exists, else built by torchvision where it can be."""

from __future__ import annotations

import os
from pathlib import Path

from vpeft.data.base import Request, Resolved, layout
from vpeft.data.folder import resolve_folder
from vpeft.data.torchvision_tasks import TASKS, resolve_torchvision
from vpeft.errors import DataError

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
