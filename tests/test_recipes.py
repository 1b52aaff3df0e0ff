"""The VTAB-1k recipes are the literature's: optimizer parameter groups, drop path, VPT's SGD recipe, grids."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from vpeft.engine import param_groups
from vpeft.vtab import TASKS, VPT_DEEP_PROMPT_TOKENS, VPT_PROMPT_LENGTHS

CONF = Path(__file__).resolve().parents[1] / "conf"
# the recipes of this suite's methods (other recipe files may exist beside them)
RECIPES = [
    "adapter_houlsby", "adapter_pfeiffer", "adaptformer", "bitfit", "full", "ia3", "linear", "lora", "prefix",
    "ssf", "vpt_deep", "vpt_shallow", "vpt_deep_adamw", "vpt_shallow_adamw",
]  # fmt: skip


def make(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


class Tiny(nn.Module):
    """A hand-built model: 2-D weights, biases, a norm, a scale at 1, a prompt, a frozen layer, a named exemption."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)  # weight 2-D: decays; bias: no decay
        self.norm = nn.LayerNorm(4)  # weight and bias 1-D: no decay
        self.scale = nn.Parameter(torch.ones(4))  # an SSF / IA3 scale: no decay
        self.prompt = nn.Parameter(torch.zeros(1, 3, 4))  # 3-D: decays
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))  # 3-D but named by no_weight_decay(): no decay
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def no_weight_decay(self):
        return {"pos_embed"}


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def _by_decay(model, groups):
    out = {}
    for g in groups:
        out.setdefault(g["weight_decay"], []).extend(_names(model, g))
    return {wd: sorted(n) for wd, n in out.items()}


def test_default_groups_exempt_1d_tensors_and_no_weight_decay_names():
    model = Tiny()
    groups = param_groups(model, 0.05)
    assert _by_decay(model, groups) == {
        0.05: ["fc.weight", "prompt"],
        0.0: ["fc.bias", "norm.bias", "norm.weight", "pos_embed", "scale"],
    }


def test_decay_1d_decays_every_trainable_tensor():
    model = Tiny()
    groups = param_groups(model, 0.05, decay_1d=True)
    assert _by_decay(model, groups) == {
        0.05: ["fc.bias", "fc.weight", "norm.bias", "norm.weight", "pos_embed", "prompt", "scale"]
    }


@pytest.mark.parametrize("decay_1d", [False, True])
def test_only_trainable_parameters_reach_the_optimizer(decay_1d):
    model = Tiny()
    groups = param_groups(model, 1e-4, decay_1d=decay_1d)
    handed = {id(p) for g in groups for p in g["params"]}
    assert handed == {id(p) for p in model.parameters() if p.requires_grad}
    assert not handed & {id(p) for p in model.frozen.parameters()}


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
def test_the_optimizer_configs_build_on_the_groups(optim):
    cfg = OmegaConf.to_container(make([f"optim={optim}"]).optim, resolve=True)
    assert cfg.pop("decay_1d") is False  # timm's rule by default
    model = Tiny()
    opt = instantiate(cfg)(param_groups(model, cfg["weight_decay"]))
    decays = {n: g["weight_decay"] for g in opt.param_groups for n in _names(model, g)}
    assert decays["scale"] == 0.0 and decays["fc.weight"] == cfg["weight_decay"]
    # one step with a large decay and zero gradients: the scale stays at 1, the 2-D weight shrinks
    model.fc.weight.data.fill_(1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = 0.1, 0.5 if g["weight_decay"] else 0.0
    opt.step()
    assert torch.equal(model.scale.detach(), torch.ones(4)) and bool((model.fc.weight < 1).all())


def test_the_train_job_records_decay_1d_in_the_resolved_config():
    from vpeft.jobs.train import plan_run

    cfg = make(["+experiment=vtab1k_bitfit", "dataset=svhn"])
    plan = plan_run(cfg)
    assert plan.resolved["optim"]["decay_1d"] is False
    assert plan.resolved["backbone"]["drop_path_rate"] == 0.1
    assert plan.resolved["recipe"] == "vtab1k_bitfit"
    old = plan_run(make(["+experiment=vtab1k_bitfit", "dataset=svhn", "optim.decay_1d=true"]))
    assert old.identity["config_hash"] != plan.identity["config_hash"]


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_uses_drop_path_and_names_itself(name):
    path = CONF / "experiment" / f"vtab1k_{name}.yaml"
    header = path.read_text().split("defaults:")[0]
    assert "Recipe" in header or "Regularisation" in header, "the header says what the recipe is"
    for task in ("svhn", "clevr_count"):
        cfg = make([f"+experiment=vtab1k_{name}", f"dataset={task}"])
        assert cfg.backbone.drop_path_rate == 0.1
        assert cfg.recipe == f"vtab1k_{name}"
        assert cfg.optim.decay_1d is False
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("variant", ["vpt_deep", "vpt_shallow"])
def test_vpt_recipes_are_vpts_sgd_recipe(variant):
    cfg = make([f"+experiment=vtab1k_{variant}", "dataset=sun397"])
    assert cfg.optim._target_ == "torch.optim.SGD" and cfg.optim.momentum == 0.9
    assert cfg.trainer.batch_size == 128 and cfg.trainer.epochs == 100
    grid = OmegaConf.to_container(cfg.sweep.grid, resolve=True)
    base = [50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05]  # KMnP/vpt tune_vtab.py, train_type "prompt"
    assert sorted(grid["optim.lr"]) == sorted(b * cfg.trainer.batch_size / 256 for b in base)
    assert sorted(grid["optim.weight_decay"]) == [0.0, 1e-4, 1e-3, 1e-2]
    if variant == "vpt_deep":
        assert cfg.method.num_tokens == 5 and cfg.method.dropout == 0.1  # demo.ipynb's sun397 run
        assert set(grid) == {"optim.lr", "optim.weight_decay"}
    else:
        assert grid["method.num_tokens"] == list(VPT_PROMPT_LENGTHS) and cfg.method.dropout == 0.0


def test_vpt_deep_lengths_cover_every_task_and_agree_with_vpts_own_runs():
    assert set(VPT_DEEP_PROMPT_TOKENS) == set(TASKS)
    assert {t: VPT_DEEP_PROMPT_TOKENS[t] for t in ("dmlab", "sun397", "eurosat")} == {
        "dmlab": 100, "sun397": 5, "eurosat": 100,
    }  # fmt: skip
    for task in TASKS:
        assert (
            make(["+experiment=vtab1k_vpt_deep", f"dataset={task}"]).method.num_tokens == VPT_DEEP_PROMPT_TOKENS[task]
        )


def test_vpt_adamw_variants_keep_the_noah_recipe():
    for variant in ("vpt_deep", "vpt_shallow"):
        cfg = make([f"+experiment=vtab1k_{variant}_adamw", "dataset=svhn"])
        assert cfg.method.name == variant and cfg.optim._target_ == "torch.optim.AdamW"
        assert cfg.trainer.batch_size == 64 and cfg.method.num_tokens == 50


def test_ssf_grid_covers_ssfs_published_per_task_settings():
    cfg = make(["+experiment=vtab1k_ssf", "dataset=svhn"])
    grid = OmegaConf.to_container(cfg.sweep.grid, resolve=True)
    assert cfg.trainer.batch_size == 32 and cfg.trainer.min_lr == 1e-8
    # (lr, weight decay, drop path) of dongzelian/SSF train_scripts/vit/vtab/<task>/train_ssf.sh
    published = {
        "caltech101": (1e-3, 5e-2, 0.1), "cifar100": (5e-3, 5e-5, 0.0), "clevr_count": (2e-3, 5e-2, 0.1),
        "clevr_dist": (5e-2, 5e-2, 0.1), "diabetic_retinopathy": (5e-3, 5e-5, 0.2), "dmlab": (5e-3, 5e-5, 0.1),
        "dsprites_loc": (1e-2, 5e-5, 0.0), "dsprites_ori": (5e-3, 5e-5, 0.2), "dtd": (5e-3, 5e-5, 0.0),
        "eurosat": (3e-3, 5e-2, 0.2), "oxford_flowers102": (5e-3, 5e-5, 0.0), "kitti": (1e-2, 5e-5, 0.0),
        "patch_camelyon": (5e-3, 5e-5, 0.0), "oxford_iiit_pet": (5e-3, 5e-5, 0.0), "resisc45": (2e-3, 5e-5, 0.1),
        "smallnorb_azi": (2e-2, 5e-5, 0.1), "smallnorb_ele": (5e-3, 5e-2, 0.2), "sun397": (5e-3, 5e-5, 0.0),
        "svhn": (1e-2, 5e-5, 0.0),
    }  # fmt: skip
    assert set(published) == set(TASKS)
    for lr, wd, dp in published.values():
        assert lr in grid["optim.lr"] and wd in grid["optim.weight_decay"] and dp in grid["backbone.drop_path_rate"]


def test_the_select_stage_counts_only_the_recipes_runs(tmp_path, capsys):
    import json
    import subprocess
    import sys

    results = tmp_path / "runs"

    root = Path(__file__).resolve().parents[1]
    template = json.loads(next((root / "results" / "runs").rglob("tune-seed0-*.json")).read_text())

    def record(i, recipe, top1, task="svhn"):
        config = {**template["config"], "optim": {"lr": 1e-3 * (i + 1), "weight_decay": 1e-4}, "recipe": recipe}
        r = {
            **template, "dataset": task, "method": "bitfit", "backbone": "vit_base_patch16_224.orig_in21k",
            "protocol": "tune", "seed": 0, "status": "ok", "metrics": {**template["metrics"], "top1": top1},
            "config": config, "config_hash": f"{i:010d}",
        }  # fmt: skip
        (results / task).mkdir(parents=True, exist_ok=True)
        (results / task / f"r{i}.json").write_text(json.dumps(r))

    def select(task):
        out = subprocess.run(
            [sys.executable, str(root / "scripts" / "vtab1k.py"), "bitfit", "--stage", "select", "--tasks", task,
             f"paths.results={results}"],
            cwd=root, capture_output=True, text=True,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        return json.loads((tmp_path / "hparams" / "vit_base_patch16_224.orig_in21k" / "bitfit.json").read_text())

    record(0, None, 99.0)  # a run from before the recipe named itself: never chosen
    record(1, "vtab1k_bitfit", 50.0)
    assert select("svhn")["tasks"]["svhn"]["values"]["optim.lr"] == 2e-3
    # a second batch of tasks keeps the first batch's choice in the file
    record(2, "vtab1k_bitfit", 40.0, task="dtd")
    record(3, "vtab1k_bitfit", 60.0, task="dtd")
    chosen = select("dtd")["tasks"]
    assert chosen["dtd"]["values"]["optim.lr"] == 4e-3
    assert chosen["svhn"]["values"]["optim.lr"] == 2e-3
