"""The 19 VTAB-1k task names registered: a task folder when one exists, else torchvision where it can build
the task (vpeft.data.vtab_folder); dsprites_loc and dsprites_ori: else the official npz, else regenerated
(vpeft.data.dsprites)."""

from __future__ import annotations

import functools

from vpeft.data.base import DATASETS
from vpeft.data.dsprites import TASKS as DSPRITES_TASKS
from vpeft.data.dsprites import resolve_dsprites
from vpeft.data.torchvision_tasks import EXTRA_TASKS
from vpeft.data.vtab_folder import resolve_vtab
from vpeft.vtab import TASKS as VTAB_TASKS

for _task in VTAB_TASKS:  # dSprites: the official npz, a task folder, or regenerated (vpeft.data.dsprites)
    _resolver = resolve_dsprites if _task in DSPRITES_TASKS else resolve_vtab
    DATASETS.register(_task)(functools.partial(_resolver, _task))
for _task in EXTRA_TASKS:  # the task-arithmetic pool beyond VTAB: a task folder, else torchvision
    DATASETS.register(_task)(functools.partial(resolve_vtab, _task))
