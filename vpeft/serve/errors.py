"""Errors of the serving model: each names the problem and what works instead."""

from __future__ import annotations

from collections.abc import Iterable

from vpeft.errors import DataError, UnknownNameError, VpeftError


class NotServableError(VpeftError, TypeError):
    """A method whose deltas cannot share one backbone pass (``full`` rewrites every weight)."""


class IncompatibleDeltaError(DataError):
    """A delta that does not fit the resident backbone or the deltas already resident beside it."""


class UnknownTaskError(UnknownNameError):
    """A task id or name that is not resident (never attached, or detached)."""

    def __init__(self, task: object, valid: Iterable[str]):
        valid = list(valid)
        shown = ", ".join(valid[:20]) + (f", ... ({len(valid)} in all)" if len(valid) > 20 else "")
        VpeftError.__init__(self, f"unknown task {task!r}; resident tasks (id: name): {shown or 'none'}")
        self.kind, self.name, self.valid = "task", str(task), valid

    def __str__(self) -> str:
        return self.args[0]
