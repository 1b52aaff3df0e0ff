"""The fast path computes what the usual one does: same pixels, same training, same outputs compiled.

Speed itself is measured by scripts/bench_train.py on a GPU, not here; these tests check that the
pieces it times are correct, and that the script runs end to end (on a CPU, in its --quick mode).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_vit, tiny_input
from data_helpers import REAL_CIFAR10, write_noah
from PIL import Image

import vpeft
from vpeft.bench import count_flops
from vpeft.bench.speed import bf16_peak_tflops, sequence_length, train_step_flops
from vpeft.bench.usual import EngineOrder, ImageFiles, usual_run
from vpeft.data import load_task
from vpeft.engine.loop import Normalizer, TrainConfig, train
from vpeft.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
needs_cifar10 = pytest.mark.usefixtures("real_cifar10")


def real_subset(root: Path, n_train: int, n_test: int, odd_modes: bool = True) -> Path:
    """A task folder of real CIFAR-10 JPEGs from the shared VTAB-1k task; a few turned grayscale / palette."""

    def take(split: str, n: int):
        out = []
        for i, line in enumerate((REAL_CIFAR10 / f"{split}.txt").read_text().split("\n")[:n]):
            rel, label = line.rsplit(maxsplit=1)
            img = Image.open(REAL_CIFAR10 / rel).convert("RGB")
            if odd_modes and i % 7 == 3:
                img = img.convert("L")
            elif odd_modes and i % 7 == 5:
                img = img.convert("P", palette=Image.Palette.ADAPTIVE)
            out.append((img, int(label)))
        return out

    splits = {"train800val200": take("train800val200", n_train), "test": take("test", n_test)}
    return write_noah(root, splits, classes=[f"c{k}" for k in range(10)], ext="png")


@needs_cifar10
def test_cached_plain_and_usual_paths_give_the_same_pixels(tmp_path):
    root = real_subset(tmp_path / "task", 21, 14)
    size = (40, 24)  # not square, not the source size: every path must resize the same way
    plain = load_task("folder", "final", size, root=root)
    first = load_task("folder", "final", size, root=root, cache_dir=tmp_path / "cache")
    cached = load_task("folder", "final", size, root=root, cache_dir=tmp_path / "cache")
    assert (first.cache_hit, cached.cache_hit) == (False, True)
    for task in (first, cached):
        for split in ("train", "eval"):
            assert torch.equal(getattr(task, split).images, getattr(plain, split).images)
            assert torch.equal(getattr(task, split).labels, getattr(plain, split).labels)

    usual = ImageFiles(root, "test", size, MEAN, STD)
    pil = np.stack([np.asarray(usual.pil(i)) for i in range(len(usual))])  # [N, H, W, 3]
    assert pil.shape == (14, 40, 24, 3)
    assert torch.equal(torch.from_numpy(pil).permute(0, 3, 1, 2), plain.eval.images)
    normalized = torch.stack([usual[i][0] for i in range(len(usual))])
    ours = Normalizer(MEAN, STD, torch.device("cpu"))(plain.eval.images)
    torch.testing.assert_close(ours, normalized, atol=1e-6, rtol=0)
    assert [usual[i][1] for i in range(len(usual))] == plain.eval.labels.tolist()


def test_engine_order_is_the_engine_permutation():
    order = EngineOrder(10, seed=3)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):  # one permutation per epoch from the same generator, as the engine draws them
        assert list(order) == torch.randperm(10, generator=g).tolist()


@needs_cifar10
def test_usual_recipe_trains_the_same_model_as_the_engine(tmp_path):
    """Same data, init, order, optimizer and schedule: the two loops end at the same delta (fp32, CPU)."""
    root = real_subset(tmp_path / "task", 40, 24, odd_modes=False)
    size = (32, 32)
    task = load_task("folder", "final", size, root=root)

    def model():
        m = vpeft.apply_method(make_vit(), "lora", r=4)
        m.reset_classifier(10)
        torch.manual_seed(5)
        torch.nn.init.normal_(m.head.weight, std=0.02)
        return m

    ours, theirs = model(), model()
    lr, epochs = 1e-3, 3
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    cfg = TrainConfig(epochs=epochs, batch_size=16, warmup_epochs=1, progress=False)
    res = train(
        ours, task.train.images, task.train.labels, task.eval.images, task.eval.labels, opt, cfg, MEAN, STD,
        torch.device("cpu"), seed=7,
    )  # fmt: skip
    usual = usual_run(
        theirs, root, size, MEAN, STD, torch.device("cpu"), epochs=epochs, batch_size=16, lr=lr,
        warmup_epochs=1, num_workers=0, seed=7,
    )  # fmt: skip
    a, b = vpeft.delta_state_dict(ours), vpeft.delta_state_dict(theirs)
    assert a.keys() == b.keys()
    moved = max((a[k] - model().state_dict()[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # training changed the delta, so agreeing below is not agreeing at init
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
    assert usual.top1 == pytest.approx(res.top1, abs=100 / 24 + 1e-9)  # at most one test image apart
    assert (usual.epochs_run, usual.batch_size, usual.dtype) == (epochs, 16, "fp32")


def test_usual_recipe_extrapolates_a_cut_short_run(tmp_path):
    samples = [(Image.new("RGB", (9, 7), (k * 20, 0, 0)), k % 2) for k in range(8)]
    root = write_noah(tmp_path / "task", {"train800val200": samples, "test": samples[:4]})
    m = vpeft.apply_method(make_vit(), "linear")
    m.reset_classifier(2)
    cpu = torch.device("cpu")
    r = usual_run(m, root, (32, 32), MEAN, STD, cpu, epochs=10, run_epochs=2, batch_size=4, num_workers=0)
    assert (r.epochs_run, r.epochs) == (2, 10)
    assert r.train_seconds_full == pytest.approx(5 * r.train_seconds)
    assert r.train_images_per_s == pytest.approx(2 * 8 / r.train_seconds)


def bench_train_script():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--method", "lora2"], "unknown method 'lora2'; valid methods: {every registered method}"),
        (["--methods", "lora", "vpt"], "unknown method 'vpt'; valid methods:"),
        (["--backbone", "vit_b16"], "unknown backbone config 'vit_b16'; valid (conf/backbone/): dinov2_s14_offline"),
        (["--data", "/nonexistent/task"], "--data /nonexistent/task lacks train800val200.txt, test.txt"),
    ],
)
def test_bench_train_rejects_bad_input_before_measuring(argv, message, capsys, tmp_path):
    script = bench_train_script()
    with pytest.raises(SystemExit) as exit_info:
        script.main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message.replace("{every registered method}", ", ".join(vpeft.list_methods())) in err
    if "--data" in argv:
        assert "train800val200.txt" in err and "images/" in err  # the expected layout is drawn
    assert not (tmp_path / "out").exists()


def test_bench_train_data_check_only_when_a_section_reads_data(tmp_path):
    args = bench_train_script().parse_args(["--sections", "step", "--data", str(tmp_path / "none")])
    assert args.sections == ["step"]


def test_usual_recipe_names_a_corrupt_image(tmp_path):
    samples = [(Image.new("RGB", (9, 7), (k * 20, 0, 0)), k % 2) for k in range(3)]
    root = write_noah(tmp_path / "task", {"train800val200": samples, "test": samples})
    bad = root / "images" / "test" / "000001.png"
    bad.write_bytes(b"not an image")
    files = ImageFiles(root, "test", (8, 8), MEAN, STD)
    files[0]
    with pytest.raises(DataError, match=r"cannot read image .*000001\.png \(.*test\.txt line 2\)"):
        files[1]


@pytest.mark.parametrize("arch", ["vit", "dinov2_reg"])
def test_train_step_flops_closed_form(arch):
    """Full fine-tuning: 3x the forward (input and weight gradients), except the patch embedding,
    whose input needs no gradient (2x). A frozen backbone back-propagating to its input: 2x the
    matmuls (input gradients only), but still 3x attention (dQ, dK, dV: twice its forward)."""
    model = make_vit(arch)
    size = (3, *model.patch_embed.img_size)
    fwd, by_op = count_flops(model, size)
    conv = sum(n for op, n in by_op.items() if "convolution" in op)
    attention = sum(n for op, n in by_op.items() if "scaled_dot_product" in op)
    assert conv > 0 and attention > 0
    assert train_step_flops(model, size) == 3 * fwd - conv
    for p in model.parameters():
        p.requires_grad_(False)
    assert train_step_flops(model, size) == 2 * fwd + attention
    assert all(p.grad is None for p in model.parameters())


def test_sequence_length_counts_prefix_tokens_and_prompts():
    model = make_vit("dinov2_reg")  # 16 px / patch 4 -> 16 patches, class token + 4 registers
    assert sequence_length(model) == 16 + 5
    vpeft.apply_method(model, "vpt_deep", num_tokens=7)
    assert sequence_length(model) == 16 + 5 + 7


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.1),
        ("NVIDIA L4", 121.0),
        ("AMD EPYC 7763 64-Core Processor", None),
    ],
)
def test_bf16_peak_by_gpu_name(name, peak):
    assert bf16_peak_tflops(name) == peak


@pytest.mark.slow
def test_compiled_training_trains_what_eager_does():
    """trainer.compile compiles one step shape: a last partial batch is padded (its repeats left out of the loss),
    so it never recompiles; evaluation runs eagerly."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g)  # batches of 4, 4, 2
    labels = torch.arange(10) % 5
    results = []
    for compiled in (False, True):
        model = vpeft.apply_method(make_vit(), "lora")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        cfg = TrainConfig(epochs=2, batch_size=4, warmup_epochs=0, compile=compiled, progress=False)
        res = train(model, images, labels, images, labels, opt, cfg, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"))
        results.append((res, vpeft.delta_state_dict(model)))
    (eager, d_eager), (compiled, d_compiled) = results
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph: the batch of 2 is padded to 4
    assert compiled.top1 == eager.top1
    for n in d_eager:
        torch.testing.assert_close(d_compiled[n], d_eager[n], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "vpt_deep", "ssf"])
def test_compiled_equals_eager(method):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = vpeft.apply_method(make_vit(), method)
    model.train()
    x = tiny_input(model, batch=4)
    y = torch.tensor([0, 1, 2, 3])
    grads = []
    for forward in (model, torch.compile(model)):
        out = forward(x)
        F.cross_entropy(out, y).backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad(set_to_none=True)
    (eager, g_eager), (compiled, g_compiled) = grads
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
    assert g_eager.keys() == g_compiled.keys()
    for n in g_eager:
        torch.testing.assert_close(g_compiled[n], g_eager[n], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@needs_cifar10
def test_bench_train_quick_runs_every_section(tmp_path):
    root = real_subset(tmp_path / "task", 32, 24)
    cmd = [
        sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--quick", "--methods", "lora", "vpt_deep",
        "--data", str(root), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"),
        "--pack-protocol", "final",  # the subset has the final splits only
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "train_cpu_quick.json").read_text())
    s = result["sections"]
    assert set(s) == {"step", "final", "usual", "peft", "scaling", "latency", "profile", "sweep", "pack"}
    assert not [k for k, v in s.items() if isinstance(v, dict) and "error" in v]
    assert [r["method"] for r in s["step"]] == ["(frozen backbone)", "lora", "vpt_deep"]
    vpt = s["step"][2]
    assert vpt["tokens"] == s["step"][1]["tokens"] + 10 and vpt["train_gflops_per_image"] > 0
    assert s["final"]["runs"][0]["cache_hit"] and s["final"]["runs"][0]["n_eval"] == 24
    assert s["usual"]["runs"][0]["epochs_run"] == 1
    assert [r["num_tokens"] for r in s["scaling"]["prompts"]] == [4, 16]
    assert s["sweep"]["ok"] == s["sweep"]["runs"] == 2
    [pack] = s["pack"]["rows"]  # --quick: 2 runs alone, then packed
    assert pack["k"] == 2 and pack["failed"] == 0 and len(pack["top1_gaps"]) == 2 and pack["ratio"] > 0
    assert [(r["method"], r["batch"]) for r in s["latency"]["rows"]] == [
        (m, b) for m in ("lora", "vpt_deep") for b in (1, 4)
    ]
    assert s["latency"]["rows"][0]["merged_x"] is not None and s["latency"]["rows"][2]["merged_x"] is None
    assert set(s["profile"]) == {"lora", "vpt_deep"}
    assert set(result["speedup_per_run"]) == {"fp32"}
    if "skipped" not in s["peft"]:
        assert s["peft"]["ours_over_peft"] > 0
    md = (tmp_path / "out" / "train_cpu_quick.md").read_text()
    titles = ("Training step", "One VTAB-1k final run", "VPT-deep against its prompt length", "Inference latency")
    for title in (*titles, "Sweep throughput", "Packed runs against the same runs one after another"):
        assert title in md


@pytest.mark.gpu
@pytest.mark.slow
@needs_cifar10
def test_bench_train_on_cuda(tmp_path):
    """On a GPU: bf16 steps eager and compiled, the peak share where the GPU is known, every section."""
    root = real_subset(tmp_path / "task", 64, 64)
    cmd = [
        sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--step-backbones", "vit_tiny_patch16_224",
        "--methods", "lora", "--batch", "64", "--steps", "3", "--warmup", "2", "--backbone", "vit_tiny_random",
        "--random-init", "--epochs", "2", "--usual-workers", "2", "--batches", "32", "--prompts", "10",
        "--sweep-runs", "2", "--jobs-per-gpu", "2", "--data", str(root), "--out", str(tmp_path / "out"),
        "--cache", str(tmp_path / "cache"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result_file,) = (tmp_path / "out").glob("train_*.json")
    result = json.loads(result_file.read_text())
    steps = result["sections"]["step"]
    assert {r["compiled"] for r in steps} == {False, True} and {r["dtype"] for r in steps} == {"bf16"}
    if result["bf16_peak_tflops"]:
        assert all(0 < r["peak_share"] < 1 for r in steps)
    assert {r["amp"] for r in result["sections"]["final"]["runs"]} == {"bf16"}
    assert set(result["speedup_per_run"]) == {"fp32", "bf16"}
    assert result["sections"]["sweep"]["ok"] == 2


@pytest.mark.parametrize("method", ["lora", "ssf", "bitfit", "adapter_houlsby", "vpt_deep", "dora"])
def test_frozen_weights_held_in_bf16_train_bit_for_bit_what_autocast_does(method, monkeypatch):
    """Under bf16 autocast (here the CPU's) the frozen weights are held in bf16 while training: the same losses,
    delta and evaluation, bit for bit, as autocast casting them every step; after it, the float32 weights as
    they were. DoRA reads its host's weight itself and keeps float32."""
    import contextlib

    from vpeft.engine import loop

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(20) % 5
    cfg = TrainConfig(epochs=2, batch_size=8, warmup_epochs=0, amp="bf16", progress=False)
    outcomes = []
    for hold in (True, False):
        if not hold:
            monkeypatch.setattr(loop, "frozen_in", lambda model, dtype: contextlib.nullcontext())
        model = vpeft.apply_method(make_vit(), method)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        seen: list[torch.dtype] = []
        fc1 = model.blocks[0].mlp.fc1

        def note(epoch, fc1=fc1, seen=seen) -> None:
            seen.append(fc1.weight.dtype)

        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        res = loop.train(model, images, labels, images, labels, opt, cfg, (0.5,) * 3, (0.5,) * 3,
                         torch.device("cpu"), on_epoch_end=note)  # fmt: skip
        for n, p in model.named_parameters():
            if n in before:
                assert p.dtype == torch.float32 and torch.equal(p, before[n]), n
        outcomes.append(([e.train_loss for e in res.epochs], res.top1, res.eval_loss, vpeft.delta_state_dict(model)))
        if hold:
            assert set(seen) == {torch.float32 if method == "dora" else torch.bfloat16}
    (held, plain) = outcomes
    assert held[:3] == plain[:3]
    for n in held[3]:
        assert torch.equal(held[3][n], plain[3][n]), n
