"""Retention: DINO's k-NN on pre-logit features against independent truth, and the retention job end to end."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_vit, tiny_input
from data_helpers import write_noah
from PIL import Image
from safetensors.torch import load_file, save_file
from sklearn.neighbors import KNeighborsClassifier
from test_run import ROOT, run_inproc

import vpeft
from vpeft.methods import METHODS
from vpeft.probe import extract_features, knn_predict, knn_top1, retention
from vpeft.results.retention import read_retention_record

TINY = ["backbone=vit_tiny_random", "trainer.epochs=1", "bench.latency=false", "bench.flops=false",
        "trainer.progress=false", "trainer.batch_size=8"]  # fmt: skip
SPLITS = ("train800", "val200", "train800val200", "test")


# -- the k-NN classifier ---------------------------------------------------------------------------------------


def _features(n: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return centers[labels] + 1.5 * torch.randn(n, d, generator=g), labels


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_predictions_equal_scikit_learns_weighted_cosine_knn(k):
    """scikit-learn's KNeighborsClassifier with the cosine metric and DINO's weights exp(cos / T) = exp((1 - d) / T)
    predicts what ``knn_predict`` does, sample for sample."""
    train, y = _features(300, 16, 7, seed=0)
    test, _ = _features(200, 16, 7, seed=1)
    t = 0.07
    ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1 - d) / t)).fit(train.numpy(), y.numpy())  # fmt: skip
    ours = knn_predict(train, y, test, num_classes=7, k=k, temperature=t, chunk=64)
    assert (ours.numpy() == ref.predict(test.numpy())).all()


def test_knn_by_hand():
    """Two neighbours of class 1 at cosine 0.6 outvote one of class 0 at cosine 1 only when T is large enough:
    exp(1/T) against 2 exp(0.6/T) turns at T = 0.4 / ln 2."""
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[2.0, 0.0]])  # norm 2: cosine ignores it
    turn = 0.4 / math.log(2)
    assert knn_predict(train, labels, test, 2, k=3, temperature=turn * 0.9).item() == 0
    assert knn_predict(train, labels, test, 2, k=3, temperature=turn * 1.1).item() == 1
    assert knn_predict(train, labels, test, 2, k=1, temperature=10.0).item() == 0  # only the nearest votes
    assert knn_top1(train, labels, test, torch.tensor([1]), 2, k=3, temperature=1.0) == 100.0


@pytest.mark.parametrize("bad", [dict(k=0), dict(k=2.5), dict(temperature=0.0), dict(temperature=float("nan"))])
def test_knn_refuses_bad_settings(bad):
    train, y = _features(10, 4, 2, seed=0)
    with pytest.raises(ValueError):
        knn_predict(train, y, train, 2, **bad)


def test_retention_ratio_and_its_bounds():
    assert retention({"a": 80.0, "b": 50.0}, {"a": 80.0, "b": 50.0}) == {"a": 1.0, "b": 1.0, "mean": 1.0}
    assert retention({"a": 40.0, "b": 50.0}, {"a": 80.0, "b": 50.0}) == {"a": 0.5, "b": 1.0, "mean": 0.75}
    with pytest.raises(ValueError, match="scores 0 on a"):
        retention({"a": 0.0}, {"a": 0.0})
    with pytest.raises(ValueError, match="same probe tasks"):
        retention({"a": 1.0}, {"b": 1.0})


# -- features ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(m for m in METHODS.names() if m != "adapter_fusion"))
def test_features_are_what_the_head_reads(method):
    """For every method, the head applied to ``extract_features`` gives the model's own logits: the features carry
    the method's prompts, adapters and scales, and nothing after them."""
    model = make_vit()
    vpeft.apply_method(model, method)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in vpeft.trainable_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))  # a trained delta, not the identity it starts at
    x = tiny_input(model, batch=4)
    images = ((x - x.min()) / (x.max() - x.min()) * 255).round().to(torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    feats = extract_features(model, images, mean, std, torch.device("cpu"), batch_size=3)
    norm = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.get_classifier()(feats), model.eval()(norm), rtol=1e-5, atol=1e-5)


# -- the job ----------------------------------------------------------------------------------------------------


def color_task(root, seed: int, classes: int = 3):
    """A task folder whose classes are close colours under heavy pixel noise: a random backbone's features separate
    them well above chance but not perfectly, so a damaged representation shows in the k-NN score."""
    g = np.random.default_rng(seed)
    base = 128 + g.integers(-20, 20, (classes, 3))
    sizes = {"train800": 45, "val200": 15, "train800val200": 60, "test": 60}

    def images(n):
        out = []
        for i in range(n):
            c = i % classes
            arr = np.clip(base[c] + g.normal(0, 60, (20, 20, 3)), 0, 255).astype(np.uint8)
            out.append((Image.fromarray(arr, "RGB"), c))
        return out

    return write_noah(root, {s: images(n) for s, n in sizes.items()})


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retention")
    roots = {name: color_task(tmp / "tasks" / name, seed) for seed, name in enumerate(("own", "p1", "p2"))}
    for method in ("linear", "lora"):
        rec = run_inproc(tmp, *TINY, f"method={method}", "dataset=folder", f"dataset.root={roots['own']}")
        assert rec["status"] == "ok"
    return tmp, roots


def probe(tmp, roots, method, *extra):
    tasks = ",".join(f"folder:{roots[t]}" for t in ("own", "p1", "p2"))
    return run_inproc(
        tmp,
        *TINY,
        f"method={method}",
        "dataset=folder",
        f"dataset.root={roots['own']}",
        "job=retention",
        f"paths.retention={tmp / 'retention'}",
        f"probe.tasks=[{tasks}]",
        *extra,
    )


def test_linear_probing_keeps_everything_exactly(tasks):
    """A head-only run leaves the features untouched: retention is exactly 1 on every probe task, and the run's
    own task is never a probe."""
    tmp, roots = tasks
    rec = probe(tmp, roots, "linear")
    assert rec["status"] == "ok" and rec["probe"]["tasks"] == ["p1", "p2"]
    assert rec["probe"]["left_out"] == [f"folder:{roots['own']}"]
    for p in rec["per_task"].values():
        assert p["adapted_top1"] == p["bare_top1"] > 50 and p["retention"] == 1.0  # 3 classes: chance is 33%
    assert rec["metrics"]["mean_retention"] == 1.0
    assert rec["run"]["top1"] == json.loads(Path(rec["run"]["record"]).read_text())["metrics"]["top1"]
    [path] = list((tmp / "retention").rglob("own-final-*.json"))
    assert read_retention_record(path) == json.loads(path.read_text())


def test_bare_features_are_cached_and_a_corrupt_cache_is_recomputed(tasks, capsys):
    tmp, roots = tasks
    first = probe(tmp, roots, "linear", "skip_finished=false")
    assert first["cost"]["bare_cache_hits"] == 4  # two probe tasks x (train, test), computed by the test before
    files = sorted((tmp / "cache" / "features").glob("*.safetensors"))
    assert len(files) == 4
    tensors = load_file(str(files[0]))
    from safetensors import safe_open

    with safe_open(str(files[0]), "pt") as f:
        meta = f.metadata()
    save_file({**tensors, "features": tensors["features"] + 1}, str(files[0]), metadata=meta)  # same key, bad sum
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = probe(tmp, roots, "linear", "skip_finished=false")
    assert any("does not match its checksum" in str(w.message) for w in caught)
    assert again["cost"]["bare_cache_hits"] == 3 and again["per_task"] == first["per_task"]


def test_a_delta_drowned_in_noise_loses_what_the_backbone_knew(tasks, tmp_path):
    """LoRA trained one epoch keeps most; the same delta with large random noise added keeps visibly less."""
    tmp, roots = tasks
    trained = probe(tmp, roots, "lora")
    assert trained["status"] == "ok" and trained["metrics"]["mean_retention"] > 0.8
    delta = trained["run"]["delta_file"]
    from safetensors import safe_open

    with safe_open(delta, "pt") as f:
        meta = f.metadata()
    tensors = load_file(delta)
    g = torch.Generator().manual_seed(0)
    noisy = {k: v if k.startswith("head") else v + 10.0 * torch.randn(v.shape, generator=g) for k, v in tensors.items()}
    save_file(noisy, delta, metadata=meta)
    drowned = probe(tmp, roots, "lora", "skip_finished=false")
    assert drowned["metrics"]["mean_retention"] < trained["metrics"]["mean_retention"] - 0.2, drowned["per_task"]


def test_a_run_that_is_not_there_names_the_command_that_trains_it(tasks):
    """A real command line: exit 2, no record, and the command that trains the missing run (the same overrides
    less the job's own), which then makes the retention command work."""
    tmp, roots = tasks
    tasks_arg = ",".join(f"folder:{roots[t]}" for t in ("p1", "p2"))
    run_args = [*TINY, "method=ssf", "dataset=folder", f"dataset.root={roots['own']}",
                f"paths.results={tmp / 'runs'}", f"paths.cache={tmp / 'cache'}"]  # fmt: skip
    job = ["job=retention", f"paths.retention={tmp / 'retention'}", f"probe.tasks=[{tasks_arg}]"]
    cmd = [sys.executable, "run.py", *run_args, *job]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr
    assert not list((tmp / "retention").rglob("*ssf*"))
    hint = out.stderr.split("train it first: ", 1)[1].strip()
    assert shlex.split(hint) == ["python", "run.py", *run_args]
    train = subprocess.run([sys.executable, *shlex.split(hint)[1:]], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert train.returncode == 0, train.stderr
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "retention of ssf on own" in again.stdout, again.stderr


@pytest.mark.parametrize(
    "bad, says",
    [("probe.k=0", "probe.k must be a positive integer"), ("probe.temperature=-1", "probe.temperature"),
     ("probe.tasks=[]", "probe.tasks must be a list"), ("+probe.K=3", "probe")],
)  # fmt: skip
def test_bad_probe_settings_exit_2_before_anything_runs(tasks, bad, says, capsys):
    tmp, roots = tasks
    with pytest.raises(SystemExit) as e:
        probe(tmp, roots, "linear", bad)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_only_the_runs_own_task_as_probe_is_refused(tasks, capsys):
    tmp, roots = tasks
    with pytest.raises(SystemExit) as e:
        run_inproc(tmp, *TINY, "method=linear", "dataset=folder", f"dataset.root={roots['own']}", "job=retention",
                   f"probe.tasks=[folder:{roots['own']}]")  # fmt: skip
    assert e.value.code == 2 and "no task but the run's own" in capsys.readouterr().err
