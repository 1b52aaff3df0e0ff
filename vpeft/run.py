"""The one module that reads the Hydra config and touches paths: a config in, a run record out.

``run.py`` at the project root calls ``main(cfg)``. Everything below it (backbones, data, methods,
engine, bench, results) takes plain objects.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import random
import signal
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
from vpeft.results import SCHEMA_VERSION, config_hash, read_record, record_path, write_record_guarded
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
    trainer = _trainer_config(resolved["trainer"])
    resolved["trainer"]["warmup_epochs"] = trainer.warmup_epochs  # what runs is what the record says
    OmegaConf.update(cfg, "trainer.warmup_epochs", trainer.warmup_epochs, merge=False)
    _check_values(resolved)
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


def _trainer_config(trainer: dict[str, Any]) -> TrainConfig:
    try:
        return TrainConfig(**trainer)
    except TypeError as e:  # a value of the wrong kind reaching the dataclass's own checks
        raise ConfigError(f"trainer: {e}") from None


def _check_values(resolved: dict[str, Any]) -> None:
    """Values of the wrong kind fail here, named, before anything heavy starts."""
    seed = resolved.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    for key in ("lr", "weight_decay"):
        value = resolved["optim"].get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"optim.{key} must be a finite number >= 0, got {value!r}")
    if not resolved["optim"].get("lr", 1):
        raise ConfigError("optim.lr must be positive, got 0")


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
    """Write the record, unless it would replace a finished (ok) run of this configuration with a worse one."""
    record.update(status=status, error=error, finished_at=_now())
    try:
        _, written = write_record_guarded(plan.record_path, record)
    except OSError as e:
        raise OSError(f"could not write the record {plan.record_path}: {e.strerror or e}") from e
    if written:
        log.info("record: %s (%s)", plan.record_path, status)
    else:
        log.warning("record: %s holds a finished (ok) run of this configuration; this %s run left it as it is",
                    plan.record_path, status)  # fmt: skip
    return record


def _input_failure(e: Exception, multirun: bool, plan: Plan | None, env: dict | None, started: str):
    """Bad input: a single run exits 2 with no record; in a sweep it is recorded and the sweep goes on."""
    message = str(e)
    if multirun:
        log.error("%s", message)
        if plan is None:  # no identity to record under: the job's status file carries the error
            return None
        return _finish(_base_record(plan, env or environment(), started), plan, "failed", message)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _write_status(record: dict[str, Any] | None, skipped: bool, plan: Plan | None, error: str | None = None) -> None:
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
        "error": record.get("error") if record else error,
        "overrides": plan.overrides if plan else _hydra_overrides()[0],
    }
    from vpeft.callbacks import STATUS_FILE
    from vpeft.results import write_json_atomic

    write_json_atomic(folder / STATUS_FILE, status)


def _device(cfg: DictConfig, multirun: bool) -> torch.device:
    if str(cfg.device) == "auto" and multirun and torch.cuda.is_available():
        from vpeft.env import claim_gpu

        return claim_gpu(int(cfg.get("jobs_per_gpu", 1)))
    return resolve_device(str(cfg.device))


class Terminated(KeyboardInterrupt):
    """SIGTERM, what schedulers (SLURM, Kubernetes) send before they kill a job: handled like Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated(f"terminated by signal {signal.Signals(signum).name}")


_entered = False


def entered() -> bool:
    """Whether a run (or a sweep's first callback) started: Hydra's exit 1 before that is a config error."""
    return _entered


def mark_entered() -> None:
    global _entered
    _entered = True


def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Run one (backbone, method, dataset, protocol, seed) and write its record; return the record."""
    mark_entered()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        return _main(cfg)
    except Terminated:
        if _hydra_overrides()[1]:
            raise  # in a sweep the launcher decides; the record says interrupted
        sys.exit(128 + signal.SIGTERM)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _main(cfg: DictConfig) -> dict[str, Any] | None:
    started = _now()
    _, multirun = _hydra_overrides()
    plan: Plan | None = None
    try:
        plan = plan_run(cfg)
        device = _device(cfg, multirun)
    except Exception as e:  # any error before the run starts is bad input: exit 2 (or, in a sweep, recorded)
        if not isinstance(e, VpeftError):
            e = InputError(f"configuration error: {type(e).__name__}: {e}")
        record = _input_failure(e, multirun, plan, None, started)
        _write_status(record, False, plan, error=str(e))
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
    """Set-up, training, then costs and the delta: one record whatever happens in any phase.

    Bad input found while setting up exits 2 with no record (a single run) or a failed record (a
    sweep). Once training has started, an interrupt (Ctrl-C, SIGTERM) or an error in any later
    phase leaves an ``interrupted`` or ``failed`` record that keeps what was measured.
    """
    from hydra.utils import instantiate

    from vpeft.backbones import backbone_from_config, create_backbone
    from vpeft.data import check_task, load_task
    from vpeft.loggers import NullLogger, make_logger

    r = plan.resolved
    env = environment(device)
    record = _base_record(plan, env, started)
    logger = NullLogger()
    phase = "setup"
    try:
        seed_everything(plan.seed)
        ds = dict(r["dataset"])
        name = ds.pop("name")
        ds.pop("id", None)
        where = {
            "root": ds.pop("root", None),
            "vtab_root": r["paths"]["vtab_root"],
            "download_root": r["paths"]["data_root"],
            "cache_dir": os.path.join(r["paths"]["cache"], "data"),
            **ds,
        }
        check_task(name, plan.protocol, **where)  # a wrong folder fails now, not after the backbone's download
        bb_cfg = r["backbone"]
        bb = backbone_from_config(bb_cfg, num_classes=0)
        record["backbone_weights"] = bb.weights
        task = load_task(name, plan.protocol, tuple(bb.input_size[1:]), bb.interpolation, **where)
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
        try:
            optimizer = instantiate(r["optim"])(params)
        except ValueError as e:  # torch's own checks: "Invalid learning rate: nan" ...
            raise ConfigError(f"optim: {e}; check optim.lr and optim.weight_decay") from None
        logger = make_logger(r["logger"], plan.resolved, _run_name(plan))
        phase = "training"
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
        phase = "costs and delta"  # the metrics go into the record before anything else can fail
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
                {"epoch": e.epoch, "train_loss": e.train_loss, "lr": e.lr, "eval_top1": e.eval_top1}
                for e in result.epochs
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
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM through _on_sigterm
        why = str(e) or "interrupted by the user (Ctrl-C)"
        log.error("%s during %s: recording the run as interrupted", why, phase)
        _finish(record, plan, "interrupted", f"{why} during {phase}")
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
        if phase == "setup":
            return _input_failure(e, multirun, plan, env, started)
        _finish(record, plan, "failed", f"{e} (during {phase})")
        logger.finish(ok=False)
        if multirun:
            return record
        raise
    except Exception as e:
        _finish(record, plan, "failed", f"{type(e).__name__}: {e} (during {phase})\n{traceback.format_exc(limit=-3)}")
        logger.finish(ok=False)
        if multirun:
            log.exception("run failed; the sweep goes on")
            return record
        raise
    _finish(record, plan, "ok", None)
    logger.log_record(record)
    logger.finish(ok=True)
    log.info("%s %s on %s: top-1 %.2f%% (%s)", plan.backbone, plan.method, plan.dataset, result.top1, task.eval.name)
    print(f"top-1 {result.top1:.2f}% on {task.eval.name} | record: {plan.record_path}")
    return record


def _run_name(plan: Plan) -> str:
    return f"{plan.dataset}-{plan.method}-{plan.protocol}-s{plan.seed}"
