"""The VTAB-1k protocol for one method, as one command.

    python scripts/vtab1k.py lora [--stage tune select final] [--tasks cifar100,dtd] [HYDRA OVERRIDES...]

1. tune:   `run.py -m` over tasks x the recipe's grid (conf/experiment/vtab1k_<method>.yaml), protocol=tune
           (train800 -> val200, seed 0);
2. select: per task tuned under the recipe (these tasks and any tuned before), the grid point with
           the best mean val200 top-1 -> <paths.results>/../hparams/<backbone>/<method>.json
           (outputs/hparams by default; the finals rerun from it without the search: `run.py hparams=<file>`);
3. final:  `run.py -m` over tasks x seeds with hparams=<that file>, protocol=final (train800val200 -> test).

Extra arguments are Hydra overrides passed to every run, e.g. `hydra/launcher=submitit_slurm
hydra.launcher.partition=gpu` or `hydra/launcher=joblib hydra.launcher.n_jobs=8` (see README).
Finished runs are skipped, failed ones rerun, so the command can simply be repeated after a crash.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vpeft.config  # noqa: E402,F401  (resolvers)
from vpeft.errors import ConfigError  # noqa: E402
from vpeft.halving import Halving, advance  # noqa: E402
from vpeft.jobs import rungs as rungs_mod  # noqa: E402
from vpeft.results import iter_records  # noqa: E402
from vpeft.results.record import backbone_id, hashed_config  # noqa: E402
from vpeft.vtab import TASKS, _order_key, get_path, is_tunable, select_hparams, tunable_keys, write_hparams  # noqa: E402

STAGES = ("tune", "select", "final")


def _value(v) -> str:
    return "null" if v is None else str(v)


def _tune_record(r: dict, task: str, method: str, backbone: str, recipe: str | None, epochs: int) -> bool:
    """A tune run of this method, task, backbone, recipe and schedule (whose epochs the rungs are)."""
    config = r.get("config") or {}
    run = (r.get("protocol"), r.get("dataset"), r.get("method"), r.get("backbone"))
    setting = (get_path(config, "recipe"), get_path(config, "trainer.epochs"))
    return run == ("tune", task, method, backbone) and setting == (recipe, epochs)


def rung_scores(records, keys: list[str], rung: int, out: set) -> dict[tuple, float | None]:
    """Each grid point's val200 top-1 at epoch ``rung`` (its history's evaluation there, whether it stopped at the
    rung or went on past it), None for a point that failed or has no evaluation there; points in ``out`` (stopped
    at an earlier rung) are left out. From the records alone, so a lost halving file is rebuilt the same."""
    scores: dict[tuple, float | None] = {}
    for r in records:
        point = tuple(get_path(r["config"], k) for k in keys)
        if _order_key((dict(zip(keys, point)),)) in out:
            continue
        at = [h.get("eval_top1") for h in (r.get("metrics") or {}).get("history") or [] if h.get("epoch") == rung]
        scores[point] = at[0] if r.get("status") == "ok" and at else None
    return scores


def tune_by_halving(halving, launch, tune, keys, results, file, args, cfg, recipe, backbone) -> int:
    """The tune stage as successive halving: one sweep of the grid per rung, each stopping its runs at the rung
    (``stop_after``; a run that went on continues from its last rung), the points halving stopped listed in
    ``file`` (``halving=``: their runs stay at their rung); after each rung but the last the best
    ``max(1, n // eta)`` of each task's points go on."""
    stopped = rungs_mod.read_stopped(file, keys, eta=halving.eta, rungs=list(halving.rungs))  # a rerun's decisions
    tasks = args.tasks.split(",")
    epochs = int(cfg.trainer.epochs)
    for i, rung in enumerate(halving.rungs):
        if not args.dry_run:
            rungs_mod.write_stopped(file, keys, stopped, eta=halving.eta, rungs=list(halving.rungs))
        stop = [f"stop_after={rung}"] if rung < epochs else []
        print(f"halving: rung {i + 1}/{len(halving.rungs)}, epoch {rung} of {epochs}", flush=True)
        code = launch([*tune, f"halving={file}", *stop])
        if code != 0 or i == len(halving.rungs) - 1 or args.dry_run:
            if args.dry_run and i < len(halving.rungs) - 1:
                continue
            return code
        for task in tasks:
            out = {_order_key((e["values"],)) for e in stopped.get(task, [])}
            tuned = (
                r for _, r in iter_records(results) if _tune_record(r, task, cfg.method.name, backbone, recipe, epochs)
            )
            scores = rung_scores(tuned, keys, rung, out)
            live = sorted(scores, key=_order_key)
            going = advance(halving, i, live, scores)
            stopped.setdefault(task, []).extend({"values": dict(zip(keys, p)), "epoch": rung} for p in live
                                                if p not in going)  # fmt: skip
            print(f"  {task}: {len(going)} of {len(live)} points go on past epoch {rung}", flush=True)
    return 0


class OneLineParser(argparse.ArgumentParser):
    """A typo gets one line that names it (and exit 2), not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", help="method name, e.g. lora (uses conf/experiment/vtab1k_<method>.yaml)")
    parser.add_argument("--stage", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run, in order")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated datasets (default: all 19)")
    parser.add_argument("--seeds", default=None, help="final-stage seeds, e.g. 0,1,2 (default: the recipe's)")
    parser.add_argument("--experiment", default=None, help="recipe name (default: vtab1k_<method>)")
    parser.add_argument(
        "--grid",
        action="append",
        metavar="KEY=V1,V2",
        default=None,
        help="replace the recipe's tune grid, one key per --grid, e.g. --grid optim.lr=1e-3,5e-3 --grid method.r=4,8",
    )
    parser.add_argument(
        "--pack", type=int, default=1, metavar="K", help="train up to K runs of a sweep together (run.py's pack=K)"
    )
    parser.add_argument(
        "--tune",
        choices=("grid", "halving"),
        default="grid",
        help="the tune stage: the full grid (default), or successive halving over it",
    )
    parser.add_argument("--eta", type=int, default=2, help="halving: the best 1/eta of the points go on at a rung")
    parser.add_argument(
        "--rungs", default=None, help="halving: rungs in epochs, the last the schedule's end (default: 1/4, 1/2, all)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args, overrides = parser.parse_known_args(argv)
    if args.pack < 1:
        parser.error(f"--pack must be at least 1, got {args.pack}")
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unknown option {unknown[0]}; what is not an option is a run.py override (optim.lr=1e-3)")
    swept = [o for o in overrides if "=" in o and "," in o.split("=", 1)[1] and o.split("=", 1)[1][:1] not in "[{'\""]
    if swept:
        key, values = swept[0].split("=", 1)
        parser.error(
            f"{swept[0]} would sweep every stage, the final runs included; a tune grid takes --grid {key}={values}"
        )
    experiment = args.experiment or f"vtab1k_{args.method}"
    if not (ROOT / "conf" / "experiment" / f"{experiment}.yaml").is_file():
        known = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("vtab1k_*.yaml"))
        parser.error(f"no recipe conf/experiment/{experiment}.yaml; recipes: {', '.join(known)}")
    # a preset on the command line (+experiment=cpu) is composed after the recipe, whose settings it adjusts
    presets = [p for o in overrides if o.startswith("+experiment=") for p in o.split("=", 1)[1].strip("[]").split(",")]
    overrides = [o for o in overrides if not o.startswith("+experiment=")]
    experiments = f"[{','.join([experiment, *presets])}]" if presets else experiment
    run_overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[f"+experiment={experiments}", f"method={args.method}", *run_overrides])
    except Exception as e:  # Hydra's composition errors: an unknown key, a bad override
        parser.error("; ".join(line for line in str(e).splitlines() if line and not line[0].isspace()))
    grid = OmegaConf.to_container(cfg.sweep.grid, resolve=True)
    if args.grid:
        bad = [item for item in args.grid if "=" not in item or not item.split("=", 1)[1]]
        if bad:
            parser.error(f"--grid takes one KEY=V1,V2 item, got {bad[0]!r}")
        grid = {k: v.split(",") for k, v in (item.split("=", 1) for item in args.grid)}
    fixed = [k for k in grid if not is_tunable(k)]
    if fixed:
        parser.error(f"--grid {fixed[0]}: a tune grid varies only {tunable_keys()} (hyperparameters, not what names "
                     "a run: seeds are --seeds, the rest a run.py override)")  # fmt: skip
    halving = None
    if args.tune == "halving":
        try:
            rungs = [int(r) for r in args.rungs.split(",")] if args.rungs else None
            halving = Halving.for_schedule(int(cfg.trainer.epochs), eta=args.eta, rungs=rungs)
        except ValueError as e:
            parser.error(f"--rungs / --eta: {e}")
    seeds = args.seeds or ",".join(str(s) for s in cfg.sweep.seeds)
    results = Path(cfg.paths.results)
    backbone = backbone_id(OmegaConf.to_container(cfg.backbone, resolve=True))
    # a variant recipe (vtab1k_vpt_deep_adamw) keeps its chosen values apart from the method's own recipe
    variant = (
        experiment.removeprefix(f"vtab1k_{args.method}") if experiment.startswith(f"vtab1k_{args.method}_") else ""
    )
    hparams = Path(cfg.paths.results).parent / "hparams" / backbone / f"{cfg.method.name}{variant}.json"
    recipe = cfg.get("recipe")  # records of another recipe (or of one from before its changes) never count
    base = [sys.executable, str(ROOT / "run.py"), "-m", f"+experiment={experiments}", f"method={args.method}"]
    base.append(f"dataset={args.tasks}")

    def launch(extra: list[str]) -> int:
        cmd = [*base, *extra, *overrides, *([f"pack={args.pack}"] if args.pack > 1 else [])]
        print("$", " ".join(cmd), flush=True)
        return 0 if args.dry_run else subprocess.call(cmd)  # in the caller's folder, where it reads the records

    for stage in args.stage:
        if stage == "tune":
            sweep = [f"{k}={','.join(_value(v) for v in values)}" for k, values in grid.items()]
            if halving is not None:
                code = tune_by_halving(halving, launch, ["protocol=tune", "seed=0", *sweep], list(grid), results,
                                       hparams.with_suffix(".halving.json"), args, cfg, recipe, backbone)  # fmt: skip
            else:
                code = launch(["protocol=tune", "seed=0", *sweep])
            if code != 0:
                return code  # 2: some runs had bad input (the sweep's summary names the fix), 1: some failed
        elif stage == "select":
            if args.dry_run:
                print(f"select: best val200 top-1 per task over {list(grid)} -> {hparams}")
                continue
            records = [r for _, r in iter_records(results) if get_path(r.get("config") or {}, "recipe") == recipe]
            # every task tuned under this recipe keeps its choice, so tasks can be run in batches
            try:  # tune runs that differ in more than the grid and the seed are refused, not averaged
                chosen = select_hparams(records, list(grid), method=cfg.method.name, backbone=backbone,
                                        settings=lambda r: hashed_config(r["config"], r.get("compute")))  # fmt: skip
            except ConfigError as e:
                print(f"select: error: {e} (records under {results})", file=sys.stderr)
                return 2
            tasks = args.tasks.split(",")
            missing = sorted(set(tasks) - set(chosen))
            if not set(chosen) & set(tasks):
                print(
                    f"select: no finished tune runs of {cfg.method.name} on {backbone} under {results}"
                    f" (recipe {recipe})"
                )
                return 1
            write_hparams(hparams, chosen, cfg.method.name, backbone, list(grid))
            for task in (t for t in tasks if t in chosen):
                c = chosen[task]
                print(f"  {task:22s} val top-1 {c['val_top1']:6.2f}  {c['values']}  ({c['n_candidates']} grid points)")
            if missing:
                print(f"select: no finished tune runs for {', '.join(missing)}: their final runs will fail")
            others = sorted(set(chosen) - set(tasks))
            kept = f" (with the choices for {', '.join(others)}, tuned earlier under this recipe)" if others else ""
            print(f"select: wrote {hparams}{kept}")
        elif stage == "final" and (code := launch(["protocol=final", f"seed={seeds}", f"hparams={hparams}"])) != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
