"""DoRA, RepAdapter, FacT, Adapter+ and AdaLoRA against direct computations of their papers' definitions."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, make_vit, tiny_input
from test_methods import perturb_delta

import vpeft

D = TINY["embed_dim"]
HIDDEN = int(D * TINY["mlp_ratio"])


def tokens(n: int = 5, seed: int = 7) -> torch.Tensor:
    return torch.randn(2, n, D, generator=torch.Generator().manual_seed(seed))


# -- DoRA (Liu et al., ICML 2024) -------------------------------------------------------------------


def dora_weight(w0, a, b, m, scaling):
    """Eq. (5): W' = m * (W0 + s B A) / ||W0 + s B A||_c, the norm over each output row's inputs."""
    v = w0 + scaling * b @ a
    return m.unsqueeze(1) * v / v.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("arch", ["vit", "no_qkv_bias"])
def test_dora_matches_the_papers_weight(arch):
    model = vpeft.apply_method(make_vit(arch), "dora", r=4, alpha=8, targets=["q", "v", "fc1"])
    qkv = model.blocks[1].attn.qkv
    # the magnitude starts at ||W0||_c of each adapted row
    torch.testing.assert_close(qkv.dora.m["v"], qkv.weight[2 * D :].norm(dim=1))
    perturb_delta(model)
    x = tokens()
    w0 = qkv.weight.detach().clone()
    expected_w = w0.clone()
    for s, (lo, hi) in {"q": (0, D), "v": (2 * D, 3 * D)}.items():
        expected_w[lo:hi] = dora_weight(w0[lo:hi], qkv.dora.A[s], qkv.dora.B[s], qkv.dora.m[s], 8 / 4)
    torch.testing.assert_close(qkv(x), F.linear(x, expected_w, qkv.bias), atol=1e-5, rtol=1e-5)
    assert torch.equal(expected_w[D : 2 * D], w0[D : 2 * D])  # k untouched
    fc1 = model.blocks[0].mlp.fc1
    d = fc1.dora
    w = dora_weight(fc1.weight, d.A["fc1"], d.B["fc1"], d.m["fc1"], 2.0)
    torch.testing.assert_close(fc1(x), F.linear(x, w, fc1.bias), atol=1e-5, rtol=1e-5)
    vpeft.merge(model)
    torch.testing.assert_close(model.blocks[0].mlp.fc1.weight, w.detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("detach_norm", [True, False])
def test_dora_norm_gradient(detach_norm):
    """detach_norm (the paper's section 4.3, peft's choice): ||V||_c is a constant in the backward pass."""
    model = vpeft.apply_method(make_vit(), "dora", r=4, targets=["fc2"], detach_norm=detach_norm)
    perturb_delta(model)
    fc2 = model.blocks[0].mlp.fc2
    d = fc2.dora
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(3))
    fc2(x).square().sum().backward()
    ours = d.B["fc2"].grad.clone()
    a, b, m = (t.detach().clone().requires_grad_(True) for t in (d.A["fc2"], d.B["fc2"], d.m["fc2"]))
    v = fc2.weight + d.scaling * b @ a
    norm = v.norm(dim=1, keepdim=True)
    w = m.unsqueeze(1) * v / (norm.detach() if detach_norm else norm)
    F.linear(x, w, fc2.bias).square().sum().backward()
    torch.testing.assert_close(ours, b.grad, atol=1e-5, rtol=1e-4)


# -- RepAdapter (Luo et al., 2023) ------------------------------------------------------------------


def repadapter_reference(x, adapter):
    """The reference code's RepAdapter: x + s * conv_B(conv_A(x)), 1x1 Conv1d, conv_B with ``groups``."""
    t = x.transpose(1, 2)
    h = F.conv1d(t, adapter.down.weight.unsqueeze(-1), adapter.down.bias)
    u = F.conv1d(h, adapter.up_weight.unsqueeze(-1), adapter.up_bias, groups=adapter.groups)
    return (u * adapter.scale + t).transpose(1, 2)


@pytest.mark.parametrize("arch", ["vit", "no_qkv_bias", "dinov2_reg"])
def test_repadapter_matches_the_reference_code(arch):
    model = vpeft.apply_method(make_vit(arch), "repadapter", dim=8, groups=2, scale=0.5)
    perturb_delta(model)
    x = tokens()
    for block in model.blocks:
        for norm, _linear in ((block.norm1, block.attn.qkv), (block.norm2, block.mlp.fc1)):
            plain = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            adapter = norm.repadapter
            assert adapter.up_weight.shape == (D, 8 // 2)  # group-wise: h / groups inputs per output channel
            torch.testing.assert_close(norm(x), repadapter_reference(plain, adapter), atol=1e-6, rtol=1e-6)
    # merging folds each adapter into the layer that reads its output, the norms stay as they were
    norms = {n: p.clone() for n, p in model.named_parameters() if ".norm" in n and "repadapter" not in n}
    qkv = model.blocks[0].attn.qkv.weight.clone()
    ref = model(tiny_input(model))
    vpeft.merge(model)
    assert all(torch.equal(p, norms[n]) for n, p in model.named_parameters() if n in norms)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, qkv)
    torch.testing.assert_close(model(tiny_input(model)), ref, atol=1e-5, rtol=1e-5)


def test_repadapter_hidden_dropout_only_in_training():
    model = vpeft.apply_method(make_vit(), "repadapter", dropout=0.5)
    perturb_delta(model)
    x = tokens()
    norm = model.blocks[0].norm1
    model.eval()
    assert torch.equal(norm(x), norm(x))
    model.train()
    assert not torch.equal(norm(x), norm(x))


# -- FacT (Jie and Deng, AAAI 2023) -----------------------------------------------------------------


def fact_reference(model, i, x, h):
    """The reference code's updates (FacT/fact_tt.py, fact_tk.py) of block ``i``'s qkv, proj, fc1, fc2.

    ``x``: tokens [B, N, d] (the input of qkv and proj), ``h``: hidden units [B, N, m d] (fc2's input).
    Written from the code's forward functions, with the cores of the variant in the code's own form.
    """
    f = model.fact
    r, d, m, s = f.rank, D, HIDDEN // D, model.blocks[i].attn.qkv.fact.scale
    U = lambda t: t @ f.U.t()  # noqa: E731  (the code's FacTu)
    V = lambda t: t @ f.V.t()  # noqa: E731  (the code's FacTv)
    B, N = x.shape[:2]
    if f.variant == "tt":
        sites = (model.blocks[i].attn.qkv.fact, model.blocks[i].attn.proj.fact)
        lin = lambda t, w: t @ w.t()  # noqa: E731  (nn.Linear(dim, dim, bias=False))
        q, k, v = (V(lin(U(x), getattr(sites[0], n))) for n in "qkv")
        o = V(lin(U(x), sites[1].o))
        fc1 = V(lin(U(x), model.blocks[i].mlp.fc1.fact.fc1).reshape(B, N, m, r)).reshape(B, N, m * d)
        fc2 = V(lin(U(h.reshape(B, N, m, d)).reshape(B, N, m * r), model.blocks[i].mlp.fc2.fact.fc2))
    else:
        idx = i * (4 + 2 * m)
        c = f.C @ f.P[:, idx : idx + 4]
        q, k, v, o = (V(U(x) @ c[:, :, j]) for j in range(4))
        c = f.C @ f.P[:, idx + 4 : idx + 4 + 2 * m]
        c1, c2 = c[:, :, :m].reshape(r, m * r), c[:, :, m:].reshape(r, m * r)
        fc1 = V((U(x) @ c1).reshape(B, N, m, r)).reshape(B, N, m * d)
        fc2 = V(U(h.reshape(B, N, m, d)).reshape(B, N, m * r) @ c2.t())
    return torch.cat([q, k, v], dim=2) * s, o * s, fc1 * s, fc2 * s


@pytest.mark.parametrize("variant", ["tt", "tk"])
def test_fact_matches_the_reference_code(variant):
    model = vpeft.apply_method(make_vit(), "fact", variant=variant, rank=4, scale=3.0)
    perturb_delta(model)
    x = tokens()
    h = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(8))
    for i, block in enumerate(model.blocks):
        dq, do, d1, d2 = fact_reference(model, i, x, h)
        a, p, f1, f2 = block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2
        for layer, inp, delta in ((a, x, dq), (p, x, do), (f1, x, d1), (f2, h, d2)):
            torch.testing.assert_close(
                layer(inp), F.linear(inp, layer.weight, layer.bias) + delta, atol=1e-5, rtol=1e-5
            )
    # the factors are shared: one U and V for the whole model
    assert {n for n, _ in model.named_parameters() if n.endswith((".U", ".V"))} == {"fact.U", "fact.V"}


def test_fact_tk_attention_slices_are_the_papers_tucker_tensor():
    """FacT-TK: dW = s * C x1 U x2 V x3 P, one slice per matrix, for q, k, v, o in that order per block."""
    model = vpeft.apply_method(make_vit(), "fact", variant="tk", rank=4, scale=2.0)
    perturb_delta(model)
    f = model.fact
    tensor = 2.0 * torch.einsum("abc,aj,ib,cs->ijs", f.C, f.U, f.V, f.P)  # [d_out, d_in, slots]
    slots = 4 + 2 * (HIDDEN // D)
    for i, block in enumerate(model.blocks):
        want = torch.cat([tensor[:, :, i * slots + j] for j in range(3)])
        torch.testing.assert_close(block.attn.qkv.fact.delta_weight(), want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            block.attn.proj.fact.delta_weight(), tensor[:, :, i * slots + 3], atol=1e-6, rtol=1e-5
        )


# -- Adapter+ (Steitz and Roth, CVPR 2024) ----------------------------------------------------------


@pytest.mark.parametrize("arch", ["vit", "dinov2_reg", "avgpool"])
def test_adapter_plus_matches_the_post_adapter(arch):
    """The Post-Adapter of the paper's code: x = block(x); x = x + s * (W_up GELU(W_down x + b) + b)."""
    model = vpeft.apply_method(make_vit(arch), "adapter_plus")
    perturb_delta(model)
    bare = make_vit(arch)  # the same frozen backbone
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(5))
    for block, plain in zip(model.blocks, bare.blocks):
        a = block.adapter_plus
        y = plain(x)
        expected = y + a.scaling * (F.gelu(y @ a.down.weight.t() + a.down.bias) @ a.up.weight.t() + a.up.bias)
        torch.testing.assert_close(block(x), expected, atol=1e-6, rtol=1e-5)


def test_adapter_plus_init_and_parts():
    model = vpeft.apply_method(make_vit(), "adapter_plus", bottleneck=4)
    for block in model.blocks:
        a = block.adapter_plus
        assert torch.equal(a.scaling, torch.ones(D))  # channel-wise scaling, starting at one
        for layer in (a.down, a.up):  # Houlsby init: truncated normal, std 0.01, within two std
            assert layer.weight.abs().max() <= 0.02 and layer.weight.std() > 0.004
            assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        assert not [m for m in a.modules() if isinstance(m, torch.nn.LayerNorm)]  # no norm inside
        assert a.drop_path.drop_prob == 0.1
    assert not hasattr(model.blocks[0].attn, "adapter_plus") and not hasattr(model.blocks[0].mlp, "adapter_plus")


# -- AdaLoRA (Zhang et al., ICLR 2023) ------------------------------------------------------------


def test_adalora_update_is_p_diag_lambda_q():
    """Eq. (1): W = W0 + P diag(lambda) Q (times alpha / r) on each adapted matrix, k untouched here."""
    model = vpeft.apply_method(make_vit(), "adalora", init_r=5, target_r=2, alpha=10.0, targets=["q", "v", "fc2"])
    u = model.blocks[0].attn.qkv.adalora
    assert torch.equal(u.E["q"], torch.zeros(5))  # lambda starts at zero, P and Q Gaussian
    assert 0.01 < u.P["q"].std() < 0.03 and 0.01 < u.Q["v"].std() < 0.03
    perturb_delta(model)
    qkv = model.blocks[0].attn.qkv
    x = tokens()
    w = qkv.weight.detach().clone()
    for s, (lo, hi) in {"q": (0, D), "v": (2 * D, 3 * D)}.items():
        w[lo:hi] += u.P[s] @ torch.diag(u.E[s]) @ u.Q[s] * (10.0 / 5)
    torch.testing.assert_close(qkv(x), F.linear(x, w, qkv.bias), atol=1e-5, rtol=1e-5)
    assert torch.equal(w[D : 2 * D], qkv.weight[D : 2 * D])


def test_adalora_orthogonality_regulariser():
    """gamma * mean over every P and Q of ||P^T P - I||_F and ||Q Q^T - I||_F (the reference code, peft)."""
    model = vpeft.apply_method(make_vit(), "adalora", init_r=3, target_r=2, orth_reg_weight=0.3, targets=["k", "fc1"])
    perturb_delta(model)
    terms = []
    for block in model.blocks:
        for u, s in ((block.attn.qkv.adalora, "k"), (block.mlp.fc1.adalora, "fc1")):
            terms.append((u.Q[s] @ u.Q[s].t() - torch.eye(3)).norm())
            terms.append((u.P[s].t() @ u.P[s] - torch.eye(3)).norm())
    reg = vpeft.applied_method(model).regularization(model)
    torch.testing.assert_close(reg, 0.3 * torch.stack(terms).mean())
    reg.backward()
    assert model.blocks[0].attn.qkv.adalora.P["k"].grad is not None


def test_adalora_importance_and_budget():
    """Eqs. (8)-(11): smoothed sensitivity times uncertainty, triplet scores, the cubic budget, masking."""
    model = vpeft.apply_method(
        make_vit(),
        "adalora",
        init_r=4,
        target_r=2,
        targets=["q", "fc2"],
        tinit=1,
        tfinal=2,
        deltaT=1,
        beta1=0.7,
        beta2=0.6,
    )
    method = vpeft.applied_method(model)
    perturb_delta(model)
    layers = [(u, s) for b in model.blocks for u, s in ((b.attn.qkv.adalora, "q"), (b.mlp.fc2.adalora, "fc2"))]
    params = [p for u, s in layers for p in (u.P[s], u.E[s], u.Q[s])]
    g = torch.Generator().manual_seed(0)
    avg = [torch.zeros_like(p) for p in params]
    unc = [torch.zeros_like(p) for p in params]
    total = 10
    init_bgt, target_bgt = 4 * 6, 2 * 6
    for step in range(1, 4):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=g)
            ipt = (p * p.grad).abs().detach()
            avg[i] = 0.7 * avg[i] + 0.3 * ipt
            unc[i] = 0.6 * unc[i] + 0.4 * (ipt - avg[i]).abs()
        before = [u.E[s].detach().clone() for u, s in layers]
        method.on_step(model, step, total)
        budget = (
            init_bgt
            if step <= 1
            else int((init_bgt - target_bgt) * (1 - (step - 1) / (total - 2 - 1)) ** 3 + target_bgt)
        )
        assert method.budget_schedule(step, total, init_bgt, target_bgt)[0] == budget
        score = [avg[i] * unc[i] for i in range(len(params))]
        triplet = torch.cat(
            [score[3 * j + 1] + score[3 * j + 2].mean(1) + score[3 * j].mean(0) for j in range(len(layers))]
        )
        keep = torch.zeros_like(triplet, dtype=torch.bool)
        keep[triplet.argsort(descending=True)[:budget]] = True
        expected = torch.cat(before) * keep
        assert torch.equal(torch.cat([u.E[s] for u, s in layers]), expected), step
        assert int(keep.sum()) == budget and sum(method.ranks(model).values()) <= budget
    # the final pattern: fixed at total - tfinal, re-applied afterwards
    method.on_step(model, total - 2, total)
    assert sum(int(v.sum()) for v in method.rank_pattern.values()) == target_bgt
    assert sum(method.ranks(model).values()) <= target_bgt
    pattern = {k: v.clone() for k, v in method.rank_pattern.items()}
    with torch.no_grad():
        for u, s in layers:
            u.E[s].fill_(1.0)
    method.on_step(model, total - 1, total)
    assert {k: int(v.sum()) for k, v in pattern.items()} == method.ranks(model)


def test_adalora_in_the_training_loop():
    """The loop adds the regulariser to the loss and calls the allocation after every optimizer step."""
    from vpeft.engine.loop import TrainConfig, train

    model = vpeft.apply_method(make_vit(), "adalora", init_r=3, target_r=1, tinit=1, tfinal=2)
    method = vpeft.applied_method(model)
    calls = []
    on_step, regularization = method.on_step, method.regularization
    method.on_step = lambda m, step, total: (calls.append((step, total)), on_step(m, step, total))
    method.regularization = lambda m: (calls.append("reg"), regularization(m))[1]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 5, (16,), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    cfg = TrainConfig(epochs=3, batch_size=8, progress=False, warmup_epochs=0)
    train(model, images, labels, images, labels, opt, cfg, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"))
    assert [c for c in calls if c != "reg"] == [(s, 6) for s in range(1, 7)]
    assert calls.count("reg") == 6
    assert sum(method.ranks(model).values()) == 1 * len(method.triplet_scores(model))


# -- serving: refused by name, with what to do instead ----------------------------------------------


@pytest.mark.parametrize("name", ["dora", "repadapter", "fact", "adapter_plus", "adalora"])
def test_serve_refuses_the_new_methods_clearly(name, tmp_path):
    from vpeft.serve import MultiDeltaModel, NotServableError

    path = vpeft.save_delta(vpeft.apply_method(make_vit(), name), tmp_path / f"{name}.safetensors")
    hint = "per-sample implementation of its post-block adapter" if name == "adapter_plus" else "vpeft.merge folds it"
    with pytest.raises(NotServableError, match=f"{name} delta.*{hint}.*servable methods: adapter_houlsby"):
        MultiDeltaModel.from_files(make_vit(), [path])
