"""vpeft: parameter-efficient fine-tuning of timm vision transformers, measured."""

import vpeft.config  # noqa: F401  (the OmegaConf resolvers vpeft's configs use)
from vpeft.core import (
    ParamCount,
    applied_method,
    apply_method,
    count_parameters,
    delta_state_dict,
    list_methods,
    load_delta,
    merge,
    read_delta,
    save_delta,
    trainable_parameters,
)
from vpeft.errors import (
    ConfigError,
    DataError,
    NotMergeableError,
    OfflineError,
    UnknownNameError,
    UnsupportedModelError,
    VpeftError,
)
from vpeft.version import __version__

__all__ = [
    "ConfigError",
    "DataError",
    "NotMergeableError",
    "OfflineError",
    "ParamCount",
    "UnknownNameError",
    "UnsupportedModelError",
    "VpeftError",
    "__version__",
    "applied_method",
    "apply_method",
    "count_parameters",
    "delta_state_dict",
    "list_methods",
    "load_delta",
    "merge",
    "read_delta",
    "save_delta",
    "trainable_parameters",
]
