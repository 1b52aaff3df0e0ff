"""Training and evaluation on pre-decoded uint8 tensors: objects in, metrics out (no config, no files)."""

from vpeft.engine.loop import DivergedError, EpochStats, Resume, TrainConfig, TrainResult, evaluate, train
from vpeft.engine.optim import param_groups

__all__ = ["DivergedError", "EpochStats", "Resume", "TrainConfig", "TrainResult", "evaluate", "param_groups", "train"]
