"""Fidelity to the authors' code: AdaLoRA's scale and recipe, AdapterFusion's value regulariser, DARE-TIES as its
authors ran it, delta-space merging from the identity, and serving's exact unmerge. Each expected value is a
direct transcription of the reference formula, computed here apart from the code under test."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, make_vit
from hydra import compose, initialize_config_dir

import vpeft

CONF = Path(__file__).resolve().parents[1] / "conf"
D = TINY["embed_dim"]


def make(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


# -- AdaLoRA: the reference code's update scale, and alpha searched as its scripts set it ----------

# lora_alpha in QingruZhang/AdaLoRA's scripts: NLU/scripts/run_debertav3_*.sh and NLG_QA/scripts/*.sh
AUTHORS_LORA_ALPHA = {16, 32}


def svd_linear_reference(x, w0, b0, P, E, Q, lora_alpha, r):
    """loralib's SVDLinear.forward, transcribed: ``scaling = lora_alpha if lora_alpha > 0 else r``, then
    ``x @ (A * E).T @ B.T * scaling / (ranknum + 1e-5)`` with ``ranknum = r``, A = Q, B = P, E a column."""
    scaling = lora_alpha if lora_alpha > 0 else float(r)
    return F.linear(x, w0, b0) + (x @ (Q * E[:, None]).T @ P.T) * scaling / (r + 1e-5)


def test_adalora_scale_is_the_reference_codes():
    r, alpha = 3, 16.0
    model = vpeft.apply_method(make_vit(), "adalora", init_r=r, target_r=2, alpha=alpha, targets=["fc2"]).double()
    fc2 = model.blocks[0].mlp.fc2
    u = fc2.adalora
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (u.P["fc2"], u.E["fc2"], u.Q["fc2"]):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(2, 5, fc2.in_features, generator=g, dtype=torch.float64)
    expected = svd_linear_reference(x, fc2.weight, fc2.bias, u.P["fc2"], u.E["fc2"], u.Q["fc2"], alpha, r)
    torch.testing.assert_close(fc2(x), expected, rtol=1e-13, atol=1e-13)
    merged = vpeft.merge(model)
    torch.testing.assert_close(merged.blocks[0].mlp.fc2(x), expected, rtol=5e-5, atol=5e-5)  # merged in float32


def test_adalora_alpha_null_is_the_reference_codes_zero_alpha():
    """alpha null takes init_r: the reference code's ``lora_alpha <= 0`` case (scaling = r)."""
    u = vpeft.apply_method(make_vit(), "adalora", init_r=4, target_r=2, targets=["fc2"]).blocks[0].mlp.fc2.adalora
    assert u.scaling == 4 / (4 + 1e-5)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), "16"])
def test_adalora_refuses_a_bad_alpha(alpha):
    with pytest.raises(vpeft.ConfigError, match="alpha"):
        vpeft.apply_method(make_vit(), "adalora", init_r=4, target_r=2, alpha=alpha)


def test_adalora_recipe_searches_alpha_as_the_authors_scripts_set_it():
    cfg = make(["+experiment=vtab1k_adalora"])
    grid = cfg.sweep.grid
    assert "method.alpha" in grid, "the recipe must search the update scale, as LoRA's does"
    alphas = set(grid["method.alpha"])
    assert alphas == AUTHORS_LORA_ALPHA
    # the scale alpha / (init_r + 1e-5) stays within the scripts' range, 32 / 12 (xsum) to 32 / 2 (rte, ...)
    scales = [a / (cfg.method.init_r + 1e-5) for a in alphas]
    assert all(32 / 12 - 1e-3 <= s <= 32 / 2 for s in scales)
    points = 1
    for values in grid.values():
        points *= len(values)
    header = (CONF / "experiment" / "vtab1k_adalora.yaml").read_text()
    assert f"# Size: {points * 19} tune runs ({points} grid points x 19 tasks)" in header


# -- AdapterFusion: AdapterHub's regulariser of the value matrix -----------------------------------


def fused_model(tmp_path, **config):
    from test_methods import adapter_files

    paths = adapter_files("vit", tmp_path, "adapter_houlsby", n=2, train_layernorm=False)
    model = vpeft.apply_method(make_vit(), "adapter_fusion", adapters=paths, **config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in fusion_layers(model):
            m.value.weight.add_(0.05 * torch.randn(m.value.weight.shape, generator=g))
    return model


def fusion_layers(model):
    from vpeft.layers import AdapterFusion

    return [m for m in model.modules() if isinstance(m, AdapterFusion)]


def hub_fusion_regularization_loss(values):
    """AdapterHub's get_fusion_regularization_loss, transcribed: 0.01 * (I - V).pow(2).sum() per fusion layer."""
    total = 0.0
    for v in values:
        target = torch.zeros(v.shape, dtype=torch.float64).fill_diagonal_(1.0)
        total += 0.01 * (target - v.double()).pow(2).sum().item()
    return total


def test_fusion_regulariser_is_adapterhubs(tmp_path):
    model = fused_model(tmp_path)
    layers = fusion_layers(model)
    assert len(layers) == 2 * TINY["depth"]  # Houlsby: after attention and after the MLP of every block
    reg = vpeft.applied_method(model).regularization(model)
    expected = hub_fusion_regularization_loss([m.value.weight.detach() for m in layers])
    assert expected > 0
    assert reg.item() == pytest.approx(expected, rel=1e-6)
    reg.backward()
    for m in layers:  # d/dV 0.01 ||I - V||^2 = 0.02 (V - I), and nothing else depends on the penalty
        eye = torch.eye(m.value.weight.shape[0])
        torch.testing.assert_close(m.value.weight.grad, 0.02 * (m.value.weight.detach() - eye))
        assert m.query.weight.grad is None and m.key.weight.grad is None


def test_fusion_regulariser_can_be_turned_off(tmp_path):
    model = fused_model(tmp_path, regularization=False)
    assert vpeft.applied_method(model).regularization(model) is None
    with pytest.raises(vpeft.ConfigError, match="regularization"):
        vpeft.apply_method(make_vit(), "adapter_fusion", adapters=["a", "b"], regularization="yes")


def test_the_training_loop_adds_the_fusion_regulariser(tmp_path):
    """One plain-SGD step: with the regulariser V moves by exactly -lr * 0.02 (V - I) more than without."""
    from vpeft.engine import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 5, (8,), generator=g)
    lr, after = 0.5, {}
    for on in (True, False):
        model = fused_model(tmp_path / str(on), regularization=on)
        before = [m.value.weight.detach().clone() for m in fusion_layers(model)]
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
        cfg = TrainConfig(epochs=1, batch_size=8, warmup_epochs=0, progress=False)
        train(model, images, labels, images, labels, opt, cfg, [0.5] * 3, [0.5] * 3, torch.device("cpu"))
        after[on] = [m.value.weight.detach() for m in fusion_layers(model)]
    for v0, v_on, v_off in zip(before, after[True], after[False]):
        eye = torch.eye(v0.shape[0])
        torch.testing.assert_close(v_on - v_off, -lr * 0.02 * (v0 - eye), atol=1e-6, rtol=1e-4)
        assert (v_on - eye).norm() < (v_off - eye).norm()


# -- delta-space merging: changes from the method's identity, added back to it ---------------------


def ia3_task(seed: int, method: str = "ia3"):
    """A TaskDelta whose every delta tensor is its identity value (1 for scales, 0 otherwise) plus a seeded change."""
    from vpeft.compose import TaskDelta

    model = vpeft.apply_method(make_vit(), method, **({"init": "identity"} if method == "ssf" else {}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in vpeft.applied_method(model).delta_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return TaskDelta.from_model(model), model


def delta_params(model):
    return {n: p.detach().clone() for n, p in vpeft.applied_method(model).delta_parameters(model)}


def is_scale(name: str) -> bool:
    return ".ia3." in name or name.endswith("ssf.scale")


@pytest.mark.parametrize("method", ["ia3", "ssf"])
def test_delta_space_task_arithmetic_adds_changes_to_the_identity(method):
    from vpeft.compose import apply_vector, merge_vectors, task_vector

    base = make_vit()
    (t1, m1), (t2, m2) = ia3_task(1, method), ia3_task(2, method)
    p1, p2 = delta_params(m1), delta_params(m2)
    vectors = [task_vector(t, base, space="delta") for t in (t1, t2)]
    merged = apply_vector(base, merge_vectors(vectors, "task_arithmetic", lam=1.0))
    got = delta_params(merged)
    assert set(got) == set(p1) and any(is_scale(n) for n in got)
    for name in got:
        identity = 1.0 if is_scale(name) else 0.0
        expected = identity + (p1[name] - identity) + (p2[name] - identity)  # theta_id + sum of changes
        torch.testing.assert_close(got[name], expected, rtol=1e-6, atol=1e-6)


def test_merging_a_delta_with_itself_reproduces_it():
    from vpeft.compose import apply_vector, merge_vectors, task_vector

    base = make_vit()
    task, model = ia3_task(3)
    v = task_vector(task, base, space="delta")
    for algorithm, params in [("task_arithmetic", {"lam": 0.5}), ("weighted_average", {})]:
        merged = apply_vector(base, merge_vectors([v, v], algorithm, **params))
        for name, p in delta_params(model).items():
            torch.testing.assert_close(delta_params(merged)[name], p, rtol=1e-6, atol=1e-6)
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-5)


def test_delta_space_ties_trims_the_changes_l_minus_1():
    """TIES on IA3 in delta space trims |l - 1| (the TIES paper's convention for IA3), not |l|."""
    from vpeft.compose import task_vector, trim

    task, model = ia3_task(4)
    v = task_vector(task, make_vit(), space="delta")
    flat = torch.cat([(p - 1.0).reshape(-1) for p in delta_params(model).values()])
    keep = int(0.2 * flat.numel())
    threshold = flat.abs().sort(descending=True).values[keep - 1]
    kept = trim(v, 0.2)
    for name, p in delta_params(model).items():
        change = p - 1.0
        torch.testing.assert_close(kept.tensors[name], torch.where(change.abs() >= threshold, change, 0.0))


def test_dora_identity_is_the_backbones_row_norm():
    from vpeft.compose import identity_values

    base = make_vit()
    model = vpeft.apply_method(make_vit(), "dora")
    names = dict(vpeft.applied_method(model).delta_parameters(model))
    ident = identity_values(base, "dora", vpeft.applied_method(model).config_dict(), names)
    w = base.blocks[0].attn.qkv.weight
    torch.testing.assert_close(ident["blocks.0.attn.qkv.dora.m.q"], w[:D].norm(dim=1))
    assert all(".m." in n for n in ident)  # A and B: zero
    for n, value in ident.items():  # DoRA starts at its identity: m = ||W0||
        torch.testing.assert_close(names[n].detach().float(), value)


# -- serving: merge and unmerge leave the shared backbone bit for bit ------------------------------


def near_zero_delta(method: str, path: Path, scale: float = 1e-30) -> Path:
    """A trained-looking delta whose scales are ``scale`` on half the channels (1/scale overflows float32)."""
    model = vpeft.apply_method(make_vit(), method)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in vpeft.applied_method(model).delta_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
            if is_scale(name):
                p[::2] = scale
    return vpeft.save_delta(model, path)


@pytest.mark.parametrize("method", ["ia3", "ssf", "lora", "bitfit"])
def test_unmerge_restores_the_backbone_bitwise(method, tmp_path):
    from vpeft.serve import MultiDeltaModel

    other = vpeft.apply_method(make_vit(), method)
    with torch.no_grad():
        for _, p in vpeft.applied_method(other).delta_parameters(other):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9)))
    files = [
        vpeft.save_delta(other, tmp_path / "other.safetensors"),
        near_zero_delta(method, tmp_path / "tiny.safetensors"),
    ]
    backbone = make_vit()
    weights = {k: v.clone() for k, v in backbone.state_dict().items()}
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = MultiDeltaModel.from_files(backbone, files)
    with torch.no_grad():
        before = model(x, 0)
        model.merge(1)
        model.unmerge()
        state = backbone.state_dict()
        assert set(state) == set(weights)
        for k, v in weights.items():
            assert torch.equal(state[k], v), f"{k} changed by merge + unmerge"
        assert torch.equal(model(x, 0), before), "another task's outputs changed"
        model.merge(0)  # the other task merges and unmerges as before
        model.unmerge()
        for k, v in weights.items():
            assert torch.equal(backbone.state_dict()[k], v)


# -- DARE-TIES as its authors ran it: DARE's drop and rescale, then TIES's trim, election, disjoint mean --


def mergelm_dare_ties(vectors, drop, density, lam, seed):
    """yule-BUAA/MergeLM's mask_merging with mask_apply_method=ties_merging, transcribed on dicts of tensors.

    DARE (mask_model_weights): each entry dropped with probability ``drop`` and the rest divided by 1 - drop;
    the draws follow this suite's documented protocol (one generator, ``torch.rand`` per tensor in name order,
    dropped where the draw is below ``drop``) in place of MergeLM's torch.bernoulli. TIES (ties_merging): the
    tensors flattened in sorted name order, the smallest magnitudes masked, the sign of the sum elected (a zero
    sum takes the majority sign), the agreeing entries averaged, times the scaling coefficient. One deviation,
    the trim's count: floor(density * n) entries kept (the TIES paper's top k%), where MergeLM's kthvalue
    threshold also keeps the entry at it.
    """
    g = torch.Generator().manual_seed(seed)
    dared = []
    for v in vectors:
        out = {}
        for name in sorted(v):
            keep = torch.rand(v[name].shape, generator=g) >= drop
            out[name] = v[name] * keep / (1 - drop)
        dared.append(out)
    names = sorted(dared[0])
    flat = torch.vstack([torch.cat([d[n].flatten() for n in names]) for d in dared])
    n = flat.shape[1]
    keep = int(n * density)
    kth = flat.abs().kthvalue(n - keep + 1, dim=1, keepdim=True).values
    flat = flat * (flat.abs() >= kth)
    signs = torch.sign(flat.sum(dim=0))
    signs[signs == 0] = torch.sign(signs.sum())
    preserve = ((signs > 0) & (flat > 0)) | ((signs < 0) & (flat < 0))
    kept = flat * preserve
    merged = kept.sum(dim=0) / torch.clamp((kept != 0).sum(dim=0).float(), min=1.0) * lam
    out, pos = {}, 0
    for name in names:
        size = dared[0][name].numel()
        out[name] = merged[pos : pos + size].view(dared[0][name].shape)
        pos += size
    return out


def test_dare_ties_config_trims_as_mergelm():
    """MergeLM's TIES masks param_value_mask_rate 0.7-0.9 of the entries (density 0.1-0.3) after DARE."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / "merge" / "dare_ties.yaml")
    densities = list(cfg.grid.get("density", [])) or [cfg.params.density]
    assert densities and all(0.1 <= d <= 0.3 for d in densities), f"TIES's trim is off: density {densities}"


@pytest.mark.parametrize("drop", [0.5, 0.9])
@pytest.mark.parametrize("density", [0.1, 0.2])
def test_dare_ties_matches_mergelm(drop, density):
    from vpeft.compose import TaskVector, dare_ties

    g = torch.Generator().manual_seed(0)
    raw = [{"a.weight": torch.randn(6, 5, generator=g), "b.bias": torch.randn(7, generator=g)} for _ in range(3)]
    vectors = [TaskVector("weights", "lora", t) for t in raw]
    got = dare_ties(vectors, drop=drop, density=density, lam=0.7, seed=4)
    expected = mergelm_dare_ties(raw, drop, density, 0.7, 4)
    for name in expected:
        torch.testing.assert_close(got.tensors[name], expected[name], rtol=1e-6, atol=1e-7)
    untrimmed = mergelm_dare_ties(raw, drop, 1.0, 0.7, 4)
    if drop == 0.5:  # the trim is active: it changes the merge
        assert any(not torch.equal(expected[k], untrimmed[k]) for k in expected)
