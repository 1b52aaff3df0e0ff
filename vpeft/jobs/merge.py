"""The merge job (``python run.py job=merge merge=ties method=lora merge.tasks=[...]``).

The deltas of N tasks (one backbone, one method, the run config given) are merged into one backbone
with an algorithm of ``vpeft.compose``, and the merged backbone is evaluated on every task with that
task's own head (heads are not merged). Coefficients follow the VTAB-1k protocol: each grid point
merges the tasks' ``protocol=tune`` deltas (trained on train800) and is scored by the mean val200
top-1; the chosen point then merges the ``protocol=final`` deltas (train800val200), evaluated once
on each task's test split. The test split never chooses anything. Normalized accuracy is the merged
top-1 over the task's own delta's top-1, both evaluated here alike.

``merge=negation`` (task arithmetic's forgetting protocol, tasks [target, control]): the target's
vector is subtracted; lambda is the largest on the grid that keeps the control task (its own delta on
the negated backbone) at >= 95% of its own val200 top-1; the record holds the target's drop and what
the control keeps.
"""

from __future__ import annotations

import copy
import itertools
import logging
import shlex
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from vpeft import compose
from vpeft.backbones import backbone_from_config
from vpeft.config import check_keys
from vpeft.data import load_task
from vpeft.engine.loop import evaluate
from vpeft.errors import ConfigError, DataError, NotMergeableError, UnknownNameError, check_value, shown
from vpeft.jobs.runner import Context, Job, Plan, hydra_overrides, record_envelope
from vpeft.jobs.train import plan_run, seed_everything
from vpeft.methods import METHODS, mergeable_methods
from vpeft.progress import progress
from vpeft.results import config_hash, read_record
from vpeft.results.merges import MERGE_KIND, MERGE_SCHEMA_VERSION, validate_merge_record

log = logging.getLogger("vpeft")

CONF = Path(__file__).resolve().parents[2] / "conf"
MERGE_KEYS = ("algorithm", "space", "tasks", "grid", "params")  # what conf/merge/*.yaml set
NEGATION_KEEP = 0.95  # the control task keeps at least this share of its own val200 top-1 (Ilharco et al.)


def task_dataset(task: str) -> dict[str, Any]:
    """A task of the pool: a dataset config name (conf/dataset/<name>.yaml), or ``folder:<path>``."""
    if task.startswith("folder:"):
        return {"name": "folder", "root": task.split(":", 1)[1], "id": None}
    path = CONF / "dataset" / f"{task}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml") if p.stem not in ("folder", "imagefolder"))
        raise ConfigError(f"merge.tasks: unknown task {task!r}; tasks: {', '.join(known)}, or folder:/path/to/task")
    return OmegaConf.to_container(OmegaConf.load(path))


def run_config(cfg: DictConfig, task: str, protocol: str) -> DictConfig:
    """The training run's config of ``task`` under ``protocol``: this config with the task's dataset."""
    run = copy.deepcopy(cfg)
    with open_dict(run):
        run.dataset = OmegaConf.create(task_dataset(task))
        run.protocol = protocol
        run.job = "train"
    return run


class MergeJob(Job):
    kind = "merge"
    check = staticmethod(validate_merge_record)  # the schema of its records; the runner reads and writes them

    def plan(self, cfg: DictConfig) -> Plan:
        m = OmegaConf.to_container(cfg.merge, resolve=True)
        check_keys("merge", m, MERGE_KEYS)
        tasks = [str(t) for t in m.get("tasks") or []]
        algorithm = m["algorithm"]
        negation = algorithm == "negation"
        if algorithm not in (*compose.ALGORITHMS, "negation"):
            raise UnknownNameError("merge algorithm", algorithm, [*compose.ALGORITHMS, "negation"])
        if len(tasks) < 2 or len(set(tasks)) != len(tasks) or (negation and len(tasks) != 2):
            want = "two tasks: [target, control]" if negation else "at least two distinct tasks"
            raise ConfigError(f"merge.tasks needs {want}, got {tasks}")
        if m["space"] not in compose.SPACES:
            raise ConfigError(f"merge.space must be one of {', '.join(compose.SPACES)}, got {m['space']!r}")
        method = str(cfg.method.name)
        if m["space"] == "weights" and method in METHODS and not METHODS.get(method).mergeable:
            raise NotMergeableError(
                f"{method} has no weight-space task vector (its delta changes the computation, not the weights); "
                f"mergeable methods: {', '.join(mergeable_methods())}; merge.space=delta merges its own tensors"
            )
        grid, params = _grid_and_params(m, algorithm, len(tasks))
        runs = {t: {p: plan_run(run_config(cfg, t, p)) for p in ("tune", "final")} for t in tasks}
        first = runs[tasks[0]]["final"]
        ident = {
            "method": first.identity["method"],
            "backbone": first.identity["backbone"],
            "algorithm": algorithm,
            "space": m["space"],
            "tasks": [r["final"].identity["dataset"] for r in runs.values()],  # as given: the record shows them so
            "seed": first.identity["seed"],
        }
        # a pool is a set: its merge has one hash and one record in whatever order the tasks are given;
        # negation's [target, control] is an order
        pool = ident["tasks"] if negation else sorted(ident["tasks"])
        hashed = {**ident, "tasks": pool, "grid": grid, "params": params,
                  "runs": {t: [r["tune"].identity["config_hash"], r["final"].identity["config_hash"]] for t, r in runs.items()}}  # fmt: skip  # noqa: E501
        ident["config_hash"] = config_hash(hashed)
        root = Path(cfg.paths.get("merges") or Path(cfg.paths.results).parent / "merges")
        name = f"{algorithm}-{m['space']}-{'+'.join(pool)}-seed{ident['seed']}-{ident['config_hash']}.json"
        path = root / ident["backbone"].replace("/", "_") / ident["method"] / name
        resolved = OmegaConf.to_container(cfg, resolve=True)
        return Plan(cfg, resolved, hydra_overrides()[0], ident, path,
                    extra={"runs": runs, "tasks": tasks, "grid": grid, "params": params})  # fmt: skip

    def base_record(self, plan: Plan, env: dict[str, Any], started: str) -> dict[str, Any]:
        return record_envelope(
            plan,
            env,
            started,
            MERGE_KIND,
            MERGE_SCHEMA_VERSION,
            params={},
            selection=None,
            per_task={},
        )

    def describe(self, record: dict[str, Any]) -> str:
        top1 = record["metrics"].get("mean_top1")
        return f"mean top-1 {top1:.2f}%" if isinstance(top1, (int, float)) else "no mean top-1"

    def execute(self, plan: Plan, device: torch.device, record: dict[str, Any], ctx: Context) -> None:
        x = plan.extra
        tasks, runs = x["tasks"], x["runs"]
        deltas = _finished_deltas(plan)
        r = plan.resolved
        seed_everything(plan.identity["seed"])  # a randomly initialised backbone is the runs' own only so
        bb = backbone_from_config(r["backbone"], num_classes=1)  # any head: each task's replaces it
        base = bb.model.to(device).eval()
        data, classes = {}, {}
        for t in tasks:
            where = _data_args(runs[t]["final"].resolved)
            name = where.pop("name")
            for protocol in ("tune", "final"):
                task = load_task(name, protocol, tuple(bb.input_size[1:]), bb.interpolation, **where)
                data[t, protocol], classes[t] = task.eval, task.num_classes
        heads = {p: [compose.task_head(deltas[t][p], base) for t in tasks] for p in ("tune", "final")}
        vectors = {p: [compose.task_vector(deltas[t][p], base, plan.identity["space"]) for t in tasks]
                   for p in ("tune", "final")}  # fmt: skip
        _check_pool(plan, deltas, heads, vectors, classes)  # still set-up: a pool that cannot merge exits 2
        ctx.phase = "merging"
        amp = r["trainer"].get("amp", "auto")
        batch = int(r["trainer"].get("eval_batch_size", 256))

        def top1(model, t: str, protocol: str) -> float:
            split = data[t, protocol]
            return evaluate(model, split.images, split.labels, bb.mean, bb.std, device, batch, amp)[0]

        # each task's own delta alone: its run's top-1 (the same evaluation of the same split as the merges')
        own = {p: {t: float(_run_record(runs[t][p])["metrics"]["top1"]) for t in tasks} for p in ("tune", "final")}
        start = time.perf_counter()
        grid_points = [dict(zip(x["grid"], values)) for values in itertools.product(*x["grid"].values())] or [{}]
        negation = plan.identity["algorithm"] == "negation"
        names = plan.identity["tasks"]
        scorer = _negation_scores if negation else _merge_scores

        def val(model, t: str) -> float:
            return top1(model, t, "tune")

        scored = []
        desc = f"merging ({plan.identity['algorithm']}): scoring grid points on val200"
        for point in progress(grid_points, desc=desc, unit="point", enabled=len(grid_points) > 1):
            params = {**x["params"], **point}
            scores = scorer(compose, base, vectors["tune"], heads["tune"], tasks, params, plan.identity, val)
            scored.append({"params": params, "val_top1": scores})
            log.info("merge %s %s: val200 %s", plan.identity["algorithm"], params, scores)
        if negation:
            target, control = tasks
            keep = [s for s in scored if s["val_top1"][names[1]] >= NEGATION_KEEP * own["tune"][control]]
            chosen = min(keep or scored, key=lambda s: s["val_top1"][names[0]])  # the most forgetting kept in bounds
            rule = (f"lowest target val200 top-1 whose control keeps >= {NEGATION_KEEP:.0%} of its own val200 top-1"
                    + ("" if keep else " (no grid point did: the control's best was taken)"))  # fmt: skip
        else:
            chosen = max(scored, key=lambda s: sum(s["val_top1"].values()) / len(tasks))  # max keeps the first
            rule = "highest mean val200 top-1 over the tasks (tune deltas); ties: first grid point"
        for s in scored:
            s["mean"] = sum(s["val_top1"].values()) / len(tasks)
        record["params"] = chosen["params"]
        record["space_meaning"] = compose.SPACE_MEANINGS[plan.identity["space"]]  # what the merged vectors hold
        record["selection"] = {"rule": rule, "grid": scored}
        merge_seconds = time.perf_counter() - start
        ctx.phase = "evaluating"
        start = time.perf_counter()
        final = (_negation_scores if negation else _merge_scores)(
            compose, base, vectors["final"], heads["final"], tasks, chosen["params"], plan.identity,
            lambda m, t: top1(m, t, "final"),
        )  # fmt: skip
        for t, name in zip(tasks, names):
            record["per_task"][name] = {
                "top1": final[name],
                "individual_top1": own["final"][t],
                "normalized": final[name] / own["final"][t] if own["final"][t] else None,
                "val_top1": chosen["val_top1"][name],
                "individual_val_top1": own["tune"][t],
                "eval_split": data[t, "final"].name,
                "delta_file": str(deltas[t]["final"]),
                "record": str(runs[t]["final"].record_path),
            }
        per = list(record["per_task"].values())
        record["metrics"] = {
            "mean_top1": sum(p["top1"] for p in per) / len(per),
            "mean_individual_top1": sum(p["individual_top1"] for p in per) / len(per),
            "mean_normalized": sum(p["normalized"] or 0 for p in per) / len(per),
        }
        if negation:
            tgt, ctl = (record["per_task"][n] for n in plan.identity["tasks"])
            record["metrics"] |= {
                "target_drop": tgt["individual_top1"] - tgt["top1"],
                "control_normalized": ctl["normalized"],
            }
        record["cost"] = {"merge_seconds": merge_seconds, "eval_seconds": time.perf_counter() - start,
                          "grid_points": len(grid_points)}  # fmt: skip
        ctx.state["path"] = plan.record_path

    def after(self, ctx: Context, record: dict[str, Any], ok: bool) -> None:
        if ok:
            m = record["metrics"]
            print(f"{record['algorithm']} ({record['space']}) of {record['method']} over {', '.join(record['tasks'])}: "
                  f"mean top-1 {m['mean_top1']:.2f}%, normalized {m['mean_normalized']:.3f}, params {record['params']}"
                  f" | record: {ctx.state['path']}")  # fmt: skip


# each parameter of a merge algorithm: (kind, range, a valid value); weights (weighted_average) is a list
MERGE_VALUES = {
    "lam": ("number", {"low": 0}, 1.0),  # the scaling coefficient; 0: the bare backbone (a baseline point)
    "density": ("number", {"low": 0, "low_open": True, "high": 1}, 0.2),  # the share TIES keeps; 0 keeps nothing
    "drop": ("number", {"low": 0, "high": 1, "high_open": True}, 0.9),  # DARE's drop probability
    "seed": ("integer", {"low": 0, "high": 2**32 - 1}, 0),
}


def _grid_and_params(m: dict[str, Any], algorithm: str, n_tasks: int) -> tuple[dict[str, list], dict[str, Any]]:
    """The merge's grid and fixed parameters, every value checked while planning: an empty grid, a string
    where a list belongs or a value out of range exits 2 before any delta is read."""
    defaults = compose.algorithm_params("task_arithmetic" if algorithm == "negation" else algorithm)
    grid, params = m.get("grid") or {}, m.get("params") or {}
    for name, value in (("grid", grid), ("params", params)):
        if not isinstance(value, dict):
            raise ConfigError(f"merge.{name} must be a mapping of {algorithm}'s parameters, got {shown(value)}; "
                              f"its parameters: {', '.join(defaults)}")  # fmt: skip
    for key in [*grid, *params]:
        if key not in defaults:
            raise ConfigError(f"merge: {algorithm} has no parameter {key!r}; its parameters: {', '.join(defaults)}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            example = MERGE_VALUES.get(key, (None, None, 1.0))[2]
            raise ConfigError(f"merge.grid.{key} must be a non-empty list of values, got {shown(values)}; "
                              f"set merge.grid.{key}=[{example}], for example")  # fmt: skip
        for i, value in enumerate(values):
            _check_merge_value(f"merge.grid.{key}[{i}]", key, value, n_tasks, f"merge.grid.{key}=[{{}}]")
    for key, value in params.items():
        _check_merge_value(f"merge.params.{key}", key, value, n_tasks, f"merge.params.{key}={{}}")
    return {k: list(v) for k, v in grid.items()}, dict(params)


def _check_merge_value(name: str, key: str, value: Any, n_tasks: int, setting: str) -> None:
    """One value of the grid or the parameters; ``setting`` is the override that fixes it, ``{}`` its value."""
    if key == "weights":  # one non-negative weight per task, a positive sum; null: uniform
        uniform = f"[{','.join(['1'] * n_tasks)}]"
        ok = value is None or (
            isinstance(value, list)
            and len(value) == n_tasks
            and sum(x for x in value if isinstance(x, (int, float))) > 0
        )
        if not ok:
            raise ConfigError(f"{name} must be one weight per task ({n_tasks}) with a positive sum, or null, got "
                              f"{shown(value)}; set {setting.format(uniform)}, for example")  # fmt: skip
        for i, x in enumerate(value or []):
            check_value(f"{name}[{i}]", x, low=0, fix=f"set {setting.format(uniform)}, for example")
        return
    if key in MERGE_VALUES:
        kind, limits, example = MERGE_VALUES[key]
        check_value(name, value, kind, **limits, fix=f"set {setting.format(shown(example))}, for example")


def _merge_scores(compose, base, vectors, heads, tasks, params, identity, score) -> dict[str, float]:
    merged = compose.merge_vectors(vectors, identity["algorithm"], **params)
    model = compose.apply_vector(base, merged).eval()
    return {
        name: score(compose.put_head(model, heads[i]), t) for i, (t, name) in enumerate(zip(tasks, identity["tasks"]))
    }


def _negation_scores(compose, base, vectors, heads, tasks, params, identity, score) -> dict[str, float]:
    """The target on the backbone minus its vector; the control with its own vector on that backbone."""
    lam = float(params.get("lam", 1.0))
    minus = compose.scale(vectors[0], -lam)
    target = compose.put_head(compose.apply_vector(base, minus).eval(), heads[0])
    control = compose.put_head(compose.apply_vector(base, compose.add(minus, vectors[1])).eval(), heads[1])
    names = identity["tasks"]
    return {names[0]: score(target, tasks[0]), names[1]: score(control, tasks[1])}


def _check_pool(plan: Plan, deltas, heads, vectors, classes: dict[str, int]) -> None:
    """Every delta of the pool of the merge's method and backbone, one kind of object, and each head as wide as
    its task has classes; otherwise a DataError naming the file."""
    method = plan.identity["method"]
    for p in ("tune", "final"):
        for t, name, vector, head in zip(plan.extra["tasks"], plan.identity["tasks"], vectors[p], heads[p]):
            if vector.method != method:
                raise DataError(f"{deltas[t][p]} holds a {vector.method} delta, not {method}: the merge of {method} "
                                f"needs its own runs; train {name} ({p}) with method={method} again")  # fmt: skip
            width = {int(w.shape[0]) for w in head.values() if w.ndim == 2}
            if width != {classes[t]}:
                raise DataError(f"the head in {deltas[t][p]} has {', '.join(map(str, sorted(width))) or 'no'} "
                                f"classes but {name} has {classes[t]}: it was trained on another task or class list; "
                                f"train {name} ({p}) again")  # fmt: skip
    compose.check_compatible([v for p in ("tune", "final") for v in vectors[p]])


def _run_record(plan: Plan) -> dict[str, Any]:
    return read_record(plan.record_path)


PROTOCOLS = ("tune", "final")
# overrides of the merge command that are not its runs' (a run's method, dataset and protocol are set per
# run, and it must save its delta); method.* fields stay: they decide a run's identity
NOT_RUN_OVERRIDES = ("job", "dataset", "protocol", "method", "save_delta", "skip_finished", "paths.merges")
NOT_RUN_PREFIXES = ("merge", "dataset.", "hydra")


def _finished_deltas(plan: Plan) -> dict[str, dict[str, Path]]:
    """The delta file of every finished run the merge needs, or one error naming every missing run with the
    command that trains it (and one that trains them all)."""
    deltas: dict[str, dict[str, Path]] = {}
    missing: list[tuple[str, str, str]] = []
    for task in plan.extra["tasks"]:
        for protocol in PROTOCOLS:
            run = plan.extra["runs"][task][protocol]
            why = _unfinished(run)
            if why:
                missing.append((task, protocol, why))
            else:
                deltas.setdefault(task, {})[protocol] = run.record_path.with_name(_run_record(run)["delta_file"])
    if not missing:
        return deltas
    method = plan.identity["method"]
    shared = [o for o in plan.overrides if not _is_run_specific(o)]
    lines = [f"the merge needs {len(missing)} more finished {'run' if len(missing) == 1 else 'runs'} of {method}:"]
    for task, protocol, why in missing:
        cmd = _train_command(method, [f"protocol={protocol}", *_dataset_overrides([task])], shared)
        lines.append(f"  {task} ({protocol}): {why}; train it first: {cmd}")
    tasks = list(dict.fromkeys(t for t, _, _ in missing))
    folders = {t.startswith("folder:") for t in tasks}
    if len(missing) > 1 and len(folders) == 1:  # one sweep trains them all (and skips what is finished)
        protocols = ",".join(p for p in PROTOCOLS if any(q == p for _, q, _ in missing))
        sweep = _train_command(method, [f"protocol={protocols}", *_dataset_overrides(tasks)], shared, multirun=True)
        lines.append(f"or all at once (finished runs are skipped): {sweep}")
    raise DataError("\n".join(lines))


def _unfinished(run: Plan) -> str | None:
    """Why the run's record cannot be merged (None: it can)."""
    path = run.record_path
    try:
        record = read_record(path)
    except (OSError, ValueError):
        return f"no finished run at {path}"
    if record["status"] != "ok" or not record.get("delta_file"):
        return f"the run at {path} is {record['status']} or has no delta file"
    delta = path.with_name(record["delta_file"])
    if not delta.is_file():
        return f"the delta file {delta} of {path} is missing (a finished run without it trains again)"
    return None


def _is_run_specific(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return key in NOT_RUN_OVERRIDES or key.startswith(NOT_RUN_PREFIXES)


def _dataset_overrides(tasks: list[str]) -> list[str]:
    """The overrides that choose the tasks' datasets (several: a sweep over them)."""
    if tasks[0].startswith("folder:"):
        return ["dataset=folder", "dataset.root=" + ",".join(t.split(":", 1)[1] for t in tasks)]
    return ["dataset=" + ",".join(tasks)]


def _train_command(method: str, run: list[str], shared: list[str], multirun: bool = False) -> str:
    """A command line that trains the run(s): every override of the merge command that decides a run's
    identity (backbone, trainer, optim, method fields, seed, paths.results, ...), shell-quoted."""
    args = ["python", "run.py", *(["-m"] if multirun else []), f"method={method}", *run, *shared]
    return " ".join(shlex.quote(a) for a in args)


def _data_args(resolved: dict[str, Any]) -> dict[str, Any]:
    import os

    ds = dict(resolved["dataset"])
    ds.pop("id", None)
    return {
        "name": ds.pop("name"),
        "root": ds.pop("root", None),
        "vtab_root": resolved["paths"]["vtab_root"],
        "download_root": resolved["paths"]["data_root"],
        "cache_dir": os.path.join(resolved["paths"]["cache"], "data"),
        **ds,
    }
