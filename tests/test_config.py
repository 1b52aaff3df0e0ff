"""Every config composes; config groups mirror the code."""

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import vpeft
from vpeft.engine import TrainConfig
from vpeft.methods import METHODS
from vpeft.vtab import TASKS

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def make(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_method_configs_mirror_the_registry():
    assert options("method") == vpeft.list_methods()
    for name in vpeft.list_methods():
        cfg = OmegaConf.to_container(OmegaConf.load(CONF / "method" / f"{name}.yaml"))
        assert cfg.pop("name") == name
        config_cls = METHODS.get(name).Config
        fields = {f.name: f.default for f in dataclasses.fields(config_cls)}
        assert set(cfg) == set(fields), name
        # the yaml's defaults are the dataclass's (tuples and lists compare as lists)
        assert METHODS.get(name).from_kwargs(**cfg).config_dict() == METHODS.get(name).from_kwargs().config_dict()


def test_every_vtab_task_has_a_dataset_config():
    assert set(TASKS) <= set(options("dataset"))


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, o) for g in ("backbone", "method", "dataset", "optim", "trainer", "logger", "bench") for o in options(g)],
)
def test_every_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "dataset" and option in ("folder", "imagefolder"):
        overrides.append("dataset.root=/some/task")
    cfg = make(overrides)
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert container[group] is not None
    if group == "method":
        METHODS.get(container["method"]["name"]).from_kwargs(
            **{k: v for k, v in container["method"].items() if k != "name"}
        )
    if group == "trainer":
        TrainConfig(**container["trainer"])


def test_trainer_config_mirrors_the_engine():
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "trainer" / "default.yaml"))
    assert set(cfg) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_keys_users_type_exist():
    cfg = make(
        [
            "method=vpt_deep",
            "dataset=cifar100",
            "seed=3",
            "protocol=tune",
            "trainer.epochs=5",
            "trainer.batch_size=32",
            "optim.lr=0.01",
            "optim.weight_decay=0.0",
            "backbone.name=vit_small_patch16_224",
            "backbone.pretrained=false",
            "backbone.img_size=96",
            "backbone.checkpoint=/w.safetensors",
            "dataset.root=/data/cifar100",
            "paths.results=/tmp/r",
            "device=cpu",
        ]
    )
    assert cfg.method.name == "vpt_deep" and cfg.dataset.name == "cifar100" and cfg.backbone.img_size == 96


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.epoch=3", "epoch"),
        ("method=loraa", "loraa"),
        ("dataset=cifar1000", "cifar1000"),
        ("method.rank=4", "rank"),
    ],
)
def test_typos_are_errors_naming_the_key(override, message):
    with pytest.raises(ConfigCompositionException, match=message):
        make([override])


def test_unknown_group_option_lists_the_valid_ones():
    with pytest.raises(ConfigCompositionException) as e:
        make(["method=loraa"])
    text = str(e.value) + str(e.value.__cause__ or "")
    assert "lora" in text and "vpt_deep" in text


def test_every_method_has_a_vtab1k_recipe_that_composes():
    # adapter_fusion fuses adapters trained on other tasks first: a two-stage job, not a single-task recipe
    for name in sorted(set(vpeft.list_methods()) - {"adapter_fusion"}):
        path = CONF / "experiment" / f"vtab1k_{name}.yaml"
        assert path.is_file(), f"no VTAB-1k recipe for {name}"
        header = path.read_text()
        assert f"python scripts/vtab1k.py {name}" in header and "Expected GPU time" in header
        cfg = make([f"+experiment=vtab1k_{name}", "dataset=svhn"])
        assert cfg.method.name == name and cfg.backbone.name == "vit_base_patch16_224.orig_in21k"
        grid = OmegaConf.to_container(cfg.sweep.grid, resolve=True)
        assert {"optim.lr", "optim.weight_decay"} <= set(grid)
        if name == "vpt_deep":
            assert cfg.method.num_tokens == 50  # VPT-deep's prompt length for svhn (VPT-shallow tunes it)
