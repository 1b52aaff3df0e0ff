"""Composition per method: merge the deltas of a task pool with every algorithm, and fuse adapters.

    python scripts/merge_bench.py                                   # the offline pool, the default methods
    python scripts/merge_bench.py --methods lora,ssf --algorithms task_arithmetic,ties backbone=dinov2_s14_offline
    python scripts/merge_bench.py --tasks sun397,stanford_cars,resisc45,eurosat,svhn,gtsrb,mnist,dtd ...  # with data

For each method it reuses the finished runs of every task (protocol=tune and final, the same run
config) and trains only the missing ones, through `run.py -m` (the same launcher and records as any
sweep); then it runs `run.py -m job=merge` with every algorithm over the pool (weight space for
mergeable methods; the adapters' own parameters, averaged, for the others); and, for the adapter
methods in --fusion, trains AdapterFusion on each task over the pool's adapters. Every result is a
record (runs under paths.results, merges under paths.merges): `scripts/leaderboard.py` shows them.
Anything after the options is passed to every run.py call (backbone=..., trainer.epochs=...,
hydra/launcher=slurm, ...).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_CIFAR10 = ROOT.parent / "shared" / "data" / "vtab-1k" / "cifar10"
# every real task the data layer builds without a network: two torchvision/sklearn sets, the VTAB-1k
# cifar10 folder of ../shared and VTAB's dSprites location task, regenerated from its factor definitions
OFFLINE_POOL = ["digits", "fashion_mnist", f"folder:{SHARED_CIFAR10}", "dsprites_loc"]
METHODS = ["lora", "ssf", "bitfit", "ia3", "full", "adapter_pfeiffer"]
ALGORITHMS = ["task_arithmetic", "ties", "dare_ties", "weighted_average"]


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def dataset_overrides(task: str) -> list[str]:
    if task.startswith("folder:"):
        return ["dataset=folder", f"dataset.root={task.split(':', 1)[1]}"]
    return [f"dataset={task}"]


def delta_files(method: str, tasks: list[str], protocol: str, overrides: list[str]) -> list[Path]:
    """Where the runs of ``method`` on ``tasks`` under ``protocol`` (this run config) keep their deltas."""
    from hydra import compose, initialize_config_dir

    from vpeft.jobs.merge import run_config
    from vpeft.jobs.train import plan_run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={method}", *(o for o in overrides if not o.startswith("hydra"))])
    return [plan_run(run_config(cfg, t, protocol)).record_path.with_suffix(".safetensors") for t in tasks]


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--tasks", default=",".join(OFFLINE_POOL), help="dataset configs, or folder:/path entries")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
    p.add_argument(
        "--fusion", default="adapter_pfeiffer", help="adapter methods to fuse with AdapterFusion ('' for none)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args, overrides = p.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        p.error(f"unknown option {unknown[0]}; what is not an option is a run.py override (backbone=...)")
    import vpeft
    from vpeft.methods import METHODS as REGISTRY

    methods = [m for m in args.methods.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    algorithms = [a for a in args.algorithms.split(",") if a]
    fusion = [m for m in args.fusion.split(",") if m]
    for m in [*methods, *fusion]:
        if m not in vpeft.list_methods():
            p.error(f"unknown method {m!r}; methods: {', '.join(vpeft.list_methods())}")
    if len(tasks) < 2:
        p.error("--tasks needs at least two tasks")
    run = [sys.executable, str(ROOT / "run.py")]
    failed = 0

    def launch(cmd: list[str]) -> None:
        nonlocal failed
        print("$", " ".join(cmd), flush=True)
        if not args.dry_run and subprocess.call(cmd, cwd=ROOT) != 0:
            failed += 1  # the records say which; the benchmark goes on with what finished

    # 1. every (method, task) trained under both protocols; finished runs are skipped
    for task in tasks:
        launch([*run, "-m", f"method={','.join(sorted(set(methods) | set(fusion)))}", "protocol=tune,final",
                *dataset_overrides(task), *overrides])  # fmt: skip
    # 2. merges: weight space where the method allows it, the delta's own tensors (averaged) otherwise
    pool = f"merge.tasks=[{','.join(tasks)}]"
    for m in methods:
        if REGISTRY.get(m).mergeable:
            launch([*run, "-m", "job=merge", f"method={m}", f"merge={','.join(algorithms)}", pool, *overrides])
        else:
            launch([*run, "job=merge", f"method={m}", "merge=weighted_average", "merge.space=delta", pool, *overrides])
    # 3. AdapterFusion on each task over the pool's adapters (of the same protocol)
    for m in fusion:
        for protocol in ("tune", "final"):
            if args.dry_run:
                files = f"<the {protocol} deltas of {m} on every task>"
            else:
                files = ",".join(str(q) for q in delta_files(m, tasks, protocol, overrides))
            for task in tasks:
                launch([*run, "method=adapter_fusion", f"method.adapters=[{files}]", f"protocol={protocol}",
                        *dataset_overrides(task), *overrides])  # fmt: skip
    if failed:
        print(f"merge_bench: {failed} command(s) failed; their records say why", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
