"""vpeft's datasets: VTAB-1k task folders, torchvision-built VTAB tasks, image folders, digits, Fashion-MNIST.

Every split reaches the engine as one uint8 ``[N, 3, H, W]`` tensor at the backbone's input size,
decoded once and cached on disk::

    from vpeft.data import load_task
    task = load_task("cifar100", "tune", (224, 224), vtab_root="data/vtab-1k", cache_dir="~/.cache/vpeft/data")
    task.train.images  # uint8 [800, 3, 224, 224]
"""

# Importing the source modules registers their names in DATASETS.
from vpeft.data import arrays, folder, imagefolder, vtab_tasks  # noqa: F401
from vpeft.data.base import DATASETS, ImageSplit, TaskData
from vpeft.data.load import DIGEST_VERSION, check_task, data_digest, list_datasets, load_task

__all__ = ["DATASETS", "DIGEST_VERSION", "ImageSplit", "TaskData", "check_task", "data_digest", "list_datasets",
           "load_task"]  # fmt: skip
