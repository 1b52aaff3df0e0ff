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
from collections.abc import Iterable, Sequence
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


def select_hparams(
    records: Iterable[dict[str, Any]],
    keys: Sequence[str],
    method: str | None = None,
    backbone: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Per dataset, the values of ``keys`` whose ok tune runs have the best mean top-1 (seeds averaged)."""
    scores: dict[str, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["protocol"] != "tune" or r["status"] != "ok":
            continue
        if (method and r["method"] != method) or (backbone and r["backbone"] != backbone):
            continue
        top1 = r["metrics"]["top1"]
        if top1 is None or not math.isfinite(top1):
            continue
        values = tuple(get_path(r["config"], k) for k in keys)
        scores[r["dataset"]][values].append(float(top1))
    chosen: dict[str, dict[str, Any]] = {}
    for task in sorted(scores):
        candidates = sorted(scores[task].items(), key=lambda kv: _order_key(kv[0]))
        best_values, best_scores = max(candidates, key=lambda kv: sum(kv[1]) / len(kv[1]))  # max keeps the first
        chosen[task] = {
            "values": dict(zip(keys, best_values)),
            "val_top1": sum(best_scores) / len(best_scores),
            "n_runs": len(best_scores),
            "n_candidates": len(candidates),
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
    return data


def hparams_for(path: str | Path, dataset: str, method: str) -> dict[str, Any]:
    """The chosen values for ``dataset`` from a hyperparameter file, checked against the method."""
    data = read_hparams(path)
    if data["method"] != method:
        raise ConfigError(f"{path} holds hyperparameters of {data['method']}, not {method}")
    if dataset not in data["tasks"]:
        known = ", ".join(sorted(data["tasks"])) or "none"
        raise ConfigError(f"{path} has no tuned hyperparameters for {dataset} (it has: {known}); tune that task first")
    return data["tasks"][dataset]["values"]
