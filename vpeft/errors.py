"""Errors that name the problem and the fix."""

from __future__ import annotations

from collections.abc import Iterable


class VpeftError(Exception):
    """Base class of every error vpeft raises on purpose."""


class UnknownNameError(VpeftError, KeyError):
    """A name (method, dataset, backbone, field) that is not registered."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return self.args[0]


class ConfigError(VpeftError, ValueError):
    """A configuration value that is out of range or of the wrong kind."""


class UnsupportedModelError(VpeftError, TypeError):
    """The model lacks the structure a method needs."""


class NotMergeableError(VpeftError, TypeError):
    """merge() called on a method whose delta cannot be folded into the weights."""


class DataError(VpeftError, ValueError):
    """Missing, unreadable or inconsistent data."""


class OfflineError(VpeftError, RuntimeError):
    """Something had to be downloaded and the network is not reachable."""


class RunFailed(VpeftError):
    """A job that started failed in a known way (a diverged loss): recorded ``failed``, exit 1."""
