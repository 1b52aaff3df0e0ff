"""Deltas as task vectors: arithmetic and merging (task arithmetic, TIES, DARE, weighted averaging).

Pure: deltas (files read through ``vpeft.core`` or in memory), tensors and modules in, tensors and
modules out. A merge is ``read_task`` per task -> ``task_vector`` -> ``merge_vectors`` ->
``apply_vector`` once -> ``put_head(model, task_head(...))`` per task; ``merge_tasks`` does it in one call.
"""

from vpeft.compose.apply import MergedTasks, apply_vector, merge_tasks, put_head
from vpeft.compose.errors import IncompatibleDeltasError, MissingHeadError
from vpeft.compose.merging import (
    ALGORITHMS,
    algorithm_params,
    dare,
    dare_task_arithmetic,
    dare_ties,
    elect_and_merge,
    merge_vectors,
    task_arithmetic,
    ties,
    trim,
    weighted_average,
)
from vpeft.compose.vectors import (
    SPACE_MEANINGS,
    SPACES,
    LowRank,
    TaskDelta,
    TaskVector,
    add,
    check_compatible,
    identity_values,
    negate,
    read_task,
    scale,
    task_head,
    task_vector,
)

__all__ = [
    "ALGORITHMS",
    "SPACE_MEANINGS",
    "SPACES",
    "IncompatibleDeltasError",
    "LowRank",
    "MergedTasks",
    "MissingHeadError",
    "TaskDelta",
    "TaskVector",
    "add",
    "algorithm_params",
    "apply_vector",
    "check_compatible",
    "identity_values",
    "dare",
    "dare_task_arithmetic",
    "dare_ties",
    "elect_and_merge",
    "merge_tasks",
    "merge_vectors",
    "negate",
    "put_head",
    "read_task",
    "scale",
    "task_arithmetic",
    "task_head",
    "task_vector",
    "ties",
    "trim",
    "weighted_average",
]
