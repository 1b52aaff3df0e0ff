"""Replay successive halving on full-grid tune records: would it have chosen what the full grid chose?

    python scripts/halving_sim.py results/halving/runs [--eta 2] [--rungs 2,4,8] [--out outputs/halving] [--picks DIR]

The tune runs must have evaluated on val200 at the rungs (``trainer.eval_every``); final runs of the
picks, where present, give the test top-1 each pick reaches (the regret is the full grid's pick minus
halving's, in points) and the seed-to-seed spread of the full grid's final runs. Writes halving.md and
halving.csv to --out (outputs/halving unless named: results/ only when told) and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vpeft.errors import VpeftError  # noqa: E402
from vpeft.files import write_text_atomic  # noqa: E402
from vpeft.results import iter_records  # noqa: E402
from vpeft.results.halving import COLUMNS, halving_table, summary, untested_picks  # noqa: E402
from vpeft.vtab import write_hparams  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("records", type=Path, help="folder of run records: the full grid's tune runs and final runs")
    p.add_argument("--eta", type=int, default=2, help="keep the best 1/eta of the points at each rung (default 2)")
    p.add_argument("--rungs", default=None, help="rungs in epochs, the last the schedule's end (default: 1/4, 1/2, 1)")
    p.add_argument("--out", type=Path, default=Path("outputs/halving"), help="output folder (default outputs/halving)")
    p.add_argument("--picks", type=Path, default=None, help="write hyperparameter files of halving's picks that "
                   "differ from the full grid's and have no final run (DIR/<backbone>/<method>.json)")  # fmt: skip
    args = p.parse_args(argv)
    if not args.records.is_dir():
        p.exit(2, f"halving_sim.py: error: no folder of records at {args.records}\n")
    try:
        rungs = [int(r) for r in args.rungs.split(",")] if args.rungs else None
    except ValueError:
        p.exit(2, f"halving_sim.py: error: --rungs takes epochs separated by commas, e.g. 2,4,8; got {args.rungs!r}\n")
    try:
        table = halving_table((r for _, r in iter_records(args.records)), eta=args.eta, rungs=rungs)
    except VpeftError as e:
        p.exit(2, f"halving_sim.py: error: {e}\n")
    if table.empty:
        p.exit(2, f"halving_sim.py: error: no finished tune runs under {args.records}\n")
    s = summary(table)
    if args.picks is not None:
        for (backbone, method), tasks in untested_picks(table).items():
            path = write_hparams(args.picks / backbone / f"{method}.json", tasks, method, backbone,
                                 sorted({k for t in tasks.values() for k in t["values"]}))  # fmt: skip
            print(
                f"halving's picks without final runs: {path} ({', '.join(sorted(tasks))}); run them with "
                f"run.py -m protocol=final hparams={path} method={method} dataset=<those tasks> seed=<the seeds>"
            )
    table = table[COLUMNS]
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "halving.csv", table.to_csv(index=False, float_format="%.4g"))
    md = table.to_markdown(index=False, floatfmt=".4g")
    write_text_atomic(args.out / "halving.md", f"{md}\n\nsummary: {json.dumps(s)}\n")
    print(md)
    print(f"\n{s['grids']} grids: halving (eta {args.eta}) picks the full grid's point in {s['agreement']:.0%}, at "
          f"{s['mean_cost']:.2f}x the tune stage's training; regret (test top-1 points, {s['regret_rows']} grids with "
          f"final runs): mean {_fmt(s['mean_regret'])}, worst {_fmt(s['worst_regret'])}; seed-to-seed spread of the "
          f"final runs (median std): {_fmt(s['median_seed_spread'])}")  # fmt: skip
    print(f"wrote {args.out / 'halving.md'} and halving.csv")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
