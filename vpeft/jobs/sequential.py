"""The sequential job (``python run.py job=sequential method=lora 'sequential.tasks=[digits,fashion_mnist]'``).

Sequential fine-tuning, the setting where catastrophic forgetting was named: task A's finished final run (its
record and delta file, as a rerun of A's command finds them) is continued on task B with the same trainable set
(``full``: the whole backbone; a PEFT method: the same delta, from A's values) and a fresh head for B, while A's
head is kept aside. Then A is evaluated again on its test split with its own head: the drop from its top-1
before (which equals A's own final record, checked) is what training on B cost A. Beside it stand the two
other ways to serve both tasks: a separate delta per task (A's record and B's own final run: nothing forgotten,
two deltas stored) and merging (``job=merge``).
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import vpeft
from vpeft.config import check_keys
from vpeft.data import load_task
from vpeft.engine import TrainConfig, train
from vpeft.engine.loop import evaluate
from vpeft.errors import ConfigError, DataError
from vpeft.files import path_part
from vpeft.jobs.merge import _data_args, _dataset_overrides, _unfinished, run_config
from vpeft.jobs.retention import train_command
from vpeft.jobs.runner import Context, Job, Plan, hydra_overrides, record_envelope
from vpeft.jobs.train import build_optimizer, plan_run, run_backbone
from vpeft.results import config_hash, read_record
from vpeft.results.sequential import (
    SEQUENTIAL_KIND,
    SEQUENTIAL_SCHEMA_VERSION,
    validate_sequential_record,
)

log = logging.getLogger("vpeft")
SEQUENTIAL_KEYS = ("tasks",)
# a delta that cannot simply go on training: AdaLoRA's rank budget is spent by the end of A's schedule;
# AdapterFusion's fusion layer is trained over fixed adapters of other tasks
ALONE = {"adalora": "its rank allocation ends with the first task's budget schedule",
         "adapter_fusion": "it fuses adapters trained on other tasks; continue one of those instead"}  # fmt: skip
NOT_RUN = ("job", "sequential", "+sequential", "paths.sequential", "dataset", "protocol")


def _tasks(cfg: DictConfig) -> list[str]:
    s = OmegaConf.to_container(cfg.sequential, resolve=True)
    check_keys("sequential", s, SEQUENTIAL_KEYS)
    tasks = s.get("tasks")
    if not isinstance(tasks, list) or len(tasks) != 2 or not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError(f"sequential.tasks must be two tasks [A, B] (A trained first), got {tasks!r}")
    if tasks[0] == tasks[1]:
        raise ConfigError(f"sequential.tasks names one task twice: {tasks}")
    return tasks


class SequentialJob(Job):
    kind = "sequential"
    check = staticmethod(validate_sequential_record)  # the schema of its records; the runner reads and writes them

    def plan(self, cfg: DictConfig) -> Plan:
        tasks = _tasks(cfg)
        method = str(cfg.method.name)
        if method in ALONE:
            raise ConfigError(f"job=sequential does not continue {method}: {ALONE[method]}")
        first = plan_run(run_config(cfg, tasks[0], "final"))  # A's finished run
        second = plan_run(run_config(cfg, tasks[1], "final"))  # B's settings (its hparams), and B alone
        names = [first.identity["dataset"], second.identity["dataset"]]
        ident = {"method": first.identity["method"], "backbone": first.identity["backbone"], "tasks": names,
                 "seed": first.identity["seed"]}  # fmt: skip
        ident["config_hash"] = config_hash({**ident, "runs": [first.identity["config_hash"],
                                                              second.identity["config_hash"]]})  # fmt: skip
        root = Path(cfg.paths.get("sequential") or Path(cfg.paths.results).parent / "sequential")
        name = f"{'+'.join(path_part(n) for n in names)}-seed{ident['seed']}-{ident['config_hash']}.json"
        path = root / path_part(ident["backbone"]) / path_part(ident["method"]) / name
        resolved = OmegaConf.to_container(cfg, resolve=True)
        return Plan(cfg, resolved, hydra_overrides()[0], ident, path, extra={"runs": [first, second], "tasks": tasks})

    def base_record(self, plan: Plan, env: dict[str, Any], started: str) -> dict[str, Any]:
        return record_envelope(
            plan,
            env,
            started,
            SEQUENTIAL_KIND,
            SEQUENTIAL_SCHEMA_VERSION,
            first={},
            second={},
        )

    def describe(self, record: dict[str, Any]) -> str:
        drop = record["metrics"].get("forgetting")
        return f"forgetting {drop:.2f} points" if isinstance(drop, (int, float)) else "no forgetting measured"

    def execute(self, plan: Plan, device: torch.device, record: dict[str, Any], ctx: Context) -> None:
        first, second = plan.extra["runs"]
        a_name, b_name = plan.identity["tasks"]
        why = _unfinished(first)
        if why:
            hint = f"{train_command(plan.overrides, NOT_RUN)} {' '.join(_dataset_overrides(plan.extra['tasks'][:1]))}"
            raise DataError(f"sequential fine-tuning continues task A's finished run: {why}; train it first: {hint}")
        a_record = read_record(first.record_path)
        delta = first.record_path.with_name(a_record["delta_file"])
        r = second.resolved  # B's settings: its optimizer, lr (hparams) and schedule
        seed = plan.identity["seed"]
        bb = run_backbone(first.resolved, seed)
        model = bb.model
        model.reset_classifier(int(a_record["data"]["num_classes"]))
        vpeft.load_delta(model, delta)
        model.to(device)
        size = tuple(bb.input_size[1:])
        data = {}
        for key, run in (("a", first), ("b", second)):
            where = _data_args(run.resolved)
            name = where.pop("name")
            data[key] = load_task(name, "final", size, bb.interpolation, **where)
        amp, batch = r["trainer"].get("amp", "auto"), int(r["trainer"].get("eval_batch_size", 256))
        a = data["a"]
        before, _ = evaluate(model, a.eval.images, a.eval.labels, bb.mean, bb.std, device, batch, amp)
        if not math.isclose(before, a_record["metrics"]["top1"], abs_tol=1e-9):
            log.warning("task A's top-1 before (%.4f) differs from its record's (%.4f): the evaluation is not "
                        "reproducible here (device or precision)", before, a_record["metrics"]["top1"])  # fmt: skip
        head_a = copy.deepcopy(model.get_classifier()).cpu()  # kept aside while B trains
        torch.manual_seed(seed)  # B's head starts from the run's seed, as B's own run's does
        model.reset_classifier(data["b"].num_classes)
        model.to(device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        optimizer = build_optimizer(model, r["optim"])
        ctx.phase = "training on B"
        b = data["b"]
        result = train(model, b.train.images, b.train.labels, b.eval.images, b.eval.labels, optimizer,
                       TrainConfig(**r["trainer"]), bb.mean, bb.std, device, seed=seed)  # fmt: skip
        ctx.phase = "evaluating A"
        model.reset_classifier(a.num_classes)
        model.get_classifier().load_state_dict(head_a.state_dict())  # A's own head, as it was
        after, _ = evaluate(model, a.eval.images, a.eval.labels, bb.mean, bb.std, device, batch, amp)
        try:
            alone = read_record(second.record_path)["metrics"]["top1"]
        except (OSError, ValueError, KeyError):
            alone = None
        record["first"] = {"task": a_name, "record": str(first.record_path), "delta_file": str(delta),
                           "record_top1": a_record["metrics"]["top1"], "top1_before": before, "top1_after": after,
                           "eval_split": a.eval.name}  # fmt: skip
        record["second"] = {"task": b_name, "top1": result.top1, "train_loss": result.train_loss,
                            "epochs": len(result.epochs), "eval_split": b.eval.name,
                            "alone_record": str(second.record_path), "alone_top1": alone}  # fmt: skip
        record["metrics"] = {"forgetting": before - after, "a_before": before, "a_after": after, "b_top1": result.top1,
                             "b_alone_top1": alone}  # fmt: skip
        record["cost"] = {"train_seconds": result.train_seconds, "trainable": trainable}
        ctx.state["path"] = plan.record_path

    def after(self, ctx: Context, record: dict[str, Any], ok: bool) -> None:
        if ok:
            m, (a, b) = record["metrics"], record["tasks"]
            print(
                f"{record['method']}: {a} {m['a_before']:.2f}% -> {m['a_after']:.2f}% after training on {b} "
                f"(forgetting {m['forgetting']:.2f} points; {b} {m['b_top1']:.2f}%) | record: {ctx.state['path']}"
            )
