"""vpeft.bench against independent truth: closed-form FLOPs, files on disk, forward-call counts."""

import copy
import dataclasses
import json

import pytest
import timm
import torch
from conftest import make_vit
from timm.models.vision_transformer import VisionTransformer

import vpeft
from vpeft.bench import (
    BenchConfig,
    BenchRecordError,
    bench_record,
    bench_record_path,
    benchmark,
    cost_summary,
    measure_flops,
    measure_latency,
    measure_params,
    measure_training,
    read_bench_record,
    to_record_cost,
    validate_bench_record,
    write_bench_record,
)
from vpeft.bench.training import _own_peak_mb, measure_training_isolated
from vpeft.env import environment
from vpeft.errors import ConfigError, UnknownNameError


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP threads of two busy processes spin
    against each other and a 3 ms forward takes 300 ms, which makes CPU timings meaningless."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def vit_b_meta(**kwargs) -> VisionTransformer:
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)


def vit_flops(tokens: int, d=768, depth=12, mlp=3072, patches=196, patch_dim=3 * 16 * 16, classes=1000) -> int:
    """FLOPs (2 per multiply-add) of a ViT forward with ``tokens`` tokens through the blocks.

    Per block and token: qkv (3 d^2), proj (d^2), fc1 and fc2 (2 d mlp); per block: Q K^T and A V
    (T^2 d each). Plus the patch embedding (a d x 3p^2 matrix per patch) and the head on one token.
    """
    block_macs = tokens * (3 * d * d + d * d + 2 * d * mlp) + 2 * tokens * tokens * d
    macs = depth * block_macs + patches * patch_dim * d + classes * d
    return 2 * macs


# -- FLOPs -----------------------------------------------------------------------------------------


def test_vit_b16_flops_on_meta_device():
    report = measure_flops(vit_b_meta(), (3, 224, 224))
    assert report.macs == pytest.approx(17.6e9, rel=0.01)  # timm's published 17.6 GMACs
    assert report.flops == vit_flops(197)  # exactly the closed form
    assert report.macs == report.flops // 2
    assert report.baseline_flops is None and report.ratio is None


@pytest.mark.parametrize("n", [1, 10, 50])
def test_vpt_flops_grow_with_prompt_tokens(n):
    bare = vit_b_meta()
    shallow = vpeft.apply_method(vit_b_meta(), "vpt_shallow", num_tokens=n)
    deep = vpeft.apply_method(vit_b_meta(), "vpt_deep", num_tokens=n)
    s = measure_flops(shallow, (3, 224, 224), baseline=bare)
    d = measure_flops(deep, (3, 224, 224))
    assert s.flops == vit_flops(197 + n)
    assert d.flops == s.flops  # deep replaces prompts per block: same token count, same FLOPs
    assert s.baseline_flops == vit_flops(197)
    assert s.ratio == pytest.approx(vit_flops(197 + n) / vit_flops(197))


def test_flops_of_a_real_model_match_meta():
    real = make_vit()
    with torch.device("meta"):
        meta = copy.deepcopy(real).to("meta")
    assert measure_flops(real).flops == measure_flops(meta).flops > 0


def test_lora_flops_count_the_branch():
    bare = make_vit()
    model = vpeft.apply_method(make_vit(), "lora", r=4, targets=["q", "v"])
    report = measure_flops(model, baseline=bare)
    tokens, d, depth, r = 17, 48, 3, 4  # 32 px / patch 8 -> 16 patches + class token
    # vpeft's LoRA on the fused qkv runs the stacked A (2r x d) of q and v, then one block-diagonal
    # B (3d x 2r, zero rows for k) over the whole qkv output
    lora_macs = depth * tokens * (2 * r * d + 3 * d * 2 * r)
    assert report.flops - report.baseline_flops == 2 * lora_macs


# -- parameters ------------------------------------------------------------------------------------


def test_params_and_delta_size(tmp_path):
    model = vpeft.apply_method(make_vit(), "lora", r=4)
    report = measure_params(model)
    count = vpeft.count_parameters(model)
    assert (report.trainable, report.trainable_excl_head, report.total) == (
        count.trainable,
        count.trainable_excl_head,
        count.total,
    )
    written = vpeft.save_delta(model, tmp_path / "d.safetensors")
    assert report.delta_bytes == written.stat().st_size
    assert report.delta_bytes > 4 * report.trainable  # fp32 values plus a header
    assert measure_params(make_vit()).delta_bytes is None  # no method: nothing to save
    assert set(report.to_dict()) == {"trainable", "trainable_excl_head", "total", "delta_bytes"}


# -- latency ---------------------------------------------------------------------------------------


def count_calls(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_latency_honours_iteration_counts():
    model = vpeft.apply_method(make_vit(), "lora", r=4)
    merged = vpeft.merge(copy.deepcopy(model))
    bare = make_vit()
    counters = {name: count_calls(m) for name, m in (("unmerged", model), ("merged", merged), ("bare", bare))}
    report = measure_latency(
        model, batches=(1, 4), dtypes=("fp32",), warmup=2, iters=5, device="cpu", baseline=bare, merged=merged
    )
    for name, calls in counters.items():
        assert calls[0] == 2 * (2 + 5), name  # two batch sizes, warm-up + timed calls each
    assert len(report.results) == 3 * 2
    for s in report.results:
        assert s.n == 5
        assert 0 < s.min_ms <= s.median_ms <= s.p90_ms
    assert {(o.variant, o.batch) for o in report.overhead} == {(v, b) for v in ("unmerged", "merged") for b in (1, 4)}
    assert report.headline_variant == "merged"
    assert report.headline() == report.ratio("merged", "fp32", 1)
    assert (report.warmup, report.iters, report.device, report.timer) == (2, 5, "cpu", "perf_counter")
    assert report.torch == torch.__version__ and report.timm == timm.__version__
    assert report.device_name


def test_bigger_batches_take_longer_per_call():
    model = make_vit()
    report = measure_latency(model, batches=(1, 64), warmup=1, iters=5, device="cpu", merged=False)
    assert report.stat("unmerged", "fp32", 64).median_ms > report.stat("unmerged", "fp32", 1).median_ms
    assert report.overhead == ()  # no baseline: no ratios
    assert report.headline() is None


def test_merged_lora_is_not_slower_than_unmerged():
    """A LoRA branch on every linear layer with a rank that matters; merged must cost no more (20% noise)."""
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=4, num_classes=10)
    model = vpeft.apply_method(VisionTransformer(**kwargs), "lora", r=32, targets=["q", "k", "v", "proj", "fc1", "fc2"])
    report = measure_latency(
        model, batches=(1,), warmup=5, iters=40, device="cpu", baseline=VisionTransformer(**kwargs)
    )
    merged = report.stat("merged", "fp32", 1).median_ms
    unmerged = report.stat("unmerged", "fp32", 1).median_ms
    assert merged <= 1.2 * unmerged, (merged, unmerged)
    assert report.ratio("merged", "fp32", 1) <= 1.2 * report.ratio("unmerged", "fp32", 1)


def test_non_mergeable_method_headlines_unmerged_and_model_is_left_alone():
    model = vpeft.apply_method(make_vit(), "vpt_deep", num_tokens=3).train()
    x = torch.randn(2, 3, 32, 32)
    before = model.eval()(x)
    model.train()
    report = measure_latency(model, batches=(1,), warmup=0, iters=2, device="cpu", baseline=make_vit())
    assert {s.variant for s in report.results} == {"bare", "unmerged"}
    assert report.headline_variant == "unmerged" and not report.mergeable
    assert model.training  # mode restored
    assert vpeft.applied_method(model) is not None  # never merged in place
    torch.testing.assert_close(model.eval()(x), before)


def test_bf16_on_cpu_only_when_asked():
    model = make_vit()
    assert measure_latency(model, batches=(1,), warmup=0, iters=1, device="cpu").dtypes == ("fp32",)
    report = measure_latency(model, batches=(1,), dtypes=("bf16",), warmup=0, iters=2, device="cpu")
    assert report.dtypes == ("bf16",) and report.stat("unmerged", "bf16", 1).median_ms > 0


def test_latency_bad_input():
    with pytest.raises(ConfigError, match="meta device"):
        measure_latency(vit_b_meta(), batches=(1,), iters=1)
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        measure_latency(make_vit(), dtypes=("fp8",), iters=1)
    with pytest.raises(ConfigError, match="iters must be an integer >= 1"):
        measure_latency(make_vit(), iters=0)


# -- training --------------------------------------------------------------------------------------


def test_training_measurement_leaves_the_model_unchanged():
    model = vpeft.apply_method(make_vit(), "lora", r=4)
    with torch.no_grad():  # a non-zero B, so a step would change outputs
        for p in vpeft.trainable_parameters(model).values():
            p.add_(0.01)
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = measure_training(model, batch_size=4, steps=2, warmup=1, device="cpu")
    assert report.images_per_s > 0 and report.seconds > 0
    assert report.peak_mem_kind == "cpu_peak_rss" and report.peak_mem_mb > 0
    assert (report.steps, report.warmup, report.batch_size, report.dtype) == (2, 1, 4, "fp32")
    assert report.trainable == vpeft.count_parameters(model).trainable
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_per_method_memory_is_measured_in_a_process_of_its_own():
    """Full fine-tuning keeps a gradient and two AdamW moments for every weight, linear probing for the head
    only: each measured in a fresh process, full's peak exceeds linear's by more than two copies of the weights
    (in one process the later method would report the earlier one's peak). The benchmark does so on a CPU."""
    kw = dict(img_size=64, patch_size=16, embed_dim=384, depth=6, num_heads=6, num_classes=10)
    weights_mb = sum(p.numel() for p in VisionTransformer(**kw).parameters()) * 4 / 2**20  # ~41 MB
    reports = {}
    # a large caller: a child that reported its parent's resident set (ru_maxrss survives fork + exec on
    # Linux) would show at least the caller's peak, ballast included, for both methods
    ballast_mb = 2048
    ballast = torch.ones(ballast_mb * 2**20 // 4)
    caller_peak_mb = _own_peak_mb()
    for method in ("linear", "full"):
        torch.manual_seed(0)
        model = vpeft.apply_method(VisionTransformer(**kw), method)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        reports[method] = measure_training_isolated(model, batch_size=4, steps=1, warmup=1)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model untouched
    del ballast
    linear, full = reports["linear"], reports["full"]
    assert linear.peak_mem_kind == full.peak_mem_kind == "cpu_peak_rss_isolated"
    assert full.peak_mem_mb - linear.peak_mem_mb > 2 * weights_mb, (full.peak_mem_mb, linear.peak_mem_mb)
    assert linear.peak_mem_mb > linear.base_mem_mb + 0.9 * weights_mb  # the process held the model
    # its own peak, well under the caller's (what importing torch costs differs between machines)
    assert full.peak_mem_mb < caller_peak_mb - ballast_mb / 2, (full.peak_mem_mb, caller_peak_mb)
    assert full.trainable > 100 * linear.trainable and full.images_per_s > 0

    model = vpeft.apply_method(make_vit(), "lora", r=4)
    cfg = BenchConfig(latency=False, flops=False, train_steps=1, train_warmup=0, train_batch=2)
    assert benchmark(model, make_vit(), None, "cpu", cfg).training.peak_mem_kind == "cpu_peak_rss_isolated"


def test_training_needs_something_to_train():
    model = make_vit().requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        measure_training(model, steps=1, warmup=0)


# -- the suite, the cost dict and the bench record -------------------------------------------------


def test_bench_config():
    cpu = BenchConfig().resolved("cpu")
    assert (cpu.batches, cpu.dtypes, cpu.warmup, cpu.iters, cpu.train_dtype) == ((1, 8), ("fp32",), 2, 5, "fp32")
    gpu = BenchConfig().resolved("cuda")
    assert (gpu.batches, gpu.dtypes, gpu.warmup, gpu.iters) == ((1, 64), ("fp32", "bf16"), 50, 100)
    assert gpu.train_dtype == "bf16"
    assert cpu.train_isolate and not gpu.train_isolate  # per-method memory: a fresh process on a CPU
    with pytest.raises(ConfigError, match="train_isolate"):
        BenchConfig(train_isolate="yes")
    assert BenchConfig(iters=7).resolved("cuda").iters == 7
    cfg = BenchConfig.from_dict({"only": False, "latency": False, "batches": [1, 8]})
    assert cfg.batches == (1, 8) and not cfg.latency
    with pytest.raises(UnknownNameError, match="iter"):
        BenchConfig.from_dict({"iter": 5})
    with pytest.raises(ConfigError, match="bench.batches"):
        BenchConfig(batches=(0,))


def test_cost_summary_for_a_run_record():
    model = vpeft.apply_method(make_vit(), "ssf")
    quick = cost_summary(model, make_vit(), None, "cpu", BenchConfig(latency=False))
    assert quick["latency"] is None and quick["latency_overhead"] is None
    assert quick["delta_bytes"] == measure_params(model).delta_bytes
    assert quick["flops"]["ratio"] == 1.0  # scale and shift are element-wise: no matmul FLOPs
    full = cost_summary(model, make_vit(), None, "cpu", BenchConfig(batches=(1,), warmup=1, iters=3))
    assert full["latency_overhead_at"] == {"variant": "merged", "dtype": "fp32", "batch": 1}
    assert full["latency_overhead"] == pytest.approx(
        next(o["ratio"] for o in full["latency"]["overhead"] if o["variant"] == "merged" and o["batch"] == 1)
    )
    json.dumps(full)  # plain JSON


def test_bench_record_round_trip(tmp_path):
    model = vpeft.apply_method(make_vit(), "lora", r=4)
    cfg = BenchConfig(batches=(1, 2), warmup=1, iters=2, train_steps=1, train_warmup=0, train_batch=2)
    report = benchmark(model, make_vit(), None, "cpu", dataclasses.replace(cfg, train_isolate=False))
    assert report.training is not None and report.latency is not None
    assert report.backbone_params == vpeft.count_parameters(make_vit()).total
    assert to_record_cost(report)["latency_overhead"] == report.latency.headline()
    record = bench_record(report, "vit_tiny_test", environment())
    path = bench_record_path(tmp_path, record)
    assert path.parent.name == "vit_tiny_test" and path.name.startswith("lora-")
    write_bench_record(path, record)
    assert read_bench_record(path) == record
    assert record["params"]["backbone_total"] == report.backbone_params
    assert record["training"]["peak_mem_kind"] == "cpu_peak_rss"
    bad = {**record, "kind": "run"}
    with pytest.raises(BenchRecordError, match="kind"):
        validate_bench_record(bad)
    with pytest.raises(BenchRecordError, match="missing key 'latency'"):
        validate_bench_record({k: v for k, v in record.items() if k != "latency"})


@pytest.mark.gpu
def test_latency_and_training_on_cuda():
    """On a GPU: CUDA-event timing, fp32 and bf16 by default, allocator peak memory, bf16 training."""
    model = vpeft.apply_method(make_vit(), "lora", r=4).cuda()
    report = measure_latency(model, batches=(1, 8), warmup=3, iters=5, device="cuda", baseline=make_vit())
    assert (report.device, report.timer, report.dtypes) == ("cuda", "cuda_event", ("fp32", "bf16"))
    assert {s.variant for s in report.results} == {"bare", "unmerged", "merged"}
    assert all(s.n == 5 and s.median_ms > 0 for s in report.results)
    assert report.ratio("merged", "bf16", 8) is not None
    state = {k: v.clone() for k, v in model.state_dict().items()}
    train = measure_training(model, batch_size=4, steps=2, warmup=1)
    assert (train.device, train.dtype, train.peak_mem_kind) == ("cuda", "bf16", "cuda_max_allocated")
    assert train.peak_mem_mb > 0 and train.images_per_s > 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
