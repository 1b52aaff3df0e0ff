"""The training job: one (backbone, method, dataset, protocol, seed) trained, evaluated and recorded.

Its plan is the run's identity (the config hash covers everything that changes the result) and
record path; the runner (vpeft.jobs.runner) gives it the shared guarantees of every job.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import random
import re
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

import vpeft
from vpeft.backbones import backbone_from_config, create_backbone
from vpeft.bench import BenchConfig, cost_summary
from vpeft.config import check_keys
from vpeft.data import DIGEST_VERSION, check_task, data_digest, load_task
from vpeft.engine import Resume, TrainConfig, TrainResult, param_groups, train
from vpeft.engine.loop import resolve_amp
from vpeft.engine.packed import PackedRun
from vpeft.env import resolve_device
from vpeft.errors import ConfigError, VpeftError, check_value, shown
from vpeft.jobs import rungs
from vpeft.jobs.runner import Context, InputError, Job, Plan, hydra_overrides
from vpeft.loggers import make_logger
from vpeft.methods import METHODS
from vpeft.results.record import (
    SCHEMA_VERSION,
    RecordError,
    backbone_id,
    compute_id,
    config_hash,
    dataset_id,
    hashed_config,
    record_path,
)
from vpeft.vtab import PROTOCOL_SPLITS, hparams_for

log = logging.getLogger("vpeft")


def apply_hparams(cfg: DictConfig) -> None:
    """With ``hparams=FILE``, set the values chosen for this (method, dataset) by the tune stage, and ``tuned_by``
    to how they were chosen (grid or halving: the record's config says which)."""
    path = cfg.get("hparams")
    if not path:
        if cfg.get("tuned_by") is not None:
            raise ConfigError(f"tuned_by={cfg.tuned_by} without hparams=FILE: tuned_by is set from the hyperparameter "
                              "file a run reads; drop it")  # fmt: skip
        return
    ds = OmegaConf.to_container(cfg.dataset, resolve=True)
    chosen = hparams_for(path, dataset_id(ds), cfg.method.name)
    for key, value in chosen["values"].items():
        OmegaConf.update(cfg, key, value, merge=False)
    OmegaConf.update(cfg, "tuned_by", chosen["tuned_by"], merge=False)


def _trainer_config(trainer: dict[str, Any]) -> TrainConfig:
    try:
        return TrainConfig(**trainer)
    except TypeError as e:  # a value of the wrong kind reaching the dataclass's own checks
        raise ConfigError(f"trainer: {e}") from None


SEED_RANGE = (0, 2**32 - 1)  # numpy's seed range; torch and Python's random take it too, so a seed means one thing
DEVICES = "auto, cpu, cuda or cuda:N"
LOGGERS = {"none": ("auto",), "wandb": ("auto", "online", "offline", "disabled")}  # name -> modes (conf/logger/)
# dataset keys the dataset configs share, checked here; the task's own (root, name, id) where it is found
DATASET_VALUES = {  # key: (kind, range, a valid value)
    "download": ("bool", {}, True),
    "subsample": ("bool", {}, True),
    "split_seed": ("integer", {"low": SEED_RANGE[0], "high": SEED_RANGE[1]}, 0),
    "n_train": ("integer", {"low": 1}, 800),
    "n_val": ("integer", {"low": 1}, 200),
    "test_size": ("integer", {"low": 1, "optional": True}, 2000),
}


def _check_values(resolved: dict[str, Any]) -> None:
    """Every value the config gives, checked for kind and range before anything heavy starts: a wrong one exits 2
    naming the key, the value, the valid range and the fix (TrainConfig, the method's Config and BenchConfig
    check their own groups)."""
    low, high = SEED_RANGE
    check_value("seed", resolved.get("seed"), "integer", low=low, high=high, example=0)
    for key in ("save_delta", "skip_finished"):
        check_value(key, resolved.get(key, True), "bool", example=True)
    check_value("jobs_per_gpu", resolved.get("jobs_per_gpu", 1), "integer", low=1, example=1)
    epochs = (resolved.get("trainer") or {}).get("epochs")
    if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1:  # (TrainConfig checks epochs)
        rungs.stop_epoch(resolved.get("stop_after"), epochs)
    device = resolved.get("device", "auto")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"device must be {DEVICES}, got {shown(device)}; set device=auto")
    hparams = resolved.get("hparams")
    if hparams is not None and (not isinstance(hparams, str) or not hparams):
        raise ConfigError(f"hparams must be a file path or null, got {shown(hparams)}; set hparams=PATH or drop it")
    for key, value in (resolved.get("paths") or {}).items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"paths.{key} must be a folder path, got {shown(value)}; set paths.{key}=DIR")
    logger = resolved.get("logger") or {}
    name, mode = logger.get("name", "none"), logger.get("mode", "auto")
    if mode not in LOGGERS.get(name, ()):
        raise ConfigError(
            f"logger.name={shown(name)} logger.mode={shown(mode)}: the loggers are none and wandb, wandb's modes "
            "auto, online, offline or disabled; set logger=none or logger=wandb"
        )
    _check_optim(resolved["optim"])
    bb = resolved["backbone"]
    check_value("backbone.pretrained", bb.get("pretrained", True), "bool", example=True)
    check_value("backbone.drop_path_rate", bb.get("drop_path_rate", 0.0), low=0, high=1, high_open=True, example=0.1)
    for key, (kind, limits, example) in DATASET_VALUES.items():
        if key in resolved["dataset"]:
            check_value(f"dataset.{key}", resolved["dataset"][key], kind, **limits, example=example)
    bench = resolved["bench"]
    check_value("bench.only", bench.get("only", False), "bool", example=False)
    check_value("bench.num_classes", bench.get("num_classes", 100), "integer", low=1, example=100)
    BenchConfig.from_dict(bench, ignore=("only", "num_classes"))


def _check_optim(optim: dict[str, Any]) -> None:
    """The optimizer's values: vpeft's ranges for the usual ones, then the optimizer built once on a stand-in
    parameter, so that whatever else it refuses (a value of another optimizer's kind) is refused now."""
    check_value("optim.lr", optim.get("lr", 1e-3), low=0, low_open=True, example=1e-3)
    if optim.get("weight_decay") is not None:
        check_value("optim.weight_decay", optim["weight_decay"], low=0, example=1e-4)
    check_value("optim.decay_1d", optim.get("decay_1d", False), "bool", example=False)
    if "eps" in optim:
        check_value("optim.eps", optim["eps"], low=0, low_open=True, example=1e-8)
    if "momentum" in optim:
        check_value("optim.momentum", optim["momentum"], low=0, high=1, high_open=True, example=0.9)
    if "betas" in optim:
        betas = optim["betas"]
        pair = isinstance(betas, (list, tuple)) and len(betas) == 2
        if not pair or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
            raise ConfigError(
                f"optim.betas must be a pair of numbers in [0, 1), got {shown(betas)}; set optim.betas=[0.9,0.999]"
            )
    for key in ("nesterov", "amsgrad", "maximize"):
        if key in optim:
            check_value(f"optim.{key}", optim[key], "bool", example=False)
    from hydra.utils import instantiate

    cfg = {k: v for k, v in optim.items() if k != "decay_1d"}
    try:
        instantiate(cfg)([torch.nn.Parameter(torch.zeros(1))])
    except Exception as e:  # torch's own checks, or an optimizer that does not import: named, with the values
        cause = e.__cause__ or e
        given = " ".join(f"optim.{k}={shown(v)}" for k, v in optim.items() if not k.startswith("_"))
        raise ConfigError(f"optim: {str(optim.get('_target_'))} refuses {given}: {cause}") from None


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _keyword_names(fn: Any, skip: tuple[str, ...] = (), any_ok: bool = True) -> list[str] | None:
    """The named arguments ``fn`` takes; None when it also takes ``**kwargs`` and ``any_ok`` (then any key may be
    right)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any_ok and any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _check_keys(resolved: dict[str, Any]) -> None:
    """Keys a group does not read (``+trainer.epoch=3``) fail here, named with the closest valid key."""
    check_keys("trainer", resolved["trainer"], _fields(TrainConfig))
    check_keys("bench", resolved["bench"], [*_fields(BenchConfig), "only", "num_classes"])
    # backbone_from_config passes create_backbone's named arguments, never its **timm_kwargs
    check_keys("backbone", resolved["backbone"], _keyword_names(create_backbone, ("num_classes",), any_ok=False))
    method = METHODS.get(str(resolved["method"].get("name")))
    check_keys("method", resolved["method"], ["name", *_fields(method.Config)])
    optim = resolved["optim"]
    try:
        from hydra.utils import get_class

        accepted = _keyword_names(get_class(str(optim.get("_target_"))), ("self", "params"))
    except Exception:  # an optimizer that does not import fails, named, where it is built
        accepted = None
    if accepted is not None:
        check_keys("optim", optim, ["_target_", "_partial_", "decay_1d", *accepted])


def build_optimizer(model: torch.nn.Module, optim: dict[str, Any]) -> torch.optim.Optimizer:
    """The resolved ``optim`` group's optimizer over the model's trainable tensors (timm's weight-decay groups)."""
    from hydra.utils import instantiate

    optim_cfg = dict(optim)
    decay_1d = optim_cfg.pop("decay_1d", False)  # vpeft's own field: which tensors decay, not the optimizer's
    groups = param_groups(model, optim_cfg.get("weight_decay"), decay_1d=decay_1d)
    try:
        return instantiate(optim_cfg)(groups)
    except ValueError as e:  # torch's own checks: "Invalid learning rate: nan" ...
        raise ConfigError(f"optim: {e}; check optim.lr and optim.weight_decay") from None


def run_backbone(resolved: dict[str, Any], seed: int) -> Any:
    """The headless backbone a run of ``resolved`` starts from, built as the training job builds it (seeded first:
    a randomly initialised backbone is the run's own only so). Jobs that build on a run's delta load it onto this."""
    seed_everything(seed)
    return backbone_from_config(resolved["backbone"], num_classes=0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _base_record(plan: Plan, env: dict[str, Any], started: str) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "status": "failed",
        "error": None,
        **plan.identity,
        "method_config": plan.extra["method_config"],
        "data_source": None,
        "backbone_weights": None,
        "metrics": {"train_loss": None, "top1": None, "eval_split": PROTOCOL_SPLITS[plan.identity["protocol"]][1]},
        "params": {"trainable": None, "trainable_excl_head": None, "total": None},
        "cost": {"train_seconds": None, "train_images_per_s": None, "peak_mem_mb": None},
        "env": env,
        "config": plan.resolved,
        "overrides": plan.overrides,
        "started_at": started,
        "finished_at": None,
    }


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
    overrides, _ = hydra_overrides()
    _check_keys(resolved)
    method_cfg = {k: v for k, v in resolved["method"].items() if k != "name"}
    method = METHODS.get(resolved["method"]["name"]).from_kwargs(**method_cfg)  # validates the fields
    trainer = _trainer_config(resolved["trainer"])
    resolved["trainer"]["warmup_epochs"] = trainer.warmup_epochs  # what runs is what the record says
    OmegaConf.update(cfg, "trainer.warmup_epochs", trainer.warmup_epochs, merge=False)
    _check_values(resolved)
    protocol = resolved["protocol"]
    if protocol not in PROTOCOL_SPLITS:
        raise ConfigError(f"protocol must be one of {', '.join(PROTOCOL_SPLITS)}, got {protocol!r}")
    dataset = dataset_id(resolved["dataset"])
    if resolved["dataset"].get("id") and (dataset.strip(".") == "" or "/" in dataset or os.sep in dataset):
        raise ConfigError(
            f"dataset.id names the record's folder under paths.results and cannot be a path, got {dataset!r}; "
            "set a plain name such as dataset.id=my_task"
        )
    # the device the runner will take (in a sweep any GPU of the machine: only the type counts) and the precision
    # training resolves on it: a bf16 GPU run is not its config's fp32 CPU run
    device = resolve_device(str(resolved.get("device", "auto")))
    compute = compute_id(device.type, resolve_amp(trainer.amp, device))
    ident = {
        "method": method.name,
        "dataset": dataset,
        "backbone": backbone_id(resolved["backbone"]),
        "protocol": protocol,
        "seed": int(resolved["seed"]),
        "compute": compute,
        "config_hash": config_hash(hashed_config(resolved, compute)),
    }
    try:
        path = record_path(resolved["paths"]["results"], ident)
    except RecordError as e:
        raise ConfigError(f"{e}: dataset.id, backbone.name and method.name must be plain names") from None
    return Plan(
        cfg=cfg,
        resolved=resolved,
        overrides=overrides,
        identity=ident,
        record_path=path,
        extra={
            "method_config": method.config_dict(),
            # the rung successive halving stopped this grid point at (scripts/vtab1k.py --tune halving), or None
            "halted": rungs.stopped_at(cfg.halving, dataset, resolved) if cfg.get("halving") else None,
        },
    )


def _run_name(plan: Plan) -> str:
    i = plan.identity
    return f"{i['dataset']}-{i['method']}-{i['protocol']}-s{i['seed']}"


class TrainJob(Job):
    """Set-up, training, then costs and the delta file."""

    kind = "train"

    def plan(self, cfg: DictConfig) -> Plan:
        return plan_run(cfg)

    def base_record(self, plan: Plan, env: dict[str, Any], started: str) -> dict[str, Any]:
        return _base_record(plan, env, started)

    def describe(self, record: dict[str, Any]) -> str:
        top1 = record["metrics"].get("top1")
        return f"top-1 {top1:.2f}%" if isinstance(top1, (int, float)) else "no top-1"

    def dataset_args(self, plan: Plan) -> tuple[str, dict[str, Any]]:
        """The dataset's name and where ``load_task`` finds it, as the run reads them."""
        r = plan.resolved
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
        return name, where

    def data_changed(self, record: dict[str, Any], plan: Plan) -> str | None:
        """Why a finished run trains again when its recorded data digest differs from its data's now; else None."""
        data = record.get("data") or {}
        recorded = data.get("digest")
        if not recorded or data.get("digest_version", 1) != DIGEST_VERSION:  # before digests, or of another form:
            return None  # nothing to compare it with, and the record is kept
        name, where = self.dataset_args(plan)
        try:
            current = data_digest(name, plan.identity["protocol"], **where)  # the images' bytes read once per copy
        except (VpeftError, OSError):  # unreadable now: nothing says it changed, and the record stays
            return None
        if current == recorded:
            return None
        source = record.get("data_source")
        return f"its data changed since: digest {recorded[:12]} recorded, {current[:12]} now ({source})"

    def lacks(self, record: dict[str, Any], plan: Plan) -> str | None:
        """A finished run trains again when it stopped at a rung before the epoch asked for now (it continues),
        when its data changed since, or, with save_delta, when its delta file is gone (or was never written)."""
        if record.get("status") != "ok":
            return None
        stopped = (record.get("metrics") or {}).get("stopped_at_epoch")
        target = plan.cfg.get("stop_after")
        if stopped is not None and plan.extra.get("halted") is not None:  # halving stopped it there: finished
            return None
        if stopped is not None and (target is None or int(target) > stopped):
            return f"it stopped at epoch {stopped}, a rung, and goes on to epoch {target or 'the last'}"
        changed = self.data_changed(record, plan)
        if changed or not plan.cfg.save_delta:
            return changed
        name = record.get("delta_file")
        if not name:
            return "its record has no delta file (save_delta=true)"
        if not plan.record_path.with_name(name).is_file():
            return f"its delta file {name} is missing (save_delta=true)"
        return None

    def execute(self, plan: Plan, device: torch.device, record: dict[str, Any], ctx: Context) -> None:
        run = self.setup(plan, device, record, ctx)
        ctx.phase = "training"
        result = self.fit(plan, run, device, ctx)
        self.complete(plan, device, record, ctx, result)

    def fit(self, plan: Plan, run: PackedRun, device: torch.device, ctx: Context,
            rung: tuple[Resume | None, int | None] | None = None) -> TrainResult:  # fmt: skip
        """Train the run alone: to its ``stop_after`` rung if one is set (its state saved beside the record for the
        next rung), from the last rung's state where one was saved (``rung``: as ``self.rung`` already restored)."""
        bb = ctx.state["backbone"]
        trainer = TrainConfig(**plan.resolved["trainer"])
        resume, stop = rung if rung is not None else self.rung(plan, run)
        result = train(run.model, run.train_images, run.train_labels, run.eval_images, run.eval_labels, run.optimizer,
                       trainer, bb.mean, bb.std, device, seed=run.seed, on_epoch_end=run.on_epoch_end, resume=resume,
                       stop_after=stop)  # fmt: skip
        self.at_rung(plan, run, ctx, result, stop)
        return result

    def rung(self, plan: Plan, run: PackedRun) -> tuple[Resume | None, int | None]:
        """Where the run starts (the last rung's state, restored into its model and optimizer; None: epoch 0) and
        where it stops (its ``stop_after`` rung; None: the schedule's end)."""
        stop = rungs.stop_epoch(plan.cfg.get("stop_after"), int(plan.resolved["trainer"]["epochs"]))
        path = rungs.state_path(plan.record_path)
        return rungs.restore(path, run.model, run.optimizer, plan.identity["config_hash"], stop), stop

    def at_rung(self, plan: Plan, run: PackedRun, ctx: Context, result: TrainResult, stop: int | None) -> None:
        """A run that stopped at a rung leaves its state beside the record for the next rung."""
        if stop is not None:
            path = rungs.state_path(plan.record_path)
            rungs.save(path, run.model, run.optimizer, plan.identity["config_hash"], result)
            ctx.state["stopped_at_epoch"] = stop

    def setup(self, plan: Plan, device: torch.device, record: dict[str, Any], ctx: Context) -> PackedRun:
        """Data, backbone, head, method and optimizer, as the run trains them (alone or in a pack)."""
        r = plan.resolved
        seed = plan.identity["seed"]
        protocol = plan.identity["protocol"]
        seed_everything(seed)
        name, where = self.dataset_args(plan)
        check_task(name, protocol, **where)  # a wrong folder fails now, not after the backbone's download
        bb_cfg = r["backbone"]
        bb = backbone_from_config(bb_cfg, num_classes=0)
        record["backbone_weights"] = bb.weights
        task = load_task(name, protocol, tuple(bb.input_size[1:]), bb.interpolation, **where)
        record["data_source"] = task.source
        record["data"] = {
            "train_split": task.train.name,
            "eval_split": task.eval.name,
            "n_train": len(task.train.labels),
            "n_eval": len(task.eval.labels),
            "num_classes": task.num_classes,
            "digest": task.digest,  # a later run of this plan trains again when the data's digest differs
            "digest_version": DIGEST_VERSION,
            "input_size": list(bb.input_size),
            "mean": list(bb.mean),
            "std": list(bb.std),
            "interpolation": bb.interpolation,
            "normalization": "backbone pretrained config (timm)",
        }
        model = bb.model
        torch.manual_seed(seed)  # the head and the delta start from the run's seed
        model.reset_classifier(task.num_classes)
        vpeft.apply_method(model, plan.identity["method"], **{k: v for k, v in r["method"].items() if k != "name"})
        count = vpeft.count_parameters(model)
        record["params"] = {
            "trainable": count.trainable,
            "trainable_excl_head": count.trainable_excl_head,
            "total": count.total,
        }
        optimizer = build_optimizer(model, r["optim"])
        logger = ctx.state["logger"] = make_logger(r["logger"], plan.resolved, _run_name(plan))
        ctx.state.update(backbone=bb, task=task, model=model)
        return PackedRun(model, optimizer, task.train.images, task.train.labels, task.eval.images, task.eval.labels,
                         seed=seed, on_epoch_end=logger.log_epoch)  # fmt: skip

    def complete(
        self, plan: Plan, device: torch.device, record: dict[str, Any], ctx: Context, result: TrainResult
    ) -> None:
        """The trained run's metrics, costs and delta file into its record."""
        r = plan.resolved
        bb, task, model = ctx.state["backbone"], ctx.state["task"], ctx.state["model"]
        bb_cfg = r["backbone"]
        ctx.phase = "costs and delta"  # the metrics go into the record before anything else can fail
        record["metrics"] = {
            "top1": result.top1,
            "train_loss": result.train_loss,
            "eval_loss": result.eval_loss,
            "eval_split": task.eval.name,
            "train_split": task.train.name,
            "epochs": len(result.epochs),
            "stopped_at_epoch": ctx.state.get("stopped_at_epoch"),  # a halving rung, before the schedule's end
            "best_epoch_top1": result.best_epoch_top1,  # selection on the evaluated split: never ranks
            "best_epoch": result.best_epoch,
            "history": [
                {
                    "epoch": e.epoch,
                    "train_loss": e.train_loss,
                    "lr": e.lr,
                    "eval_top1": e.eval_top1,
                    "seconds": e.seconds,
                }
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
            bare = create_backbone(
                bb_cfg["name"], task.num_classes, pretrained=False, img_size=bb_cfg.get("img_size")
            ).model  # the same architecture and head without any method: the reference of every ratio
            record["cost"].update(cost_summary(model, bare, bb.input_size, device, BenchConfig.from_dict(bench_cfg)))
        if plan.cfg.save_delta:
            delta = vpeft.save_delta(model, plan.record_path.with_suffix(".safetensors"), extra=plan.identity)
            record["delta_file"] = delta.name
        ctx.state["done"] = f"top-1 {result.top1:.2f}% on {task.eval.name}"
        ctx.state["record_path"] = plan.record_path

    def after(self, ctx: Context, record: dict[str, Any], ok: bool) -> None:
        logger = ctx.state.get("logger")
        if ok and record["metrics"].get("stopped_at_epoch") is None:  # the whole schedule is on record
            rungs.drop(rungs.state_path(ctx.state["record_path"]))
        if ok:
            if logger is not None:
                logger.log_record(record)
            i = record
            log.info("%s %s on %s: %s", i["backbone"], i["method"], i["dataset"], ctx.state["done"])
            print(f"{ctx.state['done']} | record: {ctx.state['record_path']}")
        if logger is not None:
            logger.finish(ok=ok)
