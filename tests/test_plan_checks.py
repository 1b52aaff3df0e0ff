"""Every value known at plan time checked before anything runs: bad values exit 2 with one message naming the key,
the value, the range and the fix, and no record; the merge job's grids and pools; hyperparameter files that set only
tuned keys; a select stage that never averages tune runs of different settings as one grid point."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from data_helpers import write_noah
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_merge_job import SPLITS, merge, trained_pool
from test_merge_job import TINY as MERGE_TINY
from test_run import ROOT, odd_images, records, run_cli, run_inproc

import vpeft
from vpeft.errors import ConfigError
from vpeft.jobs.train import plan_run
from vpeft.methods import METHODS
from vpeft.results import iter_records
from vpeft.results.record import hashed_config
from vpeft.vtab import HPARAMS_KIND, is_tunable, select_hparams

TINY = ["backbone=vit_tiny_random", "dataset=digits"]


def plan(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return plan_run(compose("config", [*TINY, *overrides]))


# (overrides, what the message must say: the key, the bad value as given, the range)
BAD_VALUES = [
    (["trainer.grad_clip=-1"], ["trainer.grad_clip", "got -1", "> 0 or null"]),  # gradient ascent
    (["trainer.label_smoothing=nan"], ["trainer.label_smoothing", "got nan", "[0, 1)"]),
    (["trainer.label_smoothing=2"], ["trainer.label_smoothing", "got 2", "[0, 1)"]),
    (["backbone.drop_path_rate=-0.1"], ["backbone.drop_path_rate", "got -0.1", "[0, 1)"]),
    (["backbone.drop_path_rate=2"], ["backbone.drop_path_rate", "got 2", "[0, 1)"]),
    (["trainer.eval_every=-1"], ["trainer.eval_every", "got -1", ">= 0"]),
    (["trainer.epochs=0"], ["trainer.epochs", "got 0", "positive integer"]),
    (["trainer.epochs=true"], ["trainer.epochs", "got true", "positive integer"]),
    (["trainer.batch_size=-8"], ["trainer.batch_size", "got -8", "positive integer"]),
    (["trainer.eval_batch_size=0"], ["trainer.eval_batch_size", "got 0", "positive integer"]),
    (["trainer.min_lr=-1e-5"], ["trainer.min_lr", "got -1e-05", ">= 0"]),
    (["trainer.min_lr=nan"], ["trainer.min_lr", "got nan", ">= 0"]),
    (["trainer.warmup_lr=nan"], ["trainer.warmup_lr", "got nan", ">= 0"]),
    (["trainer.warmup_lr=-1"], ["trainer.warmup_lr", "got -1", ">= 0"]),
    (["trainer.warmup_epochs=-1"], ["trainer.warmup_epochs", "got -1", "[0, epochs=100]"]),
    (["trainer.compile=yes"], ["trainer.compile", "got 'yes'", "true or false"]),
    (["trainer.compile_mode=fast"], ["trainer.compile_mode", "got 'fast'", "reduce-overhead", "compile_mode=default"]),
    (["trainer.progress=1"], ["trainer.progress", "got 1", "true or false"]),
    (["trainer.amp=fp16"], ["trainer.amp", "got 'fp16'", "auto, bf16 or none"]),
    (["save_delta=maybe"], ["save_delta", "got 'maybe'", "true or false"]),
    (["skip_finished=nope"], ["skip_finished", "got 'nope'", "true or false"]),
    (["seed=99999999999999999999"], ["seed", "got 99999999999999999999", "[0, 4294967295]"]),
    (["seed=-1"], ["seed", "got -1", "[0, 4294967295]"]),
    (["seed=1.5"], ["seed", "got 1.5", "an integer"]),
    (["device=gpu"], ["device", "got 'gpu'", "auto, cpu, cuda or cuda:N"]),
    (["jobs_per_gpu=0"], ["jobs_per_gpu", "got 0", "positive integer"]),
    (["optim.betas=abc"], ["optim.betas", "got 'abc'", "pair of numbers in [0, 1)"]),
    (["optim.betas=[0.9]"], ["optim.betas", "got [0.9]", "pair of numbers in [0, 1)"]),
    (["optim.betas=[2,0.9]"], ["optim.betas", "got [2, 0.9]", "pair of numbers in [0, 1)"]),
    (["+optim.eps=0"], ["optim.eps", "got 0", "> 0"]),
    (["+optim.eps=-1e-8"], ["optim.eps", "got -1e-08", "> 0"]),
    (["optim.lr=0"], ["optim.lr", "got 0", "> 0"]),
    (["optim.weight_decay=-1"], ["optim.weight_decay", "got -1", ">= 0"]),
    (["optim.decay_1d=sometimes"], ["optim.decay_1d", "got 'sometimes'", "true or false"]),
    (["optim=sgd", "optim.momentum=-0.9"], ["optim.momentum", "got -0.9", "[0, 1)"]),
    (["optim=sgd", "+optim.nesterov=maybe"], ["optim.nesterov", "got 'maybe'", "true or false"]),
    # what the optimizer itself refuses (torch's checks, run on a stand-in parameter while planning)
    (["optim=sgd", "optim.momentum=0", "+optim.nesterov=true"], ["torch.optim.SGD refuses", "optim.nesterov=true"]),
    (["optim.betas=[0,0.999]"], ["torch.optim.AdamW refuses", "optim.betas=[0, 0.999]", "both floats"]),
    (["backbone.pretrained=maybe"], ["backbone.pretrained", "got 'maybe'", "true or false"]),
    (["dataset.split_seed=-1"], ["dataset.split_seed", "got -1", "[0, 4294967295]"]),
    (["logger=wandb", "logger.mode=sometimes"], ["logger.mode='sometimes'", "offline"]),
    (["logger.name=tensorboard"], ["logger.name='tensorboard'", "none and wandb"]),
    (["bench.only=maybe"], ["bench.only", "got 'maybe'", "true or false"]),
    (["bench.latency=maybe"], ["bench.latency", "got 'maybe'", "true or false"]),
    (["bench.flops=0"], ["bench.flops", "got 0", "true or false"]),
    (["bench.train_isolate=maybe"], ["bench.train_isolate", "got 'maybe'", "true, false or null"]),
    (["bench.num_classes=0"], ["bench.num_classes", "got 0", "positive integer"]),
    (["bench.warmup=-1"], ["bench.warmup", "got -1", ">= 0"]),
    (["bench.iters=0"], ["bench.iters", "got 0", ">= 1"]),
    (["bench.train_steps=-1"], ["bench.train_steps", "got -1", ">= 0"]),
    (["bench.train_batch=0"], ["bench.train_batch", "got 0", ">= 1"]),
    (["bench.batches=[0]"], ["bench.batches", "got 0", ">= 1"]),
    (["bench.batches=5"], ["bench.batches", "got 5", "non-empty list"]),
    (["bench.dtypes=fp32"], ["bench.dtypes", "got 'fp32'", "non-empty list"]),
    (["bench.dtypes=[fp8]"], ["fp8", "fp32"]),
]


@pytest.mark.parametrize(("overrides", "needles"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_a_bad_value_is_refused_while_planning(overrides, needles):
    with pytest.raises(ConfigError) as e:
        plan(*overrides)
    message = str(e.value)
    for needle in needles:
        assert needle in message, message
    assert "\n" not in message


def test_the_bool_message_names_the_fix():
    """true/false written as a string: the message says which value to set, not only what is wrong."""
    with pytest.raises(ConfigError, match=r"set trainer.compile=false"):
        plan("trainer.compile=yes")


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.label_smoothing=0.0", "trainer.grad_clip=null", "trainer.eval_every=0", "trainer.warmup_epochs=0"],
        ["trainer.label_smoothing=0.99", "trainer.grad_clip=0.5", "trainer.min_lr=0", "trainer.warmup_lr=0"],
        ["seed=4294967295", "backbone.drop_path_rate=0.0", "optim.betas=[0.0,0.999]", "+optim.eps=1e-12"],
        ["backbone.drop_path_rate=0.99", "optim=sgd", "optim.momentum=0"],
        ["optim=sgd", "+optim.nesterov=true"],
        ["bench.warmup=0", "bench.train_steps=0", "bench.batches=[1,2]", "bench.dtypes=[fp32]"],
        ["save_delta=false", "skip_finished=false", "trainer.compile=true", "bench.train_isolate=null"],
    ],
)
def test_the_edges_of_every_range_are_accepted(overrides):
    """The checks refuse only what is out of range: the edges of each range plan."""
    assert plan(*overrides).identity["config_hash"]


def _numeric_fields() -> list[tuple[str, str]]:
    """(method, field) of every int or float field of every method's Config."""
    return [
        (name, f.name)
        for name in METHODS.names()
        for f in dataclasses.fields(METHODS.get(name).Config)
        if {"int", "float"} & {k.strip() for k in str(f.type).split("|")}
    ]


@pytest.mark.parametrize(("method", "field"), _numeric_fields(), ids=lambda v: str(v))
@pytest.mark.parametrize("bad", [-1, math.nan, math.inf])
def test_every_numeric_method_field_refuses_negative_and_non_finite_values(method, field, bad):
    """No method field takes a negative, NaN or infinite value (rates, ranks, scales, alphas, counts alike)."""
    with pytest.raises(ConfigError) as e:
        METHODS.get(method).from_kwargs(**{field: bad})
    assert field in str(e.value)


def test_method_values_exit_2_through_the_run_too(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_inproc(tmp_path, *TINY, "method=fact", "method.scale=nan")
    assert e.value.code == 2
    assert "fact scale must be a finite number > 0, got nan" in capsys.readouterr().err
    assert records(tmp_path) == []


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("trainer.grad_clip=-1", "trainer.grad_clip must be a finite number > 0 or null, got -1"),
        ("seed=99999999999999999999", "seed must be an integer in [0, 4294967295], got 99999999999999999999"),
        ("trainer.compile=yes", "trainer.compile must be true or false, got 'yes'; set trainer.compile=false"),
        ("optim.betas=[2,0.9]", "optim.betas must be a pair of numbers in [0, 1), got [2, 0.9]"),
    ],
)
def test_bad_values_from_the_command_line_exit_2_without_a_record(override, needle, tmp_path):
    """Through a real `python run.py`: exit 2, one line, no traceback, no record, nothing built (no data cache)."""
    res = run_cli(tmp_path, *TINY, "trainer.epochs=1", override)
    assert res.returncode == 2, res.stderr[-2000:]
    [error] = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert needle in error and "Traceback" not in res.stderr
    assert records(tmp_path) == [] and not (tmp_path / "cache").exists()


# -- the merge job ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            ["merge.grid.lam=[-0.5,1.0]"],
            "merge.grid.lam[0] must be a finite number >= 0, got -0.5; set merge.grid.lam=[1.0]",
        ),
        (["merge.grid.lam=[1.0,nan]"], "merge.grid.lam[1] must be a finite number >= 0, got nan"),
        (["merge.grid.lam=[]"], "merge.grid.lam must be a non-empty list of values, got []"),
        (["merge.grid.lam=abc"], "merge.grid.lam must be a non-empty list of values, got 'abc'"),
        (["merge.grid.lam=[abc]"], "merge.grid.lam[0] must be a finite number >= 0, got 'abc'"),
        (["merge=ties", "merge.grid.density=[0]"], "merge.grid.density[0] must be a finite number in (0, 1], got 0"),
        (["merge=ties", "merge.grid.density=[0.2,1.5]"], "merge.grid.density[1] must be a finite number in (0, 1]"),
        (
            ["merge=dare_task_arithmetic", "merge.grid.drop=[1.0]"],
            "merge.grid.drop[0] must be a finite number in [0, 1)",
        ),
        (["merge=dare_ties", "merge.params.seed=-3"], "merge.params.seed must be an integer in [0, 4294967295]"),
        (
            ["merge=weighted_average", "+merge.params.weights=[1]"],
            "merge.params.weights must be one weight per task (2)",
        ),
        (
            ["merge=weighted_average", "+merge.params.weights=[1,-0.5]"],
            "merge.params.weights[1] must be a finite number >= 0",
        ),
    ],
)
def test_a_bad_merge_grid_exits_2_while_planning(overrides, needle, tmp_path, capsys):
    """No run of the pool exists: the grid is refused before the merge looks for its deltas."""
    with pytest.raises(SystemExit) as e:
        run_inproc(tmp_path, *MERGE_TINY, "job=merge", f"paths.merges={tmp_path / 'merges'}",
                   "merge.tasks=[digits,dsprites_loc]", *overrides)  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "train it first" not in err
    assert not (tmp_path / "merges").exists()


@pytest.fixture(scope="module")
def own_pool(tmp_path_factory):
    """A pool of two trained tasks whose delta files the tests below replace (copies kept to restore them)."""
    tmp = tmp_path_factory.mktemp("pool")
    return tmp, trained_pool(tmp)


def _delta_of(tmp: Path, task: str, protocol: str) -> Path:
    name = Path(task.split(":", 1)[1]).name
    [path] = [p for p, r in iter_records(tmp / "runs") if r["dataset"] == name and r["protocol"] == protocol]
    return path.with_name(json.loads(path.read_text())["delta_file"])


def _tiny(num_classes: int):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=num_classes)


@pytest.mark.parametrize(
    ("method", "classes", "needle"),
    [("ssf", 3, "holds a ssf delta, not lora"), ("lora", 5, "has 5 classes but alpha has 3")],
)
def test_a_pool_with_a_foreign_delta_exits_2_naming_the_file(own_pool, method, classes, needle, capsys):
    """A delta of another method, or a head of another width, in the pool: exit 2 at set-up, naming the file,
    before any merging; the pool itself merges once the file is back."""
    tmp, tasks = own_pool
    delta = _delta_of(tmp, tasks[1], "final")
    original = delta.read_bytes()
    try:
        model = vpeft.apply_method(_tiny(classes), method)
        vpeft.save_delta(model, delta)
        before = sorted((tmp / "merges").rglob("*.json"))
        with pytest.raises(SystemExit) as e:
            merge(tmp, tasks, "merge=task_arithmetic", "merge.grid.lam=[1.0]", "skip_finished=false")
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert needle in err and str(delta) in err
        assert sorted((tmp / "merges").rglob("*.json")) == before  # no record
    finally:
        delta.write_bytes(original)
    assert merge(tmp, tasks, "merge=task_arithmetic", "merge.grid.lam=[1.0]")["status"] == "ok"


# -- hyperparameter files -----------------------------------------------------------------------------------------


def _hparams(tmp: Path, values: dict) -> Path:
    path = tmp / "hp.json"
    path.write_text(json.dumps({"kind": HPARAMS_KIND, "method": "lora", "backbone": "b", "keys": list(values),
                                "tasks": {"digits": {"values": values}}}))  # fmt: skip
    return path


@pytest.mark.parametrize(
    "key",
    ["seed", "paths.results", "protocol", "dataset.name", "backbone.name", "device", "job", "hparams",
     "method.name", "optim._target_", "trainer.progress", "save_delta"],
)  # fmt: skip
def test_a_hparams_file_may_not_set_what_names_a_run(key, tmp_path):
    path = _hparams(tmp_path, {"optim.lr": 0.005, key: "x"})
    with pytest.raises(ConfigError) as e:
        plan(f"hparams={path}")
    assert key in str(e.value) and str(path) in str(e.value) and "optim.*" in str(e.value)


def test_a_hparams_file_sets_the_tuned_values(tmp_path):
    values = {"optim.lr": 0.005, "optim.weight_decay": 0.01, "method.alpha": 16, "backbone.drop_path_rate": 0.1,
              "trainer.label_smoothing": 0.1}  # fmt: skip
    p = plan(f"hparams={_hparams(tmp_path, values)}")
    for key, value in values.items():
        assert OmegaConf.select(OmegaConf.create(p.resolved), key) == value
    bad = _hparams(tmp_path, {"optim.lr": -1.0})  # a tuned value is checked like any other
    with pytest.raises(ConfigError, match=r"optim.lr must be a finite number > 0, got -1.0"):
        plan(f"hparams={bad}")


def test_every_recipe_grid_key_is_tunable_and_others_are_refused_by_the_script():
    for recipe in sorted((ROOT / "conf" / "experiment").glob("vtab1k_*.yaml")):
        grid = OmegaConf.load(recipe).sweep.grid
        assert all(is_tunable(k) for k in grid), recipe.name
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "vtab1k.py"), "lora", "--grid", "seed=0,1",
                          "--dry-run"], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 2 and "--grid seed" in res.stderr and "optim.*" in res.stderr


# -- the select stage ---------------------------------------------------------------------------------------------

TUNE = ["+experiment=vtab1k_lora", "backbone=vit_tiny_random", "dataset=folder", "protocol=tune", "optim.lr=1e-3",
        "bench.latency=false", "bench.flops=false", "save_delta=false", "trainer.progress=false"]  # fmt: skip


def _select(results: Path, *extra: str) -> list[str]:
    return [str(ROOT / "scripts" / "vtab1k.py"), "lora", "--stage", "select", "--tasks", "gamma", "--grid",
            "optim.lr=1e-3", "backbone=vit_tiny_random", f"paths.results={results}", *extra]  # fmt: skip


def test_select_refuses_tune_runs_of_two_epoch_counts(tmp_path):
    """Real tune runs at 1 and 2 epochs are no one grid point: the select stage exits 2 naming trainer.epochs and
    both values; with the runs of one setting (two seeds of it) it chooses."""
    root = write_noah(tmp_path / "tasks" / "gamma", {s: odd_images(12, seed=i) for i, s in enumerate(SPLITS)})
    for epochs, seed in ((1, 0), (1, 1), (2, 0)):
        record = run_inproc(tmp_path, *TUNE, f"dataset.root={root}", f"trainer.epochs={epochs}", f"seed={seed}")
        assert record["status"] == "ok"
    runs = [r for _, r in iter_records(tmp_path / "runs")]
    with pytest.raises(ConfigError) as e:
        select_hparams(runs, ["optim.lr"], method="lora", settings=lambda r: hashed_config(r["config"]))
    assert "trainer.epochs: 1 (2 runs), 2 (1 run)" in str(e.value)
    res = subprocess.run([sys.executable, *_select(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "trainer.epochs: 1 (2 runs), 2 (1 run)" in res.stderr and "paths.results" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "hparams").exists()

    for path, r in iter_records(tmp_path / "runs"):
        if r["config"]["trainer"]["epochs"] == 2:
            path.unlink()
    spec = importlib.util.spec_from_file_location("vtab1k", ROOT / "scripts" / "vtab1k.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(_select(tmp_path / "runs")[1:]) == 0
    [hp] = (tmp_path / "hparams").rglob("lora.json")
    chosen = json.loads(hp.read_text())["tasks"]["gamma"]
    assert chosen["n_runs"] == 2 and chosen["values"] == {"optim.lr": 1e-3}  # the two seeds of one setting


def test_select_groups_by_everything_but_the_grid_and_the_seed():
    """Pure: runs that differ only in the grid point and the seed are one setting; another batch size, or another
    compute, is not, and every differing key is named with its values."""
    template = json.loads(next((ROOT / "results" / "runs").rglob("tune-seed0-*.json")).read_text())

    def run(lr, seed, top1, **trainer):
        config = json.loads(json.dumps(template["config"]))
        config["optim"]["lr"], config["seed"] = lr, seed
        config["trainer"].update(trainer)
        return {**template, "status": "ok", "protocol": "tune", "seed": seed, "config": config,
                "metrics": {**template["metrics"], "top1": top1}}  # fmt: skip

    def settings(r):
        return hashed_config(r["config"], r.get("compute"))

    one = [run(1e-3, 0, 60.0), run(1e-3, 1, 80.0), run(5e-3, 0, 65.0)]
    [chosen] = select_hparams(one, ["optim.lr"], settings=settings).values()
    assert chosen["values"] == {"optim.lr": 1e-3} and chosen["n_runs"] == 2 and chosen["val_top1"] == 70.0
    with pytest.raises(ConfigError, match=r"trainer.batch_size: 32 \(1 run\), 64 \(3 runs\)"):
        select_hparams([*one, run(5e-3, 1, 99.0, batch_size=32)], ["optim.lr"], settings=settings)
    with pytest.raises(ConfigError, match=r'compute: "cuda-bf16" \(1 run\), null \(3 runs\)'):
        select_hparams([*one, {**run(5e-3, 1, 99.0), "compute": "cuda-bf16"}], ["optim.lr"], settings=settings)
