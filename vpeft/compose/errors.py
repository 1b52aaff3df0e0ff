"""Errors of composition: each names the deltas involved and what works instead."""

from __future__ import annotations

from vpeft.errors import DataError


class IncompatibleDeltasError(DataError):
    """Deltas or task vectors that cannot be combined: other backbones, methods, configs, spaces or shapes."""


class MissingHeadError(DataError):
    """A delta without its classification head: its task cannot be evaluated on a merged backbone."""
