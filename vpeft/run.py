"""The one module that reads the Hydra config and touches paths: a config in, a run record out.

``run.py`` at the project root calls ``main(cfg)``. Everything below it (backbones, data, methods,
engine, bench, results) takes plain objects.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

import vpeft
from vpeft.engine import DivergedError, TrainConfig, train
from vpeft.env import environment, resolve_device
from vpeft.errors import ConfigError, VpeftError
from vpeft.methods import METHODS
from vpeft.results import SCHEMA_VERSION, config_hash, read_record, record_path, write_record
from vpeft.vtab import PROTOCOL_SPLITS

log = logging.getLogger("vpeft")

# Config keys that never change a run's result: left out of its hash, so reruns find it.
NOT_HASHED = ("paths", "logger", "bench", "save_delta", "skip_finished", "device", "hparams", "sweep", "jobs_per_gpu")
NOT_HASHED_TRAINER = ("progress", "data_on_device", "eval_batch_size")


class InputError(VpeftError):
    """Bad input found before training: exits non-zero and leaves no record."""


@dataclass
class Plan:
    """What a run is, decided from the config alone before anything heavy happens."""

    cfg: DictConfig
    resolved: dict[str, Any]
    overrides: list[str]
    method: str
    method_config: dict[str, Any]
    dataset: str
    backbone: str
    protocol: str
    seed: int
    config_hash: str
    record_path: Path

    def identity(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "dataset": self.dataset,
            "backbone": self.backbone,
            "protocol": self.protocol,
            "seed": self.seed,
            "config_hash": self.config_hash,
        }


def _hydra_overrides() -> tuple[list[str], bool]:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return list(hc.overrides.task), hc.mode == RunMode.MULTIRUN
    except (ImportError, ValueError):  # called outside a Hydra app (tests, notebooks)
        return [], False


def dataset_id(ds: dict[str, Any]) -> str:
    """The name records and leaderboards use: the task name, or a folder's own name."""
    if ds.get("id"):
        return str(ds["id"])
    if ds["name"] in ("folder", "imagefolder"):
        return Path(str(ds["root"])).resolve().name
    return str(ds["name"])


def backbone_id(bb: dict[str, Any]) -> str:
    """timm name, marked when its weights are not timm's own (offline source, local checkpoint, none)."""
    name = str(bb["name"])
    if bb.get("offline"):
        return f"{name}+{bb['offline']}"
    if bb.get("checkpoint"):
        return f"{name}+ckpt-{Path(str(bb['checkpoint'])).stem}"
    if not bb.get("pretrained", True):
        return f"{name}+random"
    return name


def apply_hparams(cfg: DictConfig) -> None:
    """With ``hparams=FILE``, set the values chosen for this (method, dataset) by the tune stage."""
    from vpeft.sweep import hparams_for

    path = cfg.get("hparams")
    if not path:
        return
    ds = OmegaConf.to_container(cfg.dataset, resolve=True)
    for key, value in hparams_for(path, dataset_id(ds), cfg.method.name).items():
        OmegaConf.update(cfg, key, value, merge=False)


def plan_run(cfg: DictConfig) -> Plan:
    """Resolve and validate the config; compute the run's identity and record path."""
    try:
        apply_hparams(cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        key = e.full_key
        hint = " (a task folder in the VTAB-1k layout)" if key == "dataset.root" else ""
        raise InputError(f"{key} must be set: add {key}=PATH{hint} to the command line") from None
    except OmegaConfBaseException as e:
        raise InputError(f"configuration error: {e}") from None
    overrides, _ = _hydra_overrides()
    method_cfg = {k: v for k, v in resolved["method"].items() if k != "name"}
    method = METHODS.get(resolved["method"]["name"]).from_kwargs(**method_cfg)  # validates the fields
    TrainConfig(**resolved["trainer"])  # validates the trainer
    protocol = resolved["protocol"]
    if protocol not in PROTOCOL_SPLITS:
        raise ConfigError(f"protocol must be one of {', '.join(PROTOCOL_SPLITS)}, got {protocol!r}")
    hashed = {k: v for k, v in resolved.items() if k not in NOT_HASHED}
    hashed["trainer"] = {k: v for k, v in resolved["trainer"].items() if k not in NOT_HASHED_TRAINER}
    ident = {
        "method": method.name,
        "dataset": dataset_id(resolved["dataset"]),
        "backbone": backbone_id(resolved["backbone"]),
        "protocol": protocol,
        "seed": int(resolved["seed"]),
        "config_hash": config_hash(hashed),
    }
    return Plan(
        cfg=cfg,
        resolved=resolved,
        overrides=overrides,
        method_config=method.config_dict(),
        record_path=record_path(resolved["paths"]["results"], ident),
        **ident,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _base_record(plan: Plan, env: dict[str, Any], started: str) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "status": "failed",
        "error": None,
        **plan.identity(),
        "method_config": plan.method_config,
        "data_source": None,
        "backbone_weights": None,
        "metrics": {"train_loss": None, "top1": None, "eval_split": PROTOCOL_SPLITS[plan.protocol][1]},
        "params": {"trainable": None, "trainable_excl_head": None, "total": None},
        "cost": {"train_seconds": None, "train_images_per_s": None, "peak_mem_mb": None},
        "env": env,
        "config": plan.resolved,
        "overrides": plan.overrides,
        "started_at": started,
        "finished_at": None,
    }


def _finish(record: dict[str, Any], plan: Plan, status: str, error: str | None) -> dict[str, Any]:
    record.update(status=status, error=error, finished_at=_now())
    write_record(plan.record_path, record)
    log.info("record: %s (%s)", plan.record_path, status)
    return record


def _input_failure(e: Exception, multirun: bool, plan: Plan | None, env: dict | None, started: str):
    """Bad input: a single run exits 2 with no record; in a sweep it is recorded and the sweep goes on."""
    message = str(e)
    if multirun and plan is not None:
        log.error("%s", message)
        return _finish(_base_record(plan, env or environment(), started), plan, "failed", message)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _write_status(record: dict[str, Any] | None, skipped: bool, plan: Plan | None) -> None:
    """A small status file in the Hydra job folder, read by the sweep summary callback."""
    try:
        from hydra.core.hydra_config import HydraConfig

        folder = Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return
    status = {
        "status": record["status"] if record else "failed",
        "skipped": skipped,
        "record": str(plan.record_path) if plan else None,
        "error": record.get("error") if record else None,
        "overrides": plan.overrides if plan else None,
    }
    from vpeft.callbacks import STATUS_FILE
    from vpeft.results import write_json_atomic

    write_json_atomic(folder / STATUS_FILE, status)


def _device(cfg: DictConfig, multirun: bool) -> torch.device:
    if str(cfg.device) == "auto" and multirun and torch.cuda.is_available():
        from vpeft.env import claim_gpu

        return claim_gpu(int(cfg.get("jobs_per_gpu", 1)))
    return resolve_device(str(cfg.device))


def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Run one (backbone, method, dataset, protocol, seed) and write its record; return the record."""
    started = _now()
    _, multirun = _hydra_overrides()
    plan: Plan | None = None
    try:
        plan = plan_run(cfg)
        device = _device(cfg, multirun)
    except VpeftError as e:
        record = _input_failure(e, multirun, plan, None, started)
        _write_status(record, False, plan)
        return record
    if cfg.bench.get("only", False):
        from vpeft.bench_run import run_bench

        return run_bench(plan, device)
    if cfg.skip_finished and plan.record_path.exists():
        try:
            previous = read_record(plan.record_path)
        except (OSError, ValueError):
            previous = None
        if previous is not None and previous["status"] == "ok":
            log.info("skip: %s is finished (%s)", plan.record_path, previous["metrics"]["top1"])
            print(f"skipped (finished): {plan.record_path}")
            _write_status(previous, True, plan)
            return previous
    record = None
    try:
        record = execute(plan, device, multirun, started)
    finally:
        _write_status(record, False, plan)
    return record


def execute(plan: Plan, device: torch.device, multirun: bool, started: str) -> dict[str, Any]:
    from hydra.utils import instantiate

    from vpeft.backbones import backbone_from_config, create_backbone
    from vpeft.data import load_task
    from vpeft.loggers import NullLogger, make_logger

    r = plan.resolved
    env = environment(device)
    record = _base_record(plan, env, started)
    logger = NullLogger()
    training = False
    try:
        seed_everything(plan.seed)
        bb_cfg = r["backbone"]
        bb = backbone_from_config(bb_cfg, num_classes=0)
        record["backbone_weights"] = bb.weights
        ds = dict(r["dataset"])
        name = ds.pop("name")
        ds.pop("id", None)
        task = load_task(
            name,
            plan.protocol,
            image_size=tuple(bb.input_size[1:]),
            interpolation=bb.interpolation,
            root=ds.pop("root", None),
            vtab_root=r["paths"]["vtab_root"],
            download_root=r["paths"]["data_root"],
            cache_dir=os.path.join(r["paths"]["cache"], "data"),
            **ds,
        )
        record["data_source"] = task.source
        record["data"] = {
            "train_split": task.train.name,
            "eval_split": task.eval.name,
            "n_train": len(task.train.labels),
            "n_eval": len(task.eval.labels),
            "num_classes": task.num_classes,
            "input_size": list(bb.input_size),
            "mean": list(bb.mean),
            "std": list(bb.std),
            "interpolation": bb.interpolation,
            "normalization": "backbone pretrained config (timm)",
        }
        model = bb.model
        torch.manual_seed(plan.seed)  # the head and the delta start from the run's seed
        model.reset_classifier(task.num_classes)
        vpeft.apply_method(model, plan.method, **{k: v for k, v in r["method"].items() if k != "name"})
        count = vpeft.count_parameters(model)
        record["params"] = {
            "trainable": count.trainable,
            "trainable_excl_head": count.trainable_excl_head,
            "total": count.total,
        }
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = instantiate(r["optim"])(params)
        logger = make_logger(r["logger"], plan.resolved, _run_name(plan))
        training = True
        result = train(
            model,
            task.train.images,
            task.train.labels,
            task.eval.images,
            task.eval.labels,
            optimizer,
            TrainConfig(**r["trainer"]),
            bb.mean,
            bb.std,
            device,
            seed=plan.seed,
            on_epoch_end=logger.log_epoch,
        )
    except KeyboardInterrupt:
        _finish(record, plan, "interrupted", "interrupted by the user (Ctrl-C)")
        logger.finish(ok=False)
        raise
    except DivergedError as e:
        log.error("%s", e)
        _finish(record, plan, "failed", str(e))
        logger.finish(ok=False)
        if multirun:
            return record
        sys.exit(1)
    except VpeftError as e:
        if training:
            _finish(record, plan, "failed", str(e))
            logger.finish(ok=False)
            if multirun:
                return record
            raise
        return _input_failure(e, multirun, plan, env, started)
    except Exception as e:
        _finish(record, plan, "failed", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")
        logger.finish(ok=False)
        if multirun:
            log.exception("run failed; the sweep goes on")
            return record
        raise
    record["metrics"] = {
        "top1": result.top1,
        "train_loss": result.train_loss,
        "eval_loss": result.eval_loss,
        "eval_split": task.eval.name,
        "train_split": task.train.name,
        "epochs": len(result.epochs),
        "best_epoch_top1": result.best_epoch_top1,  # selection on the evaluated split: never ranks
        "best_epoch": result.best_epoch,
        "history": [
            {"epoch": e.epoch, "train_loss": e.train_loss, "lr": e.lr, "eval_top1": e.eval_top1} for e in result.epochs
        ],
    }
    record["cost"] = {
        "train_seconds": result.train_seconds,
        "train_images_per_s": result.train_images_per_s,
        "peak_mem_mb": result.peak_mem_mb,
        "peak_mem_kind": result.peak_mem_kind,
        "eval_seconds": result.eval_seconds,
        "data_seconds": task.decode_seconds,
        "data_cache_hit": task.cache_hit,
        "amp": result.amp,
    }
    bench_cfg = {k: v for k, v in r["bench"].items() if k not in ("only", "num_classes")}
    if bench_cfg.get("latency", True) or bench_cfg.get("flops", True):
        from vpeft.bench import BenchConfig, cost_summary

        bare = create_backbone(
            bb_cfg["name"], task.num_classes, pretrained=False, img_size=bb_cfg.get("img_size")
        ).model  # the same architecture and head without any method: the reference of every ratio
        record["cost"].update(cost_summary(model, bare, bb.input_size, device, BenchConfig.from_dict(bench_cfg)))
    if plan.cfg.save_delta:
        delta = vpeft.save_delta(model, plan.record_path.with_suffix(".safetensors"), extra=plan.identity())
        record["delta_file"] = delta.name
    _finish(record, plan, "ok", None)
    logger.log_record(record)
    logger.finish(ok=True)
    log.info("%s %s on %s: top-1 %.2f%% (%s)", plan.backbone, plan.method, plan.dataset, result.top1, task.eval.name)
    print(f"top-1 {result.top1:.2f}% on {task.eval.name} | record: {plan.record_path}")
    return record


def _run_name(plan: Plan) -> str:
    return f"{plan.dataset}-{plan.method}-{plan.protocol}-s{plan.seed}"
