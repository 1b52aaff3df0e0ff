"""``python run.py ...``: the config picks a job, the job runner runs it.

``run.py`` at the project root calls ``main(cfg)``. A training run is the default;
``bench.only=true`` measures a (backbone, method) without training; ``job=merge`` merges the
deltas of trained runs (conf/merge/). Everything below the jobs
(backbones, data, methods, engine, bench, results, compose) takes plain objects.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vpeft.config import check_keys
from vpeft.errors import ConfigError
from vpeft.jobs import InputError, Plan, entered, mark_entered, run_job
from vpeft.jobs.bench import BenchJob
from vpeft.jobs.merge import MergeJob
from vpeft.jobs.retention import RetentionJob
from vpeft.jobs.sequential import SequentialJob
from vpeft.jobs.train import TrainJob, plan_run

__all__ = ["InputError", "Plan", "entered", "main", "mark_entered", "plan_run"]


JOBS = ("train", "merge", "retention", "sequential")


def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Run the job the config asks for and write its record; return the record."""
    kind = str(cfg.get("job", "train"))
    if kind not in JOBS:
        mark_entered()
        print(f"error: unknown job={kind}; jobs: {', '.join(JOBS)} (bench.only=true measures without training)",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    if kind == "merge":
        return run_job(MergeJob(), cfg)
    if kind == "retention":
        return run_job(RetentionJob(), cfg)
    if kind == "sequential":
        return run_job(SequentialJob(), cfg)
    if cfg.get("pack_job") is not None:
        return run_pack_job(cfg)
    if cfg.get("bench", {}).get("only", False):
        return run_job(BenchJob(), cfg)
    return run_job(TrainJob(), cfg)


def run_pack_job(cfg: DictConfig) -> list[dict[str, Any] | None]:
    """One pack of a sweep (``pack=K``): its runs composed from their own overrides, trained together."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from vpeft.jobs.pack import PACKS_FILE, Member, read_pack, run_pack

    hc = HydraConfig.get()
    sweep_dir = Path(hc.sweep.dir)
    try:
        index = int(cfg.pack_job)
        pack = read_pack(sweep_dir, index)
        pairs = [(int(m["num"]), [str(o) for o in m["overrides"]]) for m in pack]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        mark_entered()
        print(f"error: pack_job={cfg.pack_job}: no such pack in {sweep_dir / PACKS_FILE} ({type(e).__name__}: {e}); "
              "the sweep writes that file and sets pack_job itself: run the sweep with pack=K instead of setting "
              "pack_job", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    members = [Member(num=num, overrides=o, cfg=compose(hc.job.config_name, overrides=o)) for num, o in pairs]
    return run_pack(cfg, members, pack_id=f"{sweep_dir}#{index}")


def unknown_key_hint(argv: list[str], config_dir: str) -> str | None:
    """For Hydra's "Key 'epoch' is not in struct" (``trainer.epoch=3``), whose advice is ``+trainer.epoch=3``: the
    error that names the closest valid key (``did you mean trainer.epochs=3?``); None for any other error."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    args = [a for a in argv if not a.startswith("-") and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:  # a malformed override: Hydra's own message says it
        return None
    plain = [a for a, o in zip(args, parsed) if not o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
    for arg, o in zip(args, parsed):
        key = o.key_or_group
        if o.is_add() or o.is_delete() or "." not in key or key.startswith("hydra"):
            continue
        group, leaf = key.rsplit(".", 1)
        try:
            with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
                cfg = compose("config", [a for a in plain if a != arg])
        except Exception:
            continue
        node = OmegaConf.select(cfg, group)
        if OmegaConf.is_dict(node) and leaf not in node:
            try:
                check_keys(group, {leaf: arg.split("=", 1)[1]}, list(node.keys()))
            except ConfigError as e:
                return f"error: {e}"
    return None
