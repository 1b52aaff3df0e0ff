"""vpeft.serve: mixed-task batches against each sample's own single-task model, swaps, errors, the benchmark.

The truth is always the project's single-task path (``apply_method`` + ``load_delta`` of the same file):
the serving model never reuses its modules, so agreement means the per-sample sites compute what each
method's layer computes.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import ARCHS, make_vit, tiny_input
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import vpeft
from vpeft.serve import (
    IncompatibleDeltaError,
    MultiDeltaModel,
    NotServableError,
    TaskDelta,
    UnknownTaskError,
    mergeable_servable_methods,
    servable_methods,
)

ROOT = Path(__file__).resolve().parents[1]
SERVABLE = servable_methods()
MERGEABLE = mergeable_servable_methods()
# three tasks per method, differing wherever the method allows it (ranks, alphas, targets, bottlenecks,
# prompt and prefix lengths, scales) so padding is exercised; tasks 0 and 2 share a shape
TASKS = {
    "lora": [{"r": 4}, {"r": 8, "alpha": 16.0, "targets": ["q", "k", "v", "fc1"]}, {"r": 2, "targets": ["v", "fc2"]}],
    "vpt_shallow": [{"num_tokens": 5}, {"num_tokens": 3}, {"num_tokens": 5}],
    "vpt_deep": [{"num_tokens": 4}, {"num_tokens": 7}, {"num_tokens": 4}],
    "prefix": [{"num_tokens": 3}, {"num_tokens": 6}, {"num_tokens": 3}],
    "adapter_houlsby": [{"bottleneck": 4}, {"bottleneck": 8}, {"bottleneck": 4}],
    "adapter_pfeiffer": [{"bottleneck": 6}, {"bottleneck": 3}, {"bottleneck": 6}],
    "adaptformer": [{"bottleneck": 8}, {"bottleneck": 16, "learnable_scale": True}, {"bottleneck": 8, "scale": 0.5}],
}
CLASSES = [5, 3, 7]  # the heads differ in width too
MIXED = [0, 1, 2, 1, 0, 2, 2]  # not grouped by task: the model regroups (segment) or gathers
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids spin-waiting (100x faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_servable_methods():
    assert "full" not in SERVABLE
    assert set(SERVABLE) <= set(vpeft.list_methods())
    assert {"lora", "ssf", "ia3", "bitfit", "vpt_shallow", "vpt_deep", "adapter_houlsby", "adapter_pfeiffer"} <= set(
        SERVABLE
    )
    assert set(MERGEABLE) == {"bitfit", "ia3", "linear", "lora", "ssf"}


def task_model(method: str, arch: str, task: int, config: dict | None = None) -> nn.Module:
    """A single-task model with a non-trivial delta: every trained tensor perturbed, its own head width."""
    model = make_vit(arch)
    model.reset_classifier(CLASSES[task])
    cfg = TASKS.get(method, [{}] * 3)[task] if config is None else config
    vpeft.apply_method(model, method, **cfg)
    g = torch.Generator().manual_seed(100 + task)
    with torch.no_grad():
        for p in vpeft.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def delta_files(method: str, arch: str, tmp_path: Path, tasks=(0, 1, 2)) -> list[Path]:
    return [vpeft.save_delta(task_model(method, arch, t), tmp_path / f"task{t}.safetensors") for t in tasks]


def reference(path: Path, arch: str, task: int, x: torch.Tensor) -> torch.Tensor:
    """The truth: a fresh backbone, ``load_delta`` of the same file, the whole batch."""
    model = make_vit(arch)
    model.reset_classifier(CLASSES[task])
    vpeft.load_delta(model, path)
    with torch.no_grad():
        return model.eval()(x)


def assert_rows_match(out: torch.Tensor, ids: list[int], refs: dict[int, torch.Tensor]) -> None:
    assert out.shape == (len(ids), max(CLASSES[t] for t in set(ids)))
    for i, t in enumerate(ids):
        c = CLASSES[t]
        torch.testing.assert_close(out[i, :c], refs[t][i], atol=ATOL, rtol=RTOL, msg=f"sample {i} (task {t})")
        assert torch.isneginf(out[i, c:]).all(), "columns beyond a task's classes are padding"


@pytest.mark.parametrize("strategy", ["gather", "segment"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", SERVABLE)
def test_mixed_batch_matches_single_task_models(method, arch, strategy, tmp_path):
    files = delta_files(method, arch, tmp_path)
    model = MultiDeltaModel.from_files(make_vit(arch), files, strategy=strategy)
    assert model.method == method and model.tasks == {"task0": 0, "task1": 1, "task2": 2}
    x = tiny_input(make_vit(arch), batch=len(MIXED))
    refs = {t: reference(files[t], arch, t, x) for t in range(3)}
    with torch.no_grad():
        assert_rows_match(model(x, MIXED), MIXED, refs)  # every task, padded shapes in play
        assert_rows_match(model(x, [0, 2, 0, 0, 2, 2, 0]), [0, 2, 0, 0, 2, 2, 0], refs)  # tasks of one shape
        grouped = sorted(MIXED)
        assert_rows_match(model(x, torch.tensor(grouped)), grouped, refs)  # already grouped: no regrouping
        for t in range(3):  # one task in the batch: the single-task path, by id and by name
            assert_rows_match(model(x, t), [t] * len(MIXED), refs)
            assert_rows_match(model(x, [f"task{t}"] * len(MIXED)), [t] * len(MIXED), refs)


@pytest.mark.parametrize("method", ["lora", "adapter_houlsby", "adaptformer"])
def test_strategies_agree_and_auto_picks_by_task_count(method, tmp_path):
    files = delta_files(method, "vit", tmp_path)
    x = tiny_input(make_vit(), batch=len(MIXED))
    outs = {}
    for strategy in ("gather", "segment"):
        model = MultiDeltaModel.from_files(make_vit(), files, strategy=strategy)
        with torch.no_grad():
            outs[strategy] = model(x, MIXED)
    torch.testing.assert_close(outs["gather"], outs["segment"], atol=ATOL, rtol=RTOL)
    model = MultiDeltaModel.from_files(make_vit(), files, segment_max_tasks=2)
    assert [model.strategy_for(t) for t in (1, 2, 3)] == ["single", "segment", "gather"]
    assert model._route(MIXED, len(MIXED), x.device)[0].strategy == "gather"
    assert model._route([0, 1, 0, 1, 1, 1, 0], len(MIXED), x.device)[0].strategy == "segment"
    assert model._route([1] * len(MIXED), len(MIXED), x.device)[0].strategy == "single"
    ssf = MultiDeltaModel.from_files(make_vit(), delta_files("ssf", "vit", tmp_path))
    assert ssf.strategy_for(2) == "gather", "vector methods have no per-task matmuls to segment"


@pytest.mark.parametrize("method", SERVABLE)
def test_unmerged_swaps_return_bitwise(method, tmp_path):
    """A -> B -> A through attach/detach: the same bits as the first A, whatever B's shapes were."""
    files = delta_files(method, "dinov2_reg", tmp_path)
    x = tiny_input(make_vit("dinov2_reg"), batch=4)
    model = MultiDeltaModel(make_vit("dinov2_reg"))
    with torch.no_grad():
        a = model.attach(files[0])
        first = model(x, a.task)
        model.detach(a.task)
        b = model.attach(files[1])  # other rank / tokens / bottleneck / classes: the banks reshape
        torch.testing.assert_close(model(x, b.task), reference(files[1], "dinov2_reg", 1, x), atol=ATOL, rtol=RTOL)
        model.detach(b.task)
        a = model.attach(files[0])
        assert torch.equal(model(x, a.task), first)
        c = model.attach(files[1])  # B resident beside A: the banks pad to B's shapes (same values, within rounding)
        torch.testing.assert_close(model(x, a.task), first, atol=ATOL, rtol=RTOL)
        model.detach(c.task)  # the banks shrink back to A's layout: the same bits again
        assert torch.equal(model(x, a.task), first)
    ops = [(e.op, e.name) for e in model.swap_log]
    assert ops[:3] == [("attach", "task0"), ("detach", "task0"), ("attach", "task1")]
    assert all(e.seconds > 0 for e in model.swap_log)


@pytest.mark.parametrize("arch", ["vit", "no_qkv_bias", "avgpool"])
@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_and_unmerge_in_place(method, arch, tmp_path):
    files = delta_files(method, arch, tmp_path)
    backbone = make_vit(arch)
    weights = {k: v.clone() for k, v in backbone.state_dict().items()}
    x = tiny_input(backbone, batch=3)
    model = MultiDeltaModel.from_files(backbone, files)
    with torch.no_grad():
        unmerged = {t: model(x, t) for t in range(3)}
        event = model.merge(1)
        assert event.op == "merge" and event.task == 1 and event.seconds > 0 and model.merged_task == 1
        torch.testing.assert_close(model(x, 1), unmerged[1], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(model(x, 1), reference(files[1], arch, 1, x), atol=ATOL, rtol=RTOL)
        if method not in ("linear",):
            assert any(not torch.equal(weights[k], v) for k, v in backbone.state_dict().items() if k in weights)
        with pytest.raises(vpeft.VpeftError, match="merged into the weights"):
            model(x, [0, 1, 1])
        model.merge(2)  # swaps: unmerges 1 first
        assert [e.op for e in list(model.swap_log)[-2:]] == ["unmerge", "merge"]
        torch.testing.assert_close(model(x, 2), unmerged[2], atol=ATOL, rtol=RTOL)
        model.unmerge()
        assert model.merged_task is None
        for t in range(3):  # back to the unmerged model, mixed batches too
            torch.testing.assert_close(model(x, t), unmerged[t], atol=ATOL, rtol=RTOL)
        state = backbone.state_dict()
        assert set(state) == set(weights), "a bias that merging created is gone again"
        for k, v in weights.items():
            torch.testing.assert_close(state[k], v, atol=1e-6, rtol=1e-5)
        model.merge(0)
        model.close()  # detaching a merged task unmerges it first
    assert model.merged_task is None and len(model) == 0
    for k, v in weights.items():
        torch.testing.assert_close(backbone.state_dict()[k], v, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["vit", "dinov2_reg"])
@pytest.mark.parametrize("method", SERVABLE)
def test_detaching_every_task_leaves_the_backbone_bare(method, arch, tmp_path):
    files = delta_files(method, arch, tmp_path)
    backbone = make_vit(arch)
    bare = make_vit(arch)
    modules = {n: type(m) for n, m in backbone.named_modules()}
    keys = list(backbone.state_dict())
    x = tiny_input(backbone)
    model = MultiDeltaModel.from_files(backbone, files)
    with torch.no_grad():
        model(x, [0, 1])
        for t in (1, 0, 2):
            model.detach(t)
        assert model.method is None and model.bank_bytes() == 0
        assert {n: type(m) for n, m in backbone.named_modules()} == modules
        assert list(backbone.state_dict()) == keys
        assert not any(m._forward_hooks for m in backbone.modules())
        assert torch.equal(backbone(x), bare(x))
        # the same backbone then serves another method
        other = "ssf" if method != "ssf" else "lora"
        model.attach(vpeft.save_delta(task_model(other, arch, 0), Path(files[0]).with_name("other.safetensors")))
        assert model.method == other


def test_bank_holds_no_more_than_the_deltas(tmp_path):
    """Deltas of one config take exactly their files' payload; the banks grow by half, or as reserved."""
    backbone = make_vit()
    deltas = [TaskDelta.from_model(task_model("lora", "vit", 0, {"r": 4}), f"t{i}") for i in range(6)]
    model = MultiDeltaModel.from_deltas(backbone, deltas)  # reserves exactly 6
    assert model.bank_bytes() == model.payload_bytes() == sum(d.nbytes for d in deltas)
    model.attach(TaskDelta.from_model(task_model("lora", "vit", 0, {"r": 4}), "t6"))
    assert model.bank_bytes() * 7 == model.payload_bytes() * 9  # full: capacity 6 -> 9
    for t in range(7):
        model.detach(t)
    assert model.bank_bytes() == 0


def test_logits_padding_split_and_mask(tmp_path):
    files = delta_files("ssf", "vit", tmp_path)
    model = MultiDeltaModel.from_files(make_vit(), files, pad_value=-1e4)
    x = tiny_input(make_vit(), batch=3)
    with torch.no_grad():
        out = model(x, ["task1", "task2", "task0"])
    assert out.shape == (3, 7)
    mask = model.class_mask(["task1", "task2", "task0"])
    assert mask.tolist() == [[True] * 3 + [False] * 4, [True] * 7, [True] * 5 + [False] * 2]
    assert (out[~mask] == -1e4).all()
    assert [r.shape[0] for r in model.split(out, [1, 2, 0])] == [3, 7, 5]
    assert model.num_classes("task2") == 7 and model.config(0) == {"init": "normal"}


@pytest.mark.parametrize("method", ["lora", "ssf", "vpt_deep", "adapter_pfeiffer"])
def test_bf16_autocast_on_cpu(method, tmp_path):
    """The dtype handling of every site under autocast (the GPU's bf16 path), against the single-task models."""
    files = delta_files(method, "dinov2_reg", tmp_path)
    x = tiny_input(make_vit("dinov2_reg"), batch=len(MIXED))
    refs = {}
    for t in range(3):
        model = make_vit("dinov2_reg")
        model.reset_classifier(CLASSES[t])
        vpeft.load_delta(model, files[t])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            refs[t] = model(x).float()
    for strategy in ("gather", "segment"):
        multi = MultiDeltaModel.from_files(make_vit("dinov2_reg"), files, strategy=strategy)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = multi(x, MIXED)
        assert out.dtype == torch.bfloat16
        for i, t in enumerate(MIXED):
            torch.testing.assert_close(out[i, : CLASSES[t]].float(), refs[t][i], atol=0.1, rtol=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "ssf", "ia3", "bitfit", "vpt_deep", "adapter_pfeiffer", "adaptformer"])
def test_bf16_on_cuda_matches_single_task_models(method, tmp_path):
    files = delta_files(method, "dinov2_reg", tmp_path)
    x = tiny_input(make_vit("dinov2_reg"), batch=len(MIXED)).cuda()
    refs = {}
    for t in range(3):
        model = make_vit("dinov2_reg")
        model.reset_classifier(CLASSES[t])
        vpeft.load_delta(model, files[t])
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            refs[t] = model.cuda()(x).float()
    for strategy in ("gather", "segment"):
        multi = MultiDeltaModel.from_files(make_vit("dinov2_reg").cuda(), files, strategy=strategy)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = multi(x, MIXED)
        assert out.dtype == torch.bfloat16 and out.device.type == "cuda"
        for i, t in enumerate(MIXED):
            torch.testing.assert_close(out[i, : CLASSES[t]].float(), refs[t][i], atol=0.05, rtol=0.05)
        if method in MERGEABLE:
            multi.merge(0)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                merged = multi(x, 0).float()
            torch.testing.assert_close(merged, refs[0], atol=0.05, rtol=0.05)


# -- bad input: named errors ---------------------------------------------------------------------------


def test_refuses_full_and_names_what_works(tmp_path):
    path = vpeft.save_delta(vpeft.apply_method(make_vit(), "full"), tmp_path / "full.safetensors")
    with pytest.raises(NotServableError, match=r"full delta.*every weight.*servable methods: adapter_houlsby"):
        MultiDeltaModel.from_files(make_vit(), [path])


def test_refuses_deltas_of_different_methods(tmp_path):
    a = vpeft.save_delta(task_model("lora", "vit", 0), tmp_path / "a.safetensors")
    b = vpeft.save_delta(task_model("ssf", "vit", 1), tmp_path / "b.safetensors")
    backbone = make_vit()
    with pytest.raises(IncompatibleDeltaError, match=r"b.safetensors holds a ssf delta, the resident deltas are lora"):
        MultiDeltaModel.from_files(backbone, [a, b])
    assert not any(m._forward_hooks for m in backbone.modules()), "a refused from_files leaves the backbone bare"


def test_refuses_deltas_of_other_backbones(tmp_path):
    def tiny(name):
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)

    vit = vpeft.save_delta(vpeft.apply_method(tiny("vit_tiny_patch16_224"), "lora"), tmp_path / "vit.safetensors")
    deit = vpeft.save_delta(vpeft.apply_method(tiny("deit_tiny_patch16_224"), "lora"), tmp_path / "deit.safetensors")
    with pytest.raises(IncompatibleDeltaError, match=r"deit.safetensors was trained on deit_tiny_patch16_224"):
        MultiDeltaModel.from_files(tiny("vit_tiny_patch16_224"), [vit, deit])
    wide = vpeft.save_delta(vpeft.apply_method(make_vit(), "ssf"), tmp_path / "wide.safetensors")
    narrow = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=3)  # unnamed: shapes decide
    with pytest.raises(IncompatibleDeltaError, match=r"does not fit the resident backbone.*\(24,\)"):
        MultiDeltaModel(narrow).attach(wide)
    with pytest.raises(IncompatibleDeltaError, match=r"trained on vit_tiny_patch16_224, the resident backbone is deit"):
        MultiDeltaModel(tiny("deit_tiny_patch16_224")).attach(vit)


def test_refuses_unknown_tasks_and_bad_ids(tmp_path):
    model = MultiDeltaModel.from_files(make_vit(), delta_files("ia3", "vit", tmp_path))
    x = tiny_input(make_vit(), batch=2)
    for bad in ([0, 3], [0, -1], ["task0", "nope"], 7):
        with pytest.raises(UnknownTaskError, match="resident tasks"):
            model(x, bad)
    model.detach("task1")
    with pytest.raises(UnknownTaskError, match=r"unknown task 1; resident tasks \(id: name\): 0: task0, 2: task2"):
        model(x, [0, 1])
    with pytest.raises(KeyError):  # UnknownTaskError is a KeyError too
        model.merge("task1")
    with pytest.raises(vpeft.ConfigError, match="3 entries for a batch of 2"):
        model(x, [0, 0, 2])
    with pytest.raises(vpeft.ConfigError, match="integer ids"):
        model(x, torch.tensor([0.0, 2.0]))
    with pytest.raises(vpeft.ConfigError, match="resident already"):
        model.attach(tmp_path / "task0.safetensors")
    model.attach(tmp_path / "task0.safetensors", name="again")
    assert model.tasks == {"task0": 0, "again": 1, "task2": 2}  # the free id is reused


def test_refuses_missing_and_broken_files(tmp_path):
    model = MultiDeltaModel(make_vit())
    with pytest.raises(vpeft.DataError, match="no delta file at .*missing.safetensors") as e:
        model.attach(tmp_path / "missing.safetensors")
    assert isinstance(e.value, FileNotFoundError)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(vpeft.DataError, match="broken.safetensors"):
        MultiDeltaModel.from_files(make_vit(), [broken])
    with pytest.raises(vpeft.VpeftError, match="no task is resident"):
        model(tiny_input(make_vit()), 0)


def test_refuses_incompatible_configs_and_backbones(tmp_path):
    gelu = vpeft.save_delta(task_model("adapter_pfeiffer", "vit", 0), tmp_path / "gelu.safetensors")
    relu = task_model("adapter_pfeiffer", "vit", 1, {"act": "relu"})
    relu = vpeft.save_delta(relu, tmp_path / "relu.safetensors")
    with pytest.raises(IncompatibleDeltaError, match="act='relu'"):
        MultiDeltaModel.from_files(make_vit(), [gelu, relu])
    with pytest.raises(vpeft.ConfigError, match="bare backbone"):
        MultiDeltaModel(vpeft.apply_method(make_vit(), "lora"))
    backbone, files = make_vit(), delta_files("vpt_deep", "vit", tmp_path)
    first = MultiDeltaModel.from_files(backbone, files[:1])
    with pytest.raises(vpeft.ConfigError, match="serves in another MultiDeltaModel"):
        MultiDeltaModel(backbone)
    first.close()
    MultiDeltaModel.from_files(backbone, files[1:])  # a closed model's backbone is free again
    with pytest.raises(vpeft.NotMergeableError, match="servable methods that merge: bitfit, ia3, linear, lora, ssf"):
        MultiDeltaModel.from_files(make_vit(), files).merge(0)


def test_backbone_is_not_callable_alone_while_serving(tmp_path):
    backbone = make_vit()
    MultiDeltaModel.from_files(backbone, delta_files("lora", "vit", tmp_path))
    with pytest.raises(vpeft.VpeftError, match="call the MultiDeltaModel"):
        backbone(tiny_input(backbone))


# -- the benchmark -------------------------------------------------------------------------------------


def test_bench_serve_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_serve.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "serve_cpu_quick.json").read_text())
    assert (tmp_path / "serve_cpu_quick.md").is_file()
    rows = result["sections"]["mixed"]
    methods = {r["method"] for r in rows}
    assert methods == set(result["args"]["methods"])
    variants = {r["variant"] for r in rows}
    assert {
        "bare",
        "single unmerged",
        "single merged",
        "mixed gather",
        "mixed segment",
        "sorted sub-batches",
    } <= variants
    assert all(r["images_per_s"] > 0 and r["p90_ms"] >= r["p50_ms"] > 0 for r in rows)
    swaps = result["sections"]["swap"]
    assert {s["op"] for s in swaps["rows"]} >= {"attach (file)", "merge", "unmerge", "detach"}
    memory = result["sections"]["memory"]["rows"]
    assert [m["deltas"] for m in memory] == result["args"]["resident"]
    assert all(m["bank_bytes"] <= m["payload_bytes"] for m in memory)
    assert result["targets"] and "progress" not in proc.stderr
    assert "[mixed]" in proc.stdout


@pytest.mark.parametrize("strategy", ["gather", "segment"])
def test_lora_on_the_fused_qkv_serves_beside_lora_on_its_thirds(strategy, tmp_path):
    configs = [
        {"r": 4, "targets": ["qkv"]},  # one shared A over the fused layer (NOAH's, peft's LoRA)
        {"r": 8, "alpha": 16.0, "targets": ["q", "k", "v", "fc1"]},  # the thirds, each its own A
        {"r": 2, "alpha": 4.0, "targets": ["qkv", "proj"]},
    ]
    files = [
        vpeft.save_delta(task_model("lora", "vit", t, c), tmp_path / f"task{t}.safetensors")
        for t, c in enumerate(configs)
    ]
    model = MultiDeltaModel.from_files(make_vit("vit"), files, strategy=strategy)
    x = tiny_input(make_vit("vit"), batch=len(MIXED))
    refs = {t: reference(files[t], "vit", t, x) for t in range(3)}
    with torch.no_grad():
        assert_rows_match(model(x, MIXED), MIXED, refs)
        unmerged = model(x, 2)
        model.merge(2)  # folds B A of the shared-A update into all of attn.qkv's rows
        torch.testing.assert_close(model(x, 2), unmerged, atol=ATOL, rtol=RTOL)
        model.unmerge()
        assert_rows_match(model(x, MIXED), MIXED, refs)
