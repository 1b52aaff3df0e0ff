"""Jobs: a config in, one atomic record out (training runs, bench measurements, merges).

``vpeft.jobs.runner`` is the machinery they share (plan -> execute -> finish, skip-finished, signals,
bad input, guarded records); each job module supplies only its own middle. This package and
``vpeft.run`` are the only code that reads the Hydra config and touches paths.
"""

from vpeft.jobs.runner import Context, InputError, Job, Plan, Terminated, entered, mark_entered, run_job

__all__ = ["Context", "InputError", "Job", "Plan", "Terminated", "entered", "mark_entered", "run_job"]
