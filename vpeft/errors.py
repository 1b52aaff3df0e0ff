"""Errors that name the problem and the fix."""

from __future__ import annotations

import math
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


def shown(value: object) -> str:
    """A config value as the command line writes it (null, true, 'yes', nan)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def check_value(
    key: str,
    value: object,
    kind: str = "number",
    low: float | None = None,
    high: float | None = None,
    high_open: bool = False,
    low_open: bool = False,
    optional: bool = False,
    example: object = None,
    fix: str | None = None,
) -> None:
    """Raise ConfigError unless ``value`` is a ``kind`` ("number", "integer", "bool") in the range; the message
    names the key, the value, the range and a valid setting (``example``, or ``fix`` as a whole), so that a bad
    value found while planning says how to fix it."""
    if optional and value is None:
        return
    if kind == "bool":
        ok, what = isinstance(value, bool), "true, false" if optional else "true or false"
    else:
        integer = kind == "integer"
        types = (int,) if integer else (int, float)
        ok = isinstance(value, types) and not isinstance(value, bool)
        ok = ok and (isinstance(value, int) or math.isfinite(value))  # (an int may be too large for a float)
        ok = ok and (low is None or (value > low if low_open else value >= low))
        ok = ok and (high is None or (value < high if high_open else value <= high))
        noun = "an integer" if integer else "a finite number"
        if low is not None and high is not None:
            what = f"{noun} in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
        elif integer and low == 1 and not low_open:
            what = "a positive integer"
        elif low is not None:
            what = f"{noun} {'>' if low_open else '>='} {_num(low)}"
        else:
            what = noun
    if not ok:
        alternative = " or null" if optional else ""
        if fix is None and example is not None:
            fix = f"set {key}={shown(example)}, for example"
        raise ConfigError(f"{key} must be {what}{alternative}, got {shown(value)}" + (f"; {fix}" if fix else ""))
