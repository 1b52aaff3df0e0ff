"""Progress of the long phases (decoding a split, training, evaluating, measuring), named as what they do.

On a terminal a tqdm bar redraws in place. Anywhere else (a pipe, a SLURM or Hydra log file) a redrawn
bar would pile up carriage returns, and tqdm's usual answer (``disable=None``) is silence for minutes;
there the same bar is written as one plain line when a phase starts, at most every ``LOG_INTERVAL_S``
seconds while it runs (``TQDM_MININTERVAL`` sets another interval), and when it ends.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class _Lines:
    """A file for tqdm that writes each redraw of its bar as one line (for logs, where ``\\r`` does not redraw)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """tqdm for a log: its closing line only when it says something the last line did not."""

    def close(self) -> None:
        if not self.disable and self.last_print_n == self.n:
            self.leave = False
        super().close()


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    enabled: bool = True,
) -> tqdm:
    """A tqdm bar on stderr: redrawn on a terminal, a line every ``LOG_INTERVAL_S`` seconds elsewhere."""
    stream = sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)
    interval = float(os.environ.get("TQDM_MININTERVAL") or LOG_INTERVAL_S)
    return _LogBar(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        disable=not enabled,
        leave=True,  # the last line says how long the phase took (unless the one before did)
        file=_Lines(stream),
        mininterval=interval,
        maxinterval=interval,  # tqdm's monitor would otherwise redraw every 10 s
        ascii=True,
    )
