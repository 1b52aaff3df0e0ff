"""Task vectors and merging against closed forms and direct transcriptions of the papers' algorithms."""

import copy
import math

import pytest
import timm
import torch
from conftest import make_vit, tiny_input
from test_methods import MERGEABLE, perturb_delta

import vpeft
from vpeft import compose
from vpeft.compose import TaskDelta, TaskVector

D = 48  # the tiny ViTs' width


def tuned(name, arch="vit", seed=3, num_classes=None, **config):
    """A tiny ViT with ``name`` applied and its delta (and head) perturbed: one task's fine-tuned model."""
    model = make_vit(arch)
    if num_classes:
        torch.manual_seed(seed)
        model.reset_classifier(num_classes)
    vpeft.apply_method(model, name, **config)
    perturb_delta(model, seed)
    return model


def merged_copy(model):
    return vpeft.merge(copy.deepcopy(model))


def params(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def vec(tensors, method="ssf", space="weights", **kw):
    return TaskVector(space, method, {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}, **kw)


# -- weight-space vectors: closed forms ------------------------------------------------------------


@pytest.mark.parametrize("arch", ["vit", "no_qkv_bias", "dinov2_reg"])
@pytest.mark.parametrize("name", sorted(MERGEABLE))
def test_one_task_at_lambda_one_is_its_merged_model(name, arch):
    base = make_vit(arch)
    model = tuned(name, arch)
    x = tiny_input(base)
    delta = TaskDelta.from_model(model)
    v = compose.task_vector(delta, base)
    merged = compose.merge_vectors([v], "task_arithmetic", lam=1.0)
    out = compose.put_head(compose.apply_vector(base, merged), compose.task_head(delta, base))
    reference = merged_copy(model)
    tol = type(vpeft.applied_method(model)).merge_atol
    torch.testing.assert_close(out(x), reference(x), atol=tol, rtol=1e-5)
    ours, theirs = params(out), params(reference)
    assert set(ours) == set(theirs)  # SSF's new biases on bias-free layers included
    for n in theirs:
        torch.testing.assert_close(ours[n], theirs[n], atol=1e-6, rtol=1e-6)
    assert vpeft.applied_method(out) is None  # a plain timm model
    assert torch.equal(base(x), make_vit(arch)(x))  # the base is untouched


def test_lambda_zero_gives_the_base():
    base = make_vit()
    v = compose.task_vector(TaskDelta.from_model(tuned("ssf")), base)
    model = compose.apply_vector(base, compose.task_arithmetic([v], lam=0.0))
    for n, p in base.named_parameters():
        assert torch.equal(params(model)[n], p), n


def test_lora_vector_is_the_papers_update():
    """LoRA (Hu et al.): W += (alpha / r) B A on q and v rows of the fused qkv, k untouched."""
    model = tuned("lora", r=4, alpha=8.0)
    v = compose.task_vector(TaskDelta.from_model(model), make_vit())
    assert not v.tensors and set(v.low_rank) == {f"blocks.{i}.attn.qkv.weight" for i in range(3)}
    lora = model.blocks[1].attn.qkv.lora
    expected = torch.zeros(3 * D, D)
    expected[:D] = 2.0 * lora.B["q"] @ lora.A["q"]
    expected[2 * D :] = 2.0 * lora.B["v"] @ lora.A["v"]
    f = v.low_rank["blocks.1.attn.qkv.weight"]
    assert f.rank == 8 and f.shape == (3 * D, D)
    torch.testing.assert_close(f.dense(), expected, atol=1e-6, rtol=1e-6)


def test_ssf_ia3_bitfit_full_vectors_are_their_closed_forms():
    base = make_vit()
    w, b = base.blocks[0].attn.qkv.weight.detach(), base.blocks[0].attn.qkv.bias.detach()
    # SSF: y -> y * s + t after qkv: W -> diag(s) W, b -> s b + t
    ssf = tuned("ssf")
    s, t = ssf.blocks[0].attn.qkv.ssf.scale.detach(), ssf.blocks[0].attn.qkv.ssf.shift.detach()
    v = compose.task_vector(TaskDelta.from_model(ssf), base)
    torch.testing.assert_close(v.tensors["blocks.0.attn.qkv.weight"], w * (s[:, None] - 1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(v.tensors["blocks.0.attn.qkv.bias"], b * (s - 1) + t, atol=1e-6, rtol=1e-5)
    # IA3: keys and values rows scaled by l_k, l_v; fc2's input columns by l_ff
    ia3 = tuned("ia3")
    v = compose.task_vector(TaskDelta.from_model(ia3), base)
    scale = torch.cat([torch.ones(D), ia3.blocks[0].attn.qkv.ia3.k.detach(), ia3.blocks[0].attn.qkv.ia3.v.detach()])
    torch.testing.assert_close(v.tensors["blocks.0.attn.qkv.weight"], w * (scale[:, None] - 1), atol=1e-6, rtol=1e-5)
    fc2 = base.blocks[0].mlp.fc2.weight.detach()
    l_ff = ia3.blocks[0].mlp.act.ia3.ff.detach()
    torch.testing.assert_close(v.tensors["blocks.0.mlp.fc2.weight"], fc2 * (l_ff[None, :] - 1), atol=1e-6, rtol=1e-5)
    assert "blocks.0.mlp.fc2.bias" not in v.tensors  # an input scale leaves the bias alone
    # BitFit: only biases; full: every weight; both tuned minus pretrained, heads excluded
    for name in ("bitfit", "full"):
        model = tuned(name)
        v = compose.task_vector(TaskDelta.from_model(model), base)
        ours = params(model)
        expected = {n: ours[n] - p for n, p in base.named_parameters() if not n.startswith("head")}
        expected = {n: e for n, e in expected.items() if e.abs().sum() > 0}
        assert set(v.tensors) == set(expected)
        assert all(n.endswith("bias") for n in v.tensors) == (name == "bitfit")
        for n, e in expected.items():
            torch.testing.assert_close(v.tensors[n], e, atol=0, rtol=0)
    assert not compose.task_vector(TaskDelta.from_model(tuned("linear")), base).keys()


# -- algebra ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ssf", "ia3", "lora"])
def test_sum_applied_is_both_updates_added(name):
    base = make_vit()
    a, b = tuned(name, seed=3), tuned(name, seed=4)
    va, vb = (compose.task_vector(TaskDelta.from_model(m), base) for m in (a, b))
    model = compose.apply_vector(base, va + vb)
    ma, mb, p0 = params(merged_copy(a)), params(merged_copy(b)), params(base)
    for n, p in params(model).items():
        if not n.startswith("head"):
            torch.testing.assert_close(p, p0[n] + (ma[n] - p0[n]) + (mb[n] - p0[n]), atol=1e-6, rtol=1e-5)
    # subtraction and negation undo an addition
    back = compose.apply_vector(base, (va + vb) - vb + (-va))
    for n, p in base.named_parameters():
        torch.testing.assert_close(params(back)[n], p, atol=1e-6, rtol=0)


def test_lora_sum_stays_factored_and_exact():
    base = make_vit()
    models = [tuned("lora", seed=s, r=r, targets=t) for s, r, t in [(3, 4, ["q", "v"]), (4, 2, ["k", "v", "fc1"])]]
    factored = [compose.task_vector(TaskDelta.from_model(m), base) for m in models]
    dense = [compose.task_vector(TaskDelta.from_model(m), base, factored=False) for m in models]
    assert not dense[0].low_rank and dense[0].tensors
    total = compose.add(*factored)
    qkv = total.low_rank["blocks.0.attn.qkv.weight"]
    assert qkv.rank == 4 * 2 + 2 * 2  # q, v at r 4 and k, v at r 2: [B_1 B_2] [A_1; A_2], nothing dense
    assert total.numel() < sum(t.numel() for t in total.dense_tensors().values())
    expected = compose.add(*dense)
    assert set(total.keys()) == set(expected.keys()) == set(total.dense_tensors())
    for n, t in expected.tensors.items():
        torch.testing.assert_close(total.dense_tensors()[n], t, atol=1e-6, rtol=1e-5)
    scaled = compose.scale(total, -0.5).dense_tensors()
    for n, t in expected.tensors.items():
        torch.testing.assert_close(scaled[n], -0.5 * t, atol=1e-6, rtol=1e-5)


def test_weighted_average_and_task_arithmetic_closed_forms():
    a, b = vec({"w": [1.0, -2.0]}), vec({"w": [3.0, 4.0], "u": [2.0]})
    avg = compose.weighted_average([a, b], weights=[1, 3])
    torch.testing.assert_close(avg.tensors["w"], torch.tensor([2.5, 2.5]))
    torch.testing.assert_close(avg.tensors["u"], torch.tensor([1.5]))
    ta = compose.merge_vectors([a, b], "task_arithmetic", lam=0.5)
    torch.testing.assert_close(ta.tensors["w"], torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(ta.tensors["u"], torch.tensor([1.0]))


def test_delta_space_averages_the_deltas_own_tensors():
    """Two VPT prompt sets averaged: a model with the method applied and the mean prompts."""
    base = make_vit()
    a, b = tuned("vpt_deep", seed=3), tuned("vpt_deep", seed=4)
    deltas = [TaskDelta.from_model(m) for m in (a, b)]
    vs = [compose.task_vector(d, base, space="delta") for d in deltas]
    assert all(v.space == "delta" and v.config == {"num_tokens": 10, "dropout": 0.0} for v in vs)
    model = compose.apply_vector(base, compose.merge_vectors(vs, "weighted_average"))
    assert vpeft.applied_method(model).name == "vpt_deep"
    mean = (a.blocks.prompt_embeddings + b.blocks.prompt_embeddings) / 2
    torch.testing.assert_close(model.blocks.prompt_embeddings, mean, atol=0, rtol=0)
    # the same as loading the averaged delta by hand
    manual = vpeft.apply_method(make_vit(), "vpt_deep")
    with torch.no_grad():
        manual.blocks.prompt_embeddings.copy_(mean)
    x = tiny_input(base)
    torch.testing.assert_close(model(x), manual(x), atol=0, rtol=0)


def test_each_task_gets_its_own_head_on_the_merged_backbone(tmp_path):
    base = make_vit()
    a, b = tuned("lora", seed=3), tuned("lora", seed=4, num_classes=7)
    paths = [vpeft.save_delta(m, tmp_path / f"{i}.safetensors") for i, m in enumerate((a, b))]
    tasks = [compose.read_task(p) for p in paths]
    assert tasks[0].source == str(paths[0])
    vs = [compose.task_vector(t, base) for t in tasks]
    assert vs[0].sources == (str(paths[0]),)
    model = compose.apply_vector(base, compose.merge_vectors(vs, "ties", density=0.5, lam=1.0))
    merged = compose.merge_tasks(base, paths, "ties", density=0.5, lam=1.0)  # the same in one call
    assert merged.vector.sources == tuple(str(p) for p in paths)
    x = tiny_input(base)
    for i, (task, model_t, classes) in enumerate([(tasks[0], a, 5), (tasks[1], b, 7), (tasks[0], a, 5)]):
        compose.put_head(model, compose.task_head(task, base))
        assert model(x).shape == (2, classes)
        torch.testing.assert_close(model.head.weight, model_t.head.weight, atol=0, rtol=0)
        torch.testing.assert_close(merged.model_for(i % 2)(x), model(x), atol=0, rtol=0)


# -- TIES and DARE against the papers' pseudo-code -------------------------------------------------


def test_ties_on_a_hand_worked_example():
    """k = 50%: each task keeps its 2 largest entries; signs elected by the sum; agreeing entries averaged."""
    tasks = [
        vec({"a": [3.0, -1.0], "b": [0.5, -2.0]}),
        vec({"a": [-4.0, 2.0], "b": [1.0, -0.2]}),
        vec({"a": [1.5, 0.1], "b": [-3.0, -1.0]}),
    ]
    # trimmed: [3, 0, 0, -2], [-4, 2, 0, 0], [1.5, 0, -3, 0]; sums [0.5, 2, -3, -2] -> signs [+, +, -, -]
    # entry 0: +3 and +1.5 agree (the -4 does not): 2.25
    merged = compose.ties(tasks, density=0.5, lam=1.0)
    torch.testing.assert_close(merged.tensors["a"], torch.tensor([2.25, 2.0]))
    torch.testing.assert_close(merged.tensors["b"], torch.tensor([-3.0, -2.0]))
    torch.testing.assert_close(compose.ties(tasks, density=0.5, lam=0.3).tensors["a"], torch.tensor([0.675, 0.6]))


def ties_transcription(tasks: list[list[float]], k: float, lam: float) -> list[float]:
    """Yadav et al., Algorithm 1, written out over Python lists."""
    n = len(tasks[0])
    trimmed = []
    for tau in tasks:
        keep = set(sorted(range(n), key=lambda i: -abs(tau[i]))[: int(k * n)])
        trimmed.append([tau[i] if i in keep else 0.0 for i in range(n)])
    merged = []
    for p in range(n):
        total = sum(t[p] for t in trimmed)
        gamma = (total > 0) - (total < 0)
        agree = [t[p] for t in trimmed if t[p] != 0 and ((t[p] > 0) - (t[p] < 0)) == gamma]
        merged.append(lam * sum(agree) / len(agree) if agree else 0.0)
    return merged


@pytest.mark.parametrize("k", [0.1, 0.3, 0.75, 1.0])
def test_ties_matches_the_papers_algorithm(k):
    g = torch.Generator().manual_seed(int(k * 100))
    flat = [torch.randn(40, generator=g) for _ in range(4)]
    tasks = [vec({"x": f[:25].view(5, 5).tolist(), "y": f[25:].tolist()}, method="full") for f in flat]
    merged = compose.merge_vectors(tasks, "ties", density=k, lam=0.7)
    got = torch.cat([merged.tensors["x"].reshape(-1), merged.tensors["y"]])
    want = torch.tensor(ties_transcription([f.tolist() for f in flat], k, 0.7))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_dare_drops_and_rescales_as_the_paper():
    """m ~ Bernoulli(p) per entry, tau' = (1 - m) * tau / (1 - p): survivors exactly rescaled, E[tau'] = tau."""
    p = 0.9
    tau = vec({"w": torch.linspace(-2, 2, 50_000).tolist(), "u": [1.0] * 50_000})
    out = compose.dare(tau, p, generator=7)
    for name, t in tau.tensors.items():
        o = out.tensors[name]
        kept = o != 0
        torch.testing.assert_close(o[kept], t[kept] / (1 - p), atol=0, rtol=1e-6)
        # the drop rate is p: within 5 standard deviations of a binomial count
        assert abs((~kept).float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / t.numel())
    # expectation preserved: the mean of 1s stays 1 within 5 standard deviations
    assert abs(out.tensors["u"].mean().item() - 1.0) < 5 * math.sqrt(p / (1 - p) / 50_000)
    # over many seeds, each entry's mean approaches tau
    small = vec({"w": [0.5, -1.5, 3.0]})
    mean = sum(compose.dare(small, 0.5, generator=s).tensors["w"] for s in range(4000)) / 4000
    torch.testing.assert_close(mean, small.tensors["w"], atol=0.1, rtol=0.05)


def test_dare_is_seeded_and_draws_in_a_documented_order():
    tau = vec({"b": [1.0] * 8, "a": [2.0] * 8})
    one, two = compose.dare(tau, 0.5, generator=3), compose.dare(tau, 0.5, generator=3)
    assert all(torch.equal(one.tensors[k], two.tensors[k]) for k in tau.tensors)
    assert not torch.equal(compose.dare(tau, 0.5, generator=4).tensors["a"], one.tensors["a"])
    g = torch.Generator().manual_seed(3)  # tensors in name order, one uniform draw per entry, dropped below p
    for name, value in (("a", 2.0), ("b", 1.0)):
        keep = torch.rand(8, generator=g) >= 0.5
        assert torch.equal(one.tensors[name], torch.where(keep, torch.tensor(value / 0.5), torch.tensor(0.0)))
    assert torch.equal(compose.dare(tau, 0.0, generator=1).tensors["a"], tau.tensors["a"])


def test_dare_before_task_arithmetic_and_ties():
    tasks = [vec({"w": torch.randn(30, generator=torch.Generator().manual_seed(i)).tolist()}) for i in range(3)]
    g = torch.Generator().manual_seed(5)
    dropped = [compose.dare(t, 0.3, g) for t in tasks]
    ta = compose.merge_vectors(tasks, "dare_task_arithmetic", drop=0.3, lam=0.5, seed=5)
    torch.testing.assert_close(ta.tensors["w"], 0.5 * sum(d.tensors["w"] for d in dropped))
    dt = compose.merge_vectors(tasks, "dare_ties", drop=0.3, density=1.0, lam=1.0, seed=5)
    want = ties_transcription([d.tensors["w"].tolist() for d in dropped], 1.0, 1.0)
    torch.testing.assert_close(dt.tensors["w"], torch.tensor(want), atol=1e-6, rtol=1e-6)


def test_ties_on_lora_materialises_the_factors():
    base = make_vit()
    vs = [compose.task_vector(TaskDelta.from_model(tuned("lora", seed=s)), base) for s in (3, 4)]
    merged = compose.ties(vs, density=1.0, lam=1.0)
    assert not merged.low_rank and set(merged.tensors) == set(vs[0].low_rank)
    assert compose.algorithm_params("ties") == {"density": 0.2, "lam": 1.0}


# -- errors ----------------------------------------------------------------------------------------


def test_deltas_of_different_backbones_or_methods():
    base = make_vit()
    a = TaskDelta.from_model(tuned("ssf"))
    b = TaskDelta.from_model(tuned("ia3"))
    va, vb = compose.task_vector(a, base), compose.task_vector(b, base)
    with pytest.raises(compose.IncompatibleDeltasError, match="different methods: ssf .* and ia3"):
        compose.merge_vectors([va, vb], "task_arithmetic")
    with pytest.raises(compose.IncompatibleDeltasError, match="different methods"):
        va + vb  # noqa: B018
    small = TaskDelta(a.tensors, a.method, a.config, backbone="vit_small_patch16_224", source="small.safetensors")
    tiny = TaskDelta(a.tensors, a.method, a.config, backbone="vit_tiny_patch16_224", source="tiny.safetensors")
    vs, vt = compose.task_vector(small, base), compose.task_vector(tiny, base)
    with pytest.raises(compose.IncompatibleDeltasError, match="different backbones: vit_small_patch16_224 \\(small"):
        compose.ties([vs, vt])
    timm_tiny = timm.create_model("vit_tiny_patch16_224", num_classes=5, depth=1, img_size=32)
    with pytest.raises(compose.IncompatibleDeltasError, match="small.safetensors was trained on vit_small_patch16_224"):
        compose.task_vector(small, timm_tiny)
    with pytest.raises(compose.IncompatibleDeltasError, match="belongs to vit_small_patch16_224"):
        compose.apply_vector(timm_tiny, vs)
    with pytest.raises(compose.IncompatibleDeltasError, match="weights-space vector .* with a delta-space"):
        compose.add(va, compose.task_vector(a, base, space="delta"))
    other = TaskDelta.from_model(tuned("vpt_deep", num_tokens=4))
    with pytest.raises(compose.IncompatibleDeltasError, match="different configs in delta space"):
        compose.weighted_average(
            [
                compose.task_vector(other, base, space="delta"),
                compose.task_vector(TaskDelta.from_model(tuned("vpt_deep")), base, space="delta"),
            ]
        )


def test_delta_without_head():
    base = make_vit()
    a = TaskDelta.from_model(tuned("lora"))
    headless = TaskDelta({k: v for k, v in a.tensors.items() if not k.startswith("head")}, "lora", a.config, source="x")
    compose.task_vector(headless, base)  # the vector needs no head
    with pytest.raises(compose.MissingHeadError, match=r"x has no classification head \(missing \['head.bias', 'head"):
        compose.task_head(headless, base)
    with pytest.raises(compose.MissingHeadError, match="x has no classification head"):
        compose.merge_tasks(base, [a, headless], "task_arithmetic")


def test_non_mergeable_method_in_weight_space():
    d = TaskDelta.from_model(tuned("vpt_shallow"))
    with pytest.raises(
        vpeft.NotMergeableError, match=f"mergeable methods: {', '.join(sorted(MERGEABLE))}; use space='delta'"
    ):
        compose.task_vector(d, make_vit())
    assert compose.task_vector(d, make_vit(), space="delta").tensors


def test_unknown_algorithm_space_or_parameter():
    v = vec({"w": [1.0]})
    valid = "dare_task_arithmetic, dare_ties, task_arithmetic, ties, weighted_average"
    with pytest.raises(
        vpeft.UnknownNameError, match=f"unknown merge algorithm 'tie'; valid merge algorithms: {valid}$"
    ):
        compose.merge_vectors([v], "tie")
    with pytest.raises(vpeft.UnknownNameError, match="unknown ties parameter 'k'; valid ties parameters: density, lam"):
        compose.merge_vectors([v], "ties", k=0.2)
    with pytest.raises(vpeft.UnknownNameError, match="unknown task vector space 'weight'"):
        compose.task_vector(TaskDelta.from_model(tuned("lora")), make_vit(), space="weight")
    with pytest.raises(vpeft.ConfigError, match=r"density must be a number in \[0, 1\]"):
        compose.ties([v], density=20)
    with pytest.raises(vpeft.ConfigError, match=r"drop must be a number in \[0, 1\)"):
        compose.dare(v, 1.0)


def test_missing_delta_file_and_applied_backbone(tmp_path):
    with pytest.raises(FileNotFoundError, match="no delta file at .*nope.safetensors") as e:
        compose.read_task(tmp_path / "nope.safetensors")
    assert isinstance(e.value, vpeft.DataError)
    with pytest.raises(vpeft.DataError, match="no delta file"):
        compose.task_vector(tmp_path / "nope.safetensors", make_vit())
    applied = vpeft.apply_method(make_vit(), "lora")
    with pytest.raises(vpeft.VpeftError, match="bare pretrained backbone"):
        compose.task_vector(TaskDelta.from_model(tuned("lora")), applied)


def test_lora_qkv_vector_is_one_low_rank_update_of_the_fused_layer():
    """LoRA on the whole fused qkv (NOAH, peft): W += (alpha / r) B A, A r x d shared, B 3d x r."""
    model = tuned("lora", r=4, alpha=8.0, targets=["qkv"])
    v = compose.task_vector(TaskDelta.from_model(model), make_vit())
    lora = model.blocks[1].attn.qkv.lora
    f = v.low_rank["blocks.1.attn.qkv.weight"]
    assert f.rank == 4 and f.shape == (3 * D, D)
    torch.testing.assert_close(f.dense(), 2.0 * lora.B["qkv"] @ lora.A["qkv"], atol=1e-6, rtol=1e-6)
    # beside LoRA on the thirds, the sum stays factored: [B_qkv B_qv] [A_qkv; A_qv]
    other = compose.task_vector(TaskDelta.from_model(tuned("lora", seed=4, r=2)), make_vit())
    total = compose.add(v, other)
    assert total.low_rank["blocks.1.attn.qkv.weight"].rank == 4 + 2 * 2
    dense = compose.add(*(compose.task_vector(TaskDelta.from_model(m), make_vit(), factored=False)
                          for m in (model, tuned("lora", seed=4, r=2))))  # fmt: skip
    for n, t in dense.tensors.items():
        torch.testing.assert_close(total.dense_tensors()[n], t, atol=1e-6, rtol=1e-5)
