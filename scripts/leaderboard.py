"""Render the leaderboard (Markdown, CSV, LaTeX, HTML, plots) from a folder of run records.

    python scripts/leaderboard.py outputs/runs [--out outputs/leaderboard] \
        [--bench outputs/bench] [--merges outputs/merges] [--retention outputs/retention] \
        [--sequential outputs/sequential]

The output folder is outputs/leaderboard unless --out names another: the committed leaderboard
(results/leaderboard) is rebuilt only when named, as runs write to results/ only when told to.

The outputs are a pure function of the records and the folders named: the same records give
byte-identical files. With --bench, bench records supply latency where the runs have none and the
backbone, method config, input size, device and dtype all match, and methods.md / methods.csv put
every benchmarked method's costs side by side. With --merges, a composition section (and
composition.csv) puts each method's merged deltas and AdapterFusion beside its deltas alone. With
--retention and --sequential, a forgetting section (retention.csv, sequential.csv and a plot of target top-1
against what the features lost on other tasks). In a
notebook: ``vpeft.results.load_records(folder)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vpeft.errors import VpeftError
from vpeft.results.render import write_leaderboard

DEFAULT_OUT = Path("outputs/leaderboard")  # user output; results/leaderboard holds the committed one


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", type=Path, help="folder of run records (JSON), e.g. results/runs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--bench", type=Path, default=None, help="folder of bench records for the methods table")
    parser.add_argument("--merges", type=Path, default=None, help="folder of merge records for the composition section")
    parser.add_argument("--retention", type=Path, default=None, help="folder of retention records (job=retention)")
    parser.add_argument("--sequential", type=Path, default=None, help="folder of sequential records (job=sequential)")
    args = parser.parse_args(argv)
    try:
        written = write_leaderboard(args.records, args.out, args.bench, args.merges, args.retention, args.sequential)
    except VpeftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name in sorted(written):
        print(written[name])
    print(f"wrote {len(written)} files to {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
