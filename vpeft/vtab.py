"""The VTAB-1k protocol: its tasks and groups as the literature names them, its splits, and its selection step.

Tune runs (train800 -> val200) over a grid; for each task the grid point with the best mean val
top-1 is chosen (``select_hparams``, by ``SELECTION_RULE``); the final runs (train800val200 -> test)
read the choice from a hyperparameter file that anyone can reuse without the search
(``write_hparams`` / ``hparams_for``). Records, data and jobs all read the protocol from here.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from vpeft.errors import ConfigError
from vpeft.files import write_json_atomic

GROUPS: dict[str, tuple[str, ...]] = {
    "natural": ("cifar100", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": (
        "clevr_count",
        "clevr_dist",
        "dmlab",
        "kitti",
        "dsprites_loc",
        "dsprites_ori",
        "smallnorb_azi",
        "smallnorb_ele",
    ),
}
TASKS: tuple[str, ...] = tuple(t for tasks in GROUPS.values() for t in tasks)
GROUP_OF: dict[str, str] = {t: g for g, tasks in GROUPS.items() for t in tasks}
SPLITS = ("train800", "val200", "train800val200", "test")
# protocol -> (split trained on, split evaluated on)
PROTOCOL_SPLITS = {"tune": ("train800", "val200"), "final": ("train800val200", "test")}
# every VTAB-1k task folder holds these many images per split; its test split is the task's own (any size)
SPLIT_SIZES = {"train800": 800, "val200": 200, "train800val200": 1000}
# classes per task, as VTAB's task definitions (google-research/task_adaptation, data/*.py) label them:
# caltech101 keeps tfds's BACKGROUND_Google class, clevr_count counts 3-10 objects, clevr_dist, dmlab and
# kitti bin a distance, dSprites bins position x and orientation into 16, smallNORB has 18 azimuths, 9 elevations
NUM_CLASSES: dict[str, int] = {
    "cifar100": 100,
    "caltech101": 102,
    "dtd": 47,
    "oxford_flowers102": 102,
    "oxford_iiit_pet": 37,
    "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2,
    "eurosat": 10,
    "resisc45": 45,
    "diabetic_retinopathy": 5,
    "clevr_count": 8,
    "clevr_dist": 6,
    "dmlab": 6,
    "kitti": 4,
    "dsprites_loc": 16,
    "dsprites_ori": 16,
    "smallnorb_azi": 18,
    "smallnorb_ele": 9,
}

# VPT-deep's per-task prompt lengths on VTAB-1k (ViT-B/16 IN-21k). VPT's paper (Jia et al., ECCV 2022)
# does not print them: its authors released the per-task values as a spreadsheet instead (github
# KMnP/vpt README, "Hyperparameters for experiments in paper"; KMnP/vpt issue 4: "cannot fit the
# table in a page"). This table is VPT-deep's as visinf/adapter_plus (Steitz & Roth, CVPR 2024)
# configures it (conf/experiment/vtab/vpt.yaml, prompt dropout 0.1); VPT's own repository confirms
# the three tasks it shows (demo.ipynb, VPT-deep runs: dmlab 100, sun397 5, eurosat 100).
# VPT-shallow's per-task lengths were not found in any reachable primary source, so the VPT-shallow
# recipe tunes the length on val200 instead (conf/experiment/vtab1k_vpt_shallow.yaml).
VPT_DEEP_PROMPT_TOKENS: dict[str, int] = {
    "cifar100": 10,
    "caltech101": 10,
    "dtd": 10,
    "oxford_flowers102": 1,
    "oxford_iiit_pet": 1,
    "svhn": 50,
    "sun397": 5,
    "patch_camelyon": 100,
    "eurosat": 100,
    "resisc45": 10,
    "diabetic_retinopathy": 1,
    "clevr_count": 100,
    "clevr_dist": 200,
    "dmlab": 100,
    "kitti": 100,
    "dsprites_loc": 100,
    "dsprites_ori": 100,
    "smallnorb_azi": 200,
    "smallnorb_ele": 200,
}
# The resolver ${vpeft.vpt_tokens:<task>} (vpeft.config) reads this name: VPT-deep's table.
VPT_PROMPT_TOKENS = VPT_DEEP_PROMPT_TOKENS
# The distinct lengths of the VPT-deep table above: the candidates of the VPT-shallow tune grid.
VPT_PROMPT_LENGTHS: tuple[int, ...] = (1, 5, 10, 50, 100, 200)


# -- the selection step -------------------------------------------------------------------------------------------

HPARAMS_KIND = "vpeft.hparams/1"
# What a tune grid may vary, and so what a hyperparameter file may set: the optimizer's and the method's values,
# the schedule and the regularisation; never what names a run or where it goes (seed, protocol, dataset, the
# backbone and its weights, paths, device, job, hparams), nor which optimizer or method it is.
TUNABLE_GROUPS = ("optim", "method")
TUNABLE_KEYS = (
    "trainer.epochs",
    "trainer.batch_size",
    "trainer.warmup_epochs",
    "trainer.warmup_lr",
    "trainer.min_lr",
    "trainer.label_smoothing",
    "trainer.grad_clip",
    "backbone.drop_path_rate",
)
NOT_TUNABLE = ("optim._target_", "optim._partial_", "method.name")


def is_tunable(key: str) -> bool:
    """Whether a tune grid may vary ``key`` (a dotted config key) and a hyperparameter file may set it."""
    group = key.split(".", 1)[0]
    return key not in NOT_TUNABLE and (key in TUNABLE_KEYS or (group in TUNABLE_GROUPS and "." in key))


def tunable_keys() -> str:
    """The tunable keys, as a message lists them."""
    return ", ".join([f"{g}.*" for g in TUNABLE_GROUPS] + list(TUNABLE_KEYS))


SELECTION_RULE = "highest mean val200 top-1 over protocol=tune runs with status ok; ties: first grid point in order"


def get_path(tree: dict[str, Any], dotted: str) -> Any:
    cur: Any = tree
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _order_key(values: tuple) -> str:
    return json.dumps(values, sort_keys=True, default=str)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (``{"trainer": {"epochs": 8}}`` -> ``{"trainer.epochs": 8}``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _settings(record: dict[str, Any], keys: Sequence[str], settings: Callable[[dict], dict]) -> dict[str, Any]:
    """What a tune run's result depends on besides the grid point and the seed, as dotted keys."""
    return {k: v for k, v in _flat(settings(record)).items() if k != "seed" and k not in keys}


def _mixed_settings(method: str, task: str, groups: dict[str, tuple[dict[str, Any], int]]) -> str:
    """The error for tune runs of one (method, task) that differ in more than the grid and the seed."""
    flats = [flat for flat, _ in groups.values()]
    differ = sorted(k for k in set().union(*flats) if len({_order_key((f.get(k),)) for f in flats}) > 1)

    def counts(key: str) -> str:
        runs: dict[str, int] = defaultdict(int)
        for flat, n in groups.values():
            runs[json.dumps(flat.get(key), default=str)] += n
        return ", ".join(f"{v} ({n} run{'s' if n > 1 else ''})" for v, n in sorted(runs.items()))

    shown = "; ".join(f"{k}: {counts(k)}" for k in differ[:5])
    more = f" and {len(differ) - 5} more keys" if len(differ) > 5 else ""
    return (
        f"the tune runs of {method} on {task} differ in more than the grid and the seed ({shown}{more}), so a grid "
        "point would average runs of other settings as one; keep each setting's runs apart (a paths.results of "
        "its own) or remove the records of the runs that are not meant, then select again"
    )


TUNED_BY = ("grid", "halving")  # how a tune stage chose: every point to the end, or successive halving


def select_hparams(
    records: Iterable[dict[str, Any]],
    keys: Sequence[str],
    method: str | None = None,
    backbone: str | None = None,
    settings: Callable[[dict], dict] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per dataset, the values of ``keys`` whose ok tune runs have the best mean top-1 (seeds averaged); runs that
    successive halving stopped at a rung (``metrics.stopped_at_epoch``) are out of the running, and the choice says
    so (``tuned_by``: ``halving``, with how many points stopped at each rung, else ``grid``).

    Every grid point must stand for one setting: tune runs of a (method, task) whose configs differ in more than
    ``keys`` and the seed (``settings(record)``: what in a record decides its result; by default its whole
    config) raise ConfigError naming the keys that differ, rather than averaging, say, 8- and 100-epoch runs.
    """
    settings = settings or (lambda record: record["config"])
    scores: dict[str, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    groups: dict[str, dict[str, tuple[dict[str, Any], int]]] = defaultdict(dict)
    halted: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))  # task -> rung epoch -> points stopped
    for r in records:
        if r["protocol"] != "tune" or r["status"] != "ok":
            continue
        if (method and r["method"] != method) or (backbone and r["backbone"] != backbone):
            continue
        if r["metrics"].get("stopped_at_epoch") is not None:  # stopped at a halving rung: halving ruled it out
            halted[r["dataset"]][str(r["metrics"]["stopped_at_epoch"])] += 1
            continue
        top1 = r["metrics"]["top1"]
        if top1 is None or not math.isfinite(top1):
            continue
        values = tuple(get_path(r["config"], k) for k in keys)
        scores[r["dataset"]][values].append(float(top1))
        flat = _settings(r, keys, settings)
        group = _order_key(tuple(sorted(flat.items())))
        seen = groups[r["dataset"]].get(group, (flat, 0))
        groups[r["dataset"]][group] = (flat, seen[1] + 1)
    for task, found in sorted(groups.items()):
        if len(found) > 1:
            raise ConfigError(_mixed_settings(method or "the method", task, found))
    chosen: dict[str, dict[str, Any]] = {}
    for task in sorted(scores):
        candidates = sorted(scores[task].items(), key=lambda kv: _order_key(kv[0]))
        best_values, best_scores = max(candidates, key=lambda kv: sum(kv[1]) / len(kv[1]))  # max keeps the first
        chosen[task] = {
            "values": dict(zip(keys, best_values)),
            "val_top1": sum(best_scores) / len(best_scores),
            "n_runs": len(best_scores),
            "n_candidates": len(candidates),
            # how the choice was made: every point through the whole schedule, or some stopped at halving rungs
            "tuned_by": "halving" if halted[task] else "grid",
            **(
                {"stopped_at_rungs": dict(sorted(halted[task].items(), key=lambda kv: int(kv[0])))}
                if halted[task]
                else {}
            ),
        }
    return chosen


def write_hparams(
    path: str | Path, chosen: dict[str, dict[str, Any]], method: str, backbone: str, keys: Sequence[str]
) -> Path:
    return write_json_atomic(
        path,
        {
            "kind": HPARAMS_KIND,
            "method": method,
            "backbone": backbone,
            "keys": list(keys),
            "selected_by": SELECTION_RULE,
            "tasks": chosen,
        },
    )


def read_hparams(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"no hyperparameter file at {path}: run the tune stage and the selection first "
            f"(python scripts/vtab1k.py <method> --stage tune select), or drop hparams="
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"hyperparameter file {path} is unreadable ({e}); run the select stage again") from None
    if not isinstance(data, dict) or data.get("kind") != HPARAMS_KIND:
        kind = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{path} is not a vpeft hyperparameter file (kind {kind!r})")
    if not isinstance(data.get("tasks"), dict) or not all(
        isinstance(t, dict) and isinstance(t.get("values"), dict) for t in data["tasks"].values()
    ):
        raise ConfigError(f"hyperparameter file {path} is malformed (tasks.<task>.values missing); run select again")
    for task, chosen in data["tasks"].items():
        for key in chosen["values"]:
            if not is_tunable(str(key)):
                raise ConfigError(
                    f"hyperparameter file {path} sets {key} (for {task}), which is no tuned value: a file may set "
                    f"only {tunable_keys()}; remove {key} from the file and give it on the command line instead"
                )
    return data


def hparams_for(path: str | Path, dataset: str, method: str) -> dict[str, Any]:
    """The choice for ``dataset`` from a hyperparameter file, checked against the method: its ``values`` and
    ``tuned_by`` (``grid`` or ``halving``; files from before halving existed were tuned on the grid)."""
    data = read_hparams(path)
    if data["method"] != method:
        raise ConfigError(f"{path} holds hyperparameters of {data['method']}, not {method}")
    if dataset not in data["tasks"]:
        known = ", ".join(sorted(data["tasks"])) or "none"
        raise ConfigError(f"{path} has no tuned hyperparameters for {dataset} (it has: {known}); tune that task first")
    chosen = data["tasks"][dataset]
    tuned_by = chosen.get("tuned_by", "grid")
    if tuned_by not in TUNED_BY:
        raise ConfigError(f"hyperparameter file {path}: tuned_by for {dataset} is {tuned_by!r}, not one of "
                          f"{', '.join(TUNED_BY)}; run the select stage again")  # fmt: skip
    return {"values": chosen["values"], "tuned_by": tuned_by}
