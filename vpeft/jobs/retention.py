"""The retention job (``python run.py job=retention method=lora dataset=dtd probe=offline``).

For a finished run (its record and delta file, found as a rerun of the same command would find them), the
adapted model's pre-logit features on a fixed suite of other tasks, scored by DINO's k-NN classifier
(``vpeft.probe``; fit on each probe task's train800val200, scored on its test split), against the same
probe of the bare backbone. Retention = adapted k-NN top-1 / bare k-NN top-1 per probe task, and their mean:
100% keeps what the pretrained features knew; less is what adapting to the run's task cost elsewhere. The run's
own task is never a probe. The bare backbone's features are computed once per probe split and cached.
"""

from __future__ import annotations

import copy
import logging
import math
import shlex
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

import vpeft
from vpeft.config import check_keys
from vpeft.data import load_task
from vpeft.engine.loop import resolve_amp
from vpeft.errors import ConfigError, DataError
from vpeft.files import path_part
from vpeft.jobs.merge import _data_args, _unfinished, run_config, task_dataset
from vpeft.jobs.runner import Context, Job, Plan, hydra_overrides, record_envelope
from vpeft.jobs.train import plan_run, run_backbone
from vpeft.probe import extract_features, knn_top1, retention
from vpeft.probe.cache import cache_file, feature_key, read_features, tensor_digest, write_features
from vpeft.results import config_hash, read_record
from vpeft.results.record import dataset_id
from vpeft.results.retention import (
    RETENTION_KIND,
    RETENTION_SCHEMA_VERSION,
    validate_retention_record,
)

log = logging.getLogger("vpeft")
PROBE_KEYS = ("tasks", "k", "temperature")
# overrides of the retention command that are not its run's: without them, the command trains the run
NOT_RUN = ("job", "probe", "+probe", "paths.retention")


def _probe_settings(cfg: DictConfig) -> dict[str, Any]:
    p = OmegaConf.to_container(cfg.probe, resolve=True)
    check_keys("probe", p, PROBE_KEYS)
    tasks, k, temperature = p.get("tasks"), p.get("k"), p.get("temperature")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError(f"probe.tasks must be a list of task names (or folder:PATH), got {tasks!r}")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"probe.tasks names a task twice: {tasks}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"probe.k must be a positive integer (DINO uses 20), got {k!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        raise ConfigError(f"probe.temperature must be a positive number (DINO uses 0.07), got {temperature!r}")
    return {"tasks": tasks, "k": k, "temperature": float(temperature)}


def as_run(cfg: DictConfig) -> DictConfig:
    """The training run this job builds on: the same config as ``job=train``."""
    run = copy.deepcopy(cfg)
    with open_dict(run):
        run.job = "train"
    return run


def train_command(overrides: list[str], drop: tuple[str, ...] = NOT_RUN) -> str:
    """The command that trains the run of a job's command: its overrides less the job's own."""
    keep = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~").startswith(drop)]
    return " ".join(shlex.quote(a) for a in ["python", "run.py", *keep])


def _root(cfg: DictConfig) -> Path:
    return Path(cfg.paths.get("retention") or Path(cfg.paths.results).parent / "retention")


class RetentionJob(Job):
    kind = "retention"
    check = staticmethod(validate_retention_record)  # the schema of its records; the runner reads and writes them

    def plan(self, cfg: DictConfig) -> Plan:
        probe = _probe_settings(cfg)
        run = plan_run(as_run(cfg))
        own = run.identity["dataset"]
        names = {t: dataset_id(task_dataset(t)) for t in probe["tasks"]}
        tasks = [t for t in probe["tasks"] if names[t] != own]
        if not tasks:
            raise ConfigError(f"probe.tasks has no task but the run's own ({own}): name other tasks to probe")
        ident = {k: run.identity[k] for k in ("method", "dataset", "backbone", "protocol", "seed")}
        hashed = {"run": run.identity["config_hash"], "tasks": sorted(names[t] for t in tasks),
                  "k": probe["k"], "temperature": probe["temperature"]}  # fmt: skip
        ident["config_hash"] = config_hash(hashed)
        name = f"{path_part(own)}-{ident['protocol']}-seed{ident['seed']}-{ident['config_hash']}.json"
        path = _root(cfg) / path_part(ident["backbone"]) / path_part(ident["method"]) / name
        resolved = OmegaConf.to_container(cfg, resolve=True)
        probes = {t: run_config(cfg, t, "final") for t in tasks}
        return Plan(cfg, resolved, hydra_overrides()[0], ident, path,
                    extra={"run": run, "probe": probe, "tasks": tasks, "names": names, "probes": probes,
                           "left_out": [t for t in probe["tasks"] if t not in tasks]})  # fmt: skip

    def base_record(self, plan: Plan, env: dict[str, Any], started: str) -> dict[str, Any]:
        x = plan.extra
        return record_envelope(
            plan,
            env,
            started,
            RETENTION_KIND,
            RETENTION_SCHEMA_VERSION,
            run={"record": str(x["run"].record_path), "config_hash": x["run"].identity["config_hash"]},
            probe={
                "tasks": [x["names"][t] for t in x["tasks"]],
                "k": x["probe"]["k"],
                "temperature": x["probe"]["temperature"],
                "left_out": x["left_out"],
            },
            per_task={},
        )

    def describe(self, record: dict[str, Any]) -> str:
        mean = record["metrics"].get("mean_retention")
        return f"mean retention {100 * mean:.1f}%" if isinstance(mean, (int, float)) else "no retention"

    def execute(self, plan: Plan, device: torch.device, record: dict[str, Any], ctx: Context) -> None:
        x, r = plan.extra, plan.resolved
        run: Plan = x["run"]
        why = _unfinished(run)
        if why:
            raise DataError(f"retention probes a finished run with its delta: {why}; train it first: "
                            f"{train_command(plan.overrides)}")  # fmt: skip
        run_record = read_record(run.record_path)
        delta = run.record_path.with_name(run_record["delta_file"])
        record["run"] |= {"delta_file": str(delta), "top1": run_record["metrics"]["top1"]}
        bb = run_backbone(r, plan.identity["seed"])
        model = bb.model.to(device)
        amp = resolve_amp(str(r["trainer"].get("amp", "auto")), device)
        batch = int(r["trainer"].get("eval_batch_size", 256))
        size = tuple(bb.input_size[1:])
        splits = {}
        for t in x["tasks"]:
            where = _data_args(x["probes"][t])
            name = where.pop("name")
            task = load_task(name, "final", size, bb.interpolation, **where)
            splits[t] = task
        ctx.phase = "features"
        cache_root = Path(r["paths"]["cache"]) / "features"
        start, hits = time.perf_counter(), 0
        bare, adapted = {}, {}

        def features(m, split, desc: str) -> torch.Tensor:
            return extract_features(m, split.images, bb.mean, bb.std, device, batch, amp, desc=desc,
                                    progress=bool(r["trainer"].get("progress", False)))  # fmt: skip

        for t in x["tasks"]:  # the bare backbone: once per probe split, then from the cache
            for split in (splits[t].train, splits[t].eval):
                key = feature_key(backbone=plan.identity["backbone"], weights=bb.weights, name=r["backbone"]["name"],
                                  input_size=list(bb.input_size), interpolation=bb.interpolation, amp=amp,
                                  device=device.type, data=tensor_digest(split.images, split.labels))  # fmt: skip
                path = cache_file(cache_root, key)
                cached = read_features(path, key)
                if cached is None:
                    feats = features(model, split, f"bare features: {x['names'][t]} {split.name}")
                    write_features(path, key, feats, split.labels, task=x["names"][t], split=split.name)
                else:
                    feats, hits = cached[0], hits + 1
                bare[t, split.name] = feats
        model.reset_classifier(int(run_record["data"]["num_classes"]))
        vpeft.load_delta(model, delta)
        model.to(device)
        for t in x["tasks"]:
            for split in (splits[t].train, splits[t].eval):
                adapted[t, split.name] = features(model, split, f"adapted features: {x['names'][t]} {split.name}")
        ctx.phase = "k-NN"
        k, temp = x["probe"]["k"], x["probe"]["temperature"]
        scores: dict[str, dict[str, float]] = {"bare": {}, "adapted": {}}
        for t in x["tasks"]:
            tr, te = splits[t].train, splits[t].eval
            for side, feats in (("bare", bare), ("adapted", adapted)):
                scores[side][t] = knn_top1(feats[t, tr.name], tr.labels, feats[t, te.name], te.labels,
                                           splits[t].num_classes, k, temp)  # fmt: skip
        kept = retention(scores["adapted"], scores["bare"])
        for t in x["tasks"]:
            tr, te = splits[t].train, splits[t].eval
            record["per_task"][x["names"][t]] = {
                "bare_top1": scores["bare"][t], "adapted_top1": scores["adapted"][t], "retention": kept[t],
                "n_train": len(tr.labels), "n_test": len(te.labels), "train_split": tr.name, "eval_split": te.name,
            }  # fmt: skip
        record["metrics"] = {"mean_retention": kept["mean"], "target_top1": run_record["metrics"]["top1"]}
        record["cost"] = {"feature_seconds": time.perf_counter() - start, "bare_cache_hits": hits}
        ctx.state["path"] = plan.record_path

    def after(self, ctx: Context, record: dict[str, Any], ok: bool) -> None:
        if ok:
            per = ", ".join(f"{t} {100 * p['retention']:.1f}%" for t, p in record["per_task"].items())
            mean = 100 * record["metrics"]["mean_retention"]
            print(f"retention of {record['method']} on {record['dataset']}: mean {mean:.1f}% ({per}) | record: "
                  f"{ctx.state['path']}")  # fmt: skip
