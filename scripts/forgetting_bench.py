"""Forgetting per method: what each method's adaptation to one task costs the backbone on the others.

    python scripts/forgetting_bench.py                                  # the offline pool, every method
    python scripts/forgetting_bench.py --methods lora,full --pairs digits:dsprites_loc backbone=dinov2_s14_offline

1. Every (method, task) final run with its delta, through `run.py -m` (finished runs are skipped, so the
   composition pool's runs of the same config are reused).
2. `job=retention` of every run on the pool's other tasks (k-NN on pre-logit features against the bare
   backbone's; its features computed once per split).
3. `job=sequential` for the --sequential methods over each --pairs ordering A:B (A's run continued on B).
Every result is a record (paths.retention, paths.sequential); `scripts/leaderboard.py --retention ...
--sequential ...` renders them. Anything after the options is passed to every run.py call.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.merge_bench import OFFLINE_POOL, OneLineParser, dataset_overrides  # noqa: E402

SEQUENTIAL = ["full", "lora", "ssf", "bitfit", "vpt_deep", "adapter_houlsby"]
PAIRS = ["digits:dsprites_loc", "dsprites_loc:digits"]
ALONE = ("adapter_fusion",)  # fuses other runs' adapters: no run of its own to probe here


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="all", help="methods to train and probe (default: every one but "
                   "adapter_fusion)")  # fmt: skip
    p.add_argument("--tasks", default=",".join(OFFLINE_POOL), help="dataset configs, or folder:/path entries")
    p.add_argument("--sequential", default=",".join(SEQUENTIAL), help="methods to run sequentially ('' for none)")
    p.add_argument("--pairs", default=",".join(PAIRS), help="orderings A:B of two --tasks entries")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args, overrides = p.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        p.error(f"unknown option {unknown[0]}; what is not an option is a run.py override (backbone=...)")
    import vpeft

    known = vpeft.list_methods()
    methods = [m for m in known if m not in ALONE] if args.methods == "all" else args.methods.split(",")
    sequential = [m for m in args.sequential.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    for m in [*methods, *sequential]:
        if m not in known or m in ALONE:
            p.error(f"method {m!r} cannot be probed here; methods: {', '.join(m for m in known if m not in ALONE)}")
    if len(tasks) < 2:
        p.error("--tasks needs at least two tasks, so each run has another to be probed on")
    pairs = []
    for pair in (q for q in args.pairs.split(",") if q):
        a, _, b = pair.rpartition(":")
        if a not in tasks or b not in tasks or a == b:
            p.error(f"--pairs {pair!r}: each ordering is A:B of two different --tasks entries")
        pairs.append((a, b))
    run = [sys.executable, str(ROOT / "run.py")]
    failed = 0

    def launch(cmd: list[str]) -> None:
        nonlocal failed
        print("$", " ".join(cmd), flush=True)
        if not args.dry_run and subprocess.call(cmd, cwd=ROOT) != 0:
            failed += 1  # the records say which; the benchmark goes on with what finished

    every = ",".join(sorted(set(methods) | set(sequential)))
    for task in tasks:  # 1. the runs, with their deltas
        launch([*run, "-m", f"method={every}", "protocol=final", *dataset_overrides(task), *overrides])
    for task in tasks:  # 2. retention on the other tasks
        others = ",".join(t for t in tasks if t != task)
        launch([*run, "-m", "job=retention", f"method={','.join(methods)}", *dataset_overrides(task),
                f"probe.tasks=[{others}]", *overrides])  # fmt: skip
    for a, b in pairs:  # 3. sequential fine-tuning
        if sequential:
            launch([*run, "-m", "job=sequential", f"method={','.join(sequential)}", f"sequential.tasks=[{a},{b}]",
                    *overrides])  # fmt: skip
    if failed:
        print(f"forgetting_bench: {failed} command(s) failed; their records say why", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
