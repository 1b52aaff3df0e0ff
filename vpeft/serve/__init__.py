"""Serving many tasks from one frozen backbone: mixed-task batches in one forward pass, and timed swaps.

model = MultiDeltaModel.from_files(backbone, ["cifar100.safetensors", "dtd.safetensors"])
logits = model(images, task_ids)          # each sample through its own task's delta and head
event = model.attach("pets.safetensors")  # swaps: attach / detach (unmerged), merge / unmerge in place
"""

from vpeft.serve.errors import IncompatibleDeltaError, NotServableError, UnknownTaskError
from vpeft.serve.model import AUTO_SEGMENT_MAX_TASKS, MultiDeltaModel, SwapEvent, TaskDelta
from vpeft.serve.routing import STRATEGIES
from vpeft.serve.servers import mergeable_servable_methods, servable_methods

__all__ = [
    "AUTO_SEGMENT_MAX_TASKS",
    "STRATEGIES",
    "IncompatibleDeltaError",
    "MultiDeltaModel",
    "NotServableError",
    "SwapEvent",
    "TaskDelta",
    "UnknownTaskError",
    "mergeable_servable_methods",
    "servable_methods",
]
