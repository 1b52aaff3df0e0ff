"""What every benchmark suite writes: one JSON file of every number and one Markdown page, in the same shape.

A page is an environment header (title, the command, one line of versions and sizes), a targets table
(target, wanted, measured, met) and sections of tables and notes; the tables go through pandas'
``DataFrame.to_markdown``. A suite writes both files after each of its sections, and once more when SIGTERM
or SIGINT stops it (``stop_on_signals``, ``run_sections``), so a time cap or a Ctrl-C keeps what was measured.
"""

from __future__ import annotations

import contextlib
import re
import signal
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from vpeft.files import write_json_atomic, write_text_atomic

MISSING = "–"
Format = str | Callable[[Any], str]
# (header, the row's key or a function of the row, format: a format spec, a function, or "" for the default)
Column = tuple[str, str | Callable[[Mapping[str, Any]], Any], Format]
_NUMBER = re.compile(r"^(–|[-+]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?)$")


def short(value: float) -> str:
    """Three decimals below 10, one above, thousands separated: ratios and timings read at a glance."""
    return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"


def cell(value: Any, fmt: Format = "") -> str:
    """One value as the tables print it: a dash when missing, yes/no for a flag, a number by ``fmt``
    (by default: integers as they are, other numbers ``short``)."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if callable(fmt):
        return fmt(value)
    if fmt:
        return format(value, fmt)
    return short(value) if isinstance(value, float) else str(value)


def verdict(met: bool | None) -> str:
    """A target's verdict; a miss stands out."""
    return MISSING if met is None else "yes" if met else "**no**"


def frame(rows: Iterable[Mapping[str, Any]], columns: Sequence[Column]) -> pd.DataFrame:
    """Rows of numbers as a frame of printed cells, one column per (header, key, format)."""
    body = [[cell(key(r) if callable(key) else r.get(key), fmt) for _, key, fmt in columns] for r in rows]
    return pd.DataFrame(body, columns=[header for header, _, _ in columns], dtype=object)


def markdown_table(df: pd.DataFrame) -> str:
    """A frame of text as a Markdown table: columns of numbers (or dashes) aligned right, words left."""
    align = ["right" if len(df) and df[c].map(lambda v: bool(_NUMBER.match(str(v)))).all() else "left" for c in df]
    escaped = df.map(lambda v: str(v).replace("|", "\\|"))
    return escaped.to_markdown(index=False, colalign=align, disable_numparse=True)


class Report:
    """A Markdown page built top to bottom: the header, then headings, text, tables and targets in call order."""

    def __init__(self, title: str, command: str, environment: str) -> None:
        self.lines = [f"# {title}", "", f"`{command}`  ", environment, ""]

    def heading(self, title: str, level: int = 2) -> Report:
        self.lines += [f"{'#' * level} {title}", ""]
        return self

    def text(self, *paragraphs: str) -> Report:
        for p in paragraphs:
            self.lines += [p, ""]
        return self

    def bullets(self, items: Iterable[str]) -> Report:
        items = [f"- {item}" for item in items]
        self.lines += [*items, ""] if items else []
        return self

    def code(self, text: str) -> Report:
        self.lines += ["```", text, "```", ""]
        return self

    def table(self, rows: Iterable[Mapping[str, Any]] | pd.DataFrame, columns: Sequence[Column] = (),
              notes: Iterable[str] = ()) -> Report:  # fmt: skip
        """Rows with their columns, or a frame of printed cells; the notes go under it as bullets."""
        df = rows if isinstance(rows, pd.DataFrame) else frame(rows, columns)
        self.lines += [markdown_table(df), ""]
        return self.bullets(notes)

    def targets(self, targets: Iterable[Mapping[str, Any]], extra: Sequence[Column] = ()) -> Report:
        """The targets section: each with what is wanted, what was measured and whether it was met."""
        columns: list[Column] = [("target", "target", ""), ("wanted", "wanted", ""), ("measured", "measured", ""),
                                 ("met", lambda t: verdict(t["met"]), ""), *extra]  # fmt: skip
        return self.heading("Targets").table(targets, columns)

    def markdown(self) -> str:
        return "\n".join(self.lines).rstrip("\n") + "\n"


def unfinished(sections: Mapping[str, Any]) -> list[str]:
    """A line for each section that was skipped or failed, with the reason."""
    lines = []
    for name, sec in sections.items():
        if isinstance(sec, dict) and "skipped" in sec:
            lines.append(f"{name}: skipped ({sec['skipped']})")
        if isinstance(sec, dict) and "error" in sec:
            lines.append(f"{name}: failed ({sec['error'].splitlines()[-1]})")
    return lines


def write_result(folder: str | Path, stem: str, result: Mapping[str, Any], markdown: str) -> None:
    """``<stem>.json`` (every number) and ``<stem>.md`` (the page) in ``folder``, each written atomically."""
    folder = Path(folder)
    write_json_atomic(folder / f"{stem}.json", result)
    write_text_atomic(folder / f"{stem}.md", markdown)


# -- keeping what was measured when a run is stopped ------------------------------------------------------
class Stopped(BaseException):
    """SIGTERM or SIGINT arrived (a time cap, a scheduler, Ctrl-C): write what was measured and stop.

    A BaseException, so the ``except Exception`` of a measurement does not swallow it."""


def _stop(signum: int, frame: Any) -> None:
    raise Stopped(f"signal {signum} ({signal.Signals(signum).name})")


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Turn ``signals`` into ``Stopped`` inside the block; the previous handlers come back after it."""
    previous = {s: signal.signal(s, _stop) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_sections(result: dict[str, Any], sections: Sequence[tuple[str, Callable[[], Any]]],
                 write: Callable[[], None]) -> int:  # fmt: skip
    """Run each section, store what it returns under ``result["sections"]``, and ``write()`` after each.

    A section that fills its entry as it measures (a list or dict it put there first) keeps what it measured
    when it fails or is stopped: the error goes beside it (``result["partial"]`` for a list). One failing
    section does not lose the others' numbers; a signal stops the run after writing. 0 if every section
    finished, else 1.
    """
    done = result["sections"]
    status = 0
    with stop_on_signals():
        for name, measure in sections:
            print(f"[{name}]", flush=True)
            try:
                value = measure()
                if value is not None:
                    done[name] = value
            except (Exception, Stopped) as e:
                traceback.print_exc()
                status = 1
                error = f"{type(e).__name__}: {e}"
                partial = done.get(name)
                if isinstance(partial, dict) and partial:
                    partial["error"] = error
                elif isinstance(partial, list) and partial:
                    result.setdefault("partial", {})[name] = error
                else:
                    done[name] = {"error": error}
                if isinstance(e, Stopped):
                    write()
                    print("stopped; wrote what was measured", flush=True)
                    return 1
            write()
    return status
