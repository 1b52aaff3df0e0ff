"""Each method against a direct computation of what its paper describes."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, make_vit, tiny_input
from test_methods import perturb_delta
from timm.models.vision_transformer import VisionTransformer

import vpeft


def embed(model, x):
    return model.norm_pre(model._pos_embed(model.patch_embed(x)))


def head(model, tokens):
    return model.forward_head(model.norm(tokens))


@pytest.mark.parametrize("arch", ["vit", "dinov2_reg", "avgpool"])
@pytest.mark.parametrize("deep", [False, True])
def test_vpt_matches_direct_computation(deep, arch):
    model = vpeft.apply_method(make_vit(arch), "vpt_deep" if deep else "vpt_shallow", num_tokens=4)
    perturb_delta(model)
    x = tiny_input(model)
    prompts = model.blocks.prompt_embeddings
    p, n, B = model.num_prefix_tokens, 4, x.shape[0]
    h = embed(model, x)
    assert model.blocks.prompt_embeddings.shape == ((3 if deep else 1), 4, 48)
    h = torch.cat([h[:, :p], prompts[0].expand(B, -1, -1), h[:, p:]], 1)
    for i, block in enumerate(model.blocks):
        if deep and i > 0:
            h = torch.cat([h[:, :p], prompts[i].expand(B, -1, -1), h[:, p + n :]], 1)
        h = block(h)
    h = torch.cat([h[:, :p], h[:, p + n :]], 1)  # prompts never reach the pooled representation
    torch.testing.assert_close(model(x), head(model, h), rtol=0, atol=0)
    assert model.forward_features(x).shape[1] == make_vit(arch).forward_features(x).shape[1]


def test_vpt_init_bound():
    model = make_vit()
    vpeft.apply_method(model, "vpt_deep", num_tokens=50)
    bound = (6 / (3 * 8 * 8 + 48)) ** 0.5
    e = model.blocks.prompt_embeddings
    assert e.abs().max() <= bound and e.abs().max() > 0.9 * bound


def test_vpt_dropout_only_in_training():
    model = vpeft.apply_method(make_vit(), "vpt_shallow", dropout=0.5)
    x = tiny_input(model)
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    assert not torch.equal(a, model(x))


@pytest.mark.parametrize("arch", ["vit", "dinov2_reg"])
def test_adaptformer_matches_direct_computation(arch):
    ref = make_vit(arch)
    model = vpeft.apply_method(make_vit(arch), "adaptformer", bottleneck=6, scale=0.3)
    perturb_delta(model)
    x = tiny_input(model)
    h = embed(ref, x)
    for block, tuned in zip(ref.blocks, model.blocks):
        h = h + block.ls1(block.attn(block.norm1(h)))
        a = tuned.adapter
        adapt = F.linear(F.relu(F.linear(h, a.down.weight, a.down.bias)), a.up.weight, a.up.bias) * 0.3
        h = h + block.ls2(block.mlp(block.norm2(h))) + adapt
    torch.testing.assert_close(model(x), head(model, h), atol=1e-5, rtol=1e-5)


def test_adaptformer_learnable_scale_and_dropout():
    model = vpeft.apply_method(make_vit(), "adaptformer", bottleneck=4, learnable_scale=True)
    scale = model.blocks[0].adapter.scale
    assert isinstance(scale, torch.nn.Parameter) and scale.item() == 1.0 and scale.requires_grad
    assert model.blocks[0].adapter.dropout.p == 0.1
    fixed = vpeft.apply_method(make_vit(), "adaptformer")
    assert fixed.blocks[0].adapter.scale == 0.1
    down = fixed.blocks[0].adapter.down
    assert down.bias.abs().sum() == 0 and down.weight.abs().sum() > 0
    assert fixed.blocks[0].adapter.up.weight.abs().sum() == 0


def test_lora_leaves_k_untouched():
    model = vpeft.apply_method(make_vit(), "lora", r=2)
    perturb_delta(model)
    d = 48
    before = model.blocks[1].attn.qkv.weight.clone()
    lora = model.blocks[1].attn.qkv.lora
    expected_q = before[:d] + lora.B["q"] @ lora.A["q"]
    expected_v = before[2 * d :] + lora.B["v"] @ lora.A["v"]
    vpeft.merge(model)
    after = model.blocks[1].attn.qkv.weight
    assert torch.equal(after[d : 2 * d], before[d : 2 * d])
    torch.testing.assert_close(after[:d], expected_q)
    torch.testing.assert_close(after[2 * d :], expected_v)


def test_lora_scaling_is_alpha_over_r():
    model = vpeft.apply_method(make_vit(), "lora", r=4, alpha=16, targets=["proj"])
    lora = model.blocks[0].attn.proj.lora
    assert lora.scaling == 4.0
    perturb_delta(model)
    torch.testing.assert_close(lora.delta_weight(), 4.0 * lora.B["proj"] @ lora.A["proj"])
    assert torch.all(lora.B["proj"] != 0)
    fresh = vpeft.apply_method(make_vit(), "lora")
    assert fresh.blocks[0].attn.qkv.lora.B["q"].abs().sum() == 0  # B starts at zero


def test_ssf_init_statistics():
    torch.manual_seed(0)
    model = vpeft.apply_method(make_vit(), "ssf")
    scales = torch.cat([m.scale for m in model.modules() if isinstance(m, vpeft.layers.ScaleShift)])
    shifts = torch.cat([m.shift for m in model.modules() if isinstance(m, vpeft.layers.ScaleShift)])
    assert abs(scales.mean().item() - 1) < 0.005 and 0.015 < scales.std().item() < 0.025
    assert abs(shifts.mean().item()) < 0.005 and 0.015 < shifts.std().item() < 0.025


def test_ssf_placement():
    model = vpeft.apply_method(make_vit("avgpool"), "ssf")
    hosts = {n.rsplit(".ssf", 1)[0] for n, m in model.named_modules() if isinstance(m, vpeft.layers.ScaleShift)}
    per_block = {"norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"}
    assert hosts == {"patch_embed.proj", "fc_norm"} | {f"blocks.{i}.{p}" for i in range(3) for p in per_block}


def test_bitfit_trains_every_bias_and_nothing_else():
    model = vpeft.apply_method(make_vit(), "bitfit")
    names = set(vpeft.trainable_parameters(model)) - {"head.weight", "head.bias"}
    biases = {n for n, _ in make_vit().named_parameters() if n.endswith(".bias") and not n.startswith("head")}
    assert names == biases


# -- adapters, prefix tuning and IA3 against plain tensor maths ---------------------------------

ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def make_qk_norm_vit(seed: int = 0) -> VisionTransformer:
    """A tiny ViT with timm's q_norm/k_norm (LayerNorm on each head's queries and keys)."""
    torch.manual_seed(seed)
    return VisionTransformer(**TINY, qk_norm=True).eval()


def make(arch: str) -> VisionTransformer:
    return make_qk_norm_vit() if arch == "qk_norm" else make_vit(arch)


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads * hd] -> [B, heads, N, hd]."""
    B, N, D = t.shape
    return t.reshape(B, N, heads, D // heads).transpose(1, 2)


def reference_attention(attn, x, prefix_k=None, prefix_v=None, k_scale=None, v_scale=None, mask=None):
    """softmax(Q K^T / sqrt(d)) V per head with timm Attention's weights, written out by hand.

    ``prefix_k``/``prefix_v`` ([P, D]) are concatenated before the keys and values after k_norm;
    ``k_scale``/``v_scale`` ([D]) multiply the keys and values as qkv emits them; ``mask`` is a
    boolean [N, P + N] (True: attend).
    """
    B, N, _ = x.shape
    H, D = attn.num_heads, attn.num_heads * attn.head_dim
    qkv = x @ attn.qkv.weight.T
    if attn.qkv.bias is not None:
        qkv = qkv + attn.qkv.bias
    q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
    if k_scale is not None:
        k, v = k * k_scale, v * v_scale
    q, k, v = split_heads(q, H), split_heads(k, H), split_heads(v, H)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if prefix_k is not None:
        k = torch.cat([split_heads(prefix_k.expand(B, -1, -1), H), k], dim=2)
        v = torch.cat([split_heads(prefix_v.expand(B, -1, -1), H), v], dim=2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, N, D)
    return out @ attn.proj.weight.T + attn.proj.bias


def reference_forward(ref, tuned, x, attn_fn, mlp_fn):
    """The backbone's forward with each block's attention and MLP computed by the given functions.

    ``ref`` is the untouched backbone; the head (trained, so perturbed) is ``tuned``'s.
    """
    h = embed(ref, x)
    for i, block in enumerate(ref.blocks):
        h = h + block.ls1(attn_fn(i, block, block.norm1(h)))
        h = h + block.ls2(mlp_fn(i, block, block.norm2(h)))
    return head(tuned, h)


def plain_mlp(i, block, z):
    return block.mlp.fc2(F.gelu(block.mlp.fc1(z)))


@pytest.mark.parametrize("arch", ["vit", "dinov2_reg", "avgpool"])
@pytest.mark.parametrize("name", ["adapter_houlsby", "adapter_pfeiffer"])
@pytest.mark.parametrize("act", ["gelu", "relu", "silu"])
def test_serial_adapters_match_direct_computation(name, act, arch):
    ref = make_vit(arch)
    model = vpeft.apply_method(make_vit(arch), name, bottleneck=5, act=act)
    perturb_delta(model)
    x = tiny_input(model)
    with torch.no_grad():  # Houlsby trains the blocks' LayerNorms (train_layernorm): the reference uses the tuned ones
        for r, b in zip(ref.blocks, model.blocks):
            r.norm1.load_state_dict(b.norm1.state_dict())
            r.norm2.load_state_dict(b.norm2.state_dict())

    def adapt(h, a):
        return h + F.linear(ACTS[act](F.linear(h, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)

    def attn_fn(i, block, z):
        out = reference_attention(block.attn, z)
        return adapt(out, model.blocks[i].attn.adapter) if name == "adapter_houlsby" else out

    def mlp_fn(i, block, z):
        return adapt(plain_mlp(i, block, z), model.blocks[i].mlp.adapter)

    torch.testing.assert_close(model(x), reference_forward(ref, model, x, attn_fn, mlp_fn), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["adapter_houlsby", "adapter_pfeiffer"])
def test_serial_adapter_placement_and_init(name):
    model = vpeft.apply_method(make_vit(), name)
    sites = ("attn", "mlp") if name == "adapter_houlsby" else ("mlp",)
    hosts = {n for n, m in model.named_modules() if isinstance(m, vpeft.layers.SerialAdapter)}
    assert hosts == {f"blocks.{i}.{s}.adapter" for i in range(3) for s in sites}
    a = model.blocks[0].mlp.adapter
    assert a.down.weight.shape == (8, 48) and a.up.weight.shape == (48, 8)  # default bottleneck 8
    assert isinstance(a.act, torch.nn.GELU)
    assert a.up.weight.abs().sum() == 0 and a.up.bias.abs().sum() == 0
    assert a.down.bias.abs().sum() == 0 and a.down.weight.abs().sum() > 0
    names = set(vpeft.trainable_parameters(model)) - {"head.weight", "head.bias"}
    assert "blocks.2.mlp.adapter.up.weight" in names
    norms = {f"blocks.{i}.{n}.{p}" for i in range(3) for n in ("norm1", "norm2") for p in ("weight", "bias")}
    assert {n for n in names if ".adapter." not in n} == (norms if name == "adapter_houlsby" else set())


def set_fused(model, fused: bool) -> None:
    for block in model.blocks:
        block.attn.fused_attn = fused


@pytest.mark.parametrize("arch", ["vit", "dinov2_reg", "avgpool", "no_qkv_bias", "qk_norm"])
@pytest.mark.parametrize("fused", [True, False])
def test_prefix_matches_direct_computation(arch, fused):
    ref = make(arch)
    model = vpeft.apply_method(make(arch), "prefix", num_tokens=4)
    perturb_delta(model)
    set_fused(model, fused)
    x = tiny_input(model)
    layers = [b.attn for b in model.blocks]
    assert layers[0].prefix_k.shape == layers[0].prefix_v.shape == (4, 48)

    def attn_fn(i, block, z):
        return reference_attention(block.attn, z, layers[i].prefix_k, layers[i].prefix_v)

    out = model(x)
    torch.testing.assert_close(out, reference_forward(ref, model, x, attn_fn, plain_mlp), atol=1e-5, rtol=1e-5)
    # queries are unchanged: the token count after the blocks is the backbone's
    assert model.forward_features(x).shape == ref.forward_features(x).shape
    # the prefixes matter: without them the output is the backbone's, not this one
    assert not torch.allclose(out, ref(x), atol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_prefix_attention_masks(fused):
    """An attention mask (or is_causal) covers the tokens; every query still sees every prefix."""
    model = vpeft.apply_method(make_vit(), "prefix", num_tokens=3)
    perturb_delta(model)
    attn = model.blocks[1].attn
    attn.fused_attn = fused
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 48, generator=g)
    mask = (torch.rand(6, 6, generator=g) > 0.5) | torch.eye(6, dtype=torch.bool)
    full = torch.cat([torch.ones(6, 3, dtype=torch.bool), mask], dim=1)
    expected = reference_attention(attn, x, attn.prefix_k, attn.prefix_v, mask=full)
    torch.testing.assert_close(attn(x, attn_mask=mask), expected, atol=1e-5, rtol=1e-5)
    additive = torch.zeros(6, 6).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(attn(x, attn_mask=additive), expected, atol=1e-5, rtol=1e-5)
    causal = torch.cat([torch.ones(6, 3, dtype=torch.bool), torch.ones(6, 6, dtype=torch.bool).tril()], dim=1)
    expected = reference_attention(attn, x, attn.prefix_k, attn.prefix_v, mask=causal)
    torch.testing.assert_close(attn(x, is_causal=True), expected, atol=1e-5, rtol=1e-5)


def train_steps(model, steps: int = 3) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = tiny_input(model, batch=4, seed=5)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
    model.eval()


def test_prefix_reparam_train_save_load(tmp_path):
    model = vpeft.apply_method(make_vit("dinov2_reg"), "prefix", num_tokens=3, reparam=True, reparam_hidden=16)
    encoder = model.prefix_encoder
    assert isinstance(encoder, vpeft.layers.PrefixEncoder) and all(b.attn.encoder is encoder for b in model.blocks)
    assert not any(n.startswith("blocks.") and "prefix" in n for n, _ in model.named_parameters())
    start = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    train_steps(model)
    assert all(not torch.equal(start[n], p) for n, p in encoder.named_parameters()), "the MLP trains"
    x = tiny_input(model)
    ref = model(x)

    # each layer's prefixes are its slice of one MLP's output: tanh(P' W1^T + b1) W2^T + b2
    all_layers = torch.tanh(encoder.embedding @ encoder.fc1.weight.T + encoder.fc1.bias)
    all_layers = (all_layers @ encoder.fc2.weight.T + encoder.fc2.bias).view(3, 3, 2, 48)  # P, layer, k/v, D

    path = vpeft.save_delta(model, tmp_path / "prefix.safetensors")
    tensors, info = vpeft.read_delta(path)
    assert info["config"] == {"num_tokens": 3, "reparam": False, "reparam_hidden": 16}
    prefixes = {f"blocks.{i}.attn.prefix_{kv}" for i in range(3) for kv in "kv"}
    assert set(tensors) == prefixes | {"head.weight", "head.bias"}
    for i in range(3):
        torch.testing.assert_close(tensors[f"blocks.{i}.attn.prefix_k"], all_layers[:, i, 0])
        torch.testing.assert_close(tensors[f"blocks.{i}.attn.prefix_v"], all_layers[:, i, 1])
    payload = sum(t.numel() for t in tensors.values())
    assert payload == 3 * 2 * 3 * 48 + sum(p.numel() for p in model.get_classifier().parameters())
    assert model.prefix_encoder is encoder  # saving leaves the training-time model as it was

    fresh = vpeft.load_delta(make_vit("dinov2_reg"), path)
    assert not hasattr(fresh, "prefix_encoder") and fresh.blocks[0].attn.encoder is None
    assert vpeft.applied_method(fresh).config.reparam is False
    assert torch.equal(fresh(x), ref)

    # folding in place gives the same plain model
    method = vpeft.applied_method(model)
    method.fold(model)
    assert not hasattr(model, "prefix_encoder") and method.config.reparam is False
    assert torch.equal(model(x), ref)
    assert set(vpeft.trainable_parameters(model)) == set(tensors)
    assert all(p.requires_grad for p in vpeft.trainable_parameters(model).values())


def test_prefix_reparam_deepcopy_keeps_one_shared_encoder():
    model = vpeft.apply_method(make_vit(), "prefix", num_tokens=2, reparam=True, reparam_hidden=8)
    x = tiny_input(model)
    twin = copy.deepcopy(model)
    assert twin.prefix_encoder is not model.prefix_encoder
    assert all(b.attn.encoder is twin.prefix_encoder for b in twin.blocks)
    assert torch.equal(twin(x), model(x))


@pytest.mark.parametrize("arch", ["vit", "dinov2_reg", "no_qkv_bias", "qk_norm"])
def test_ia3_matches_direct_computation(arch):
    ref = make(arch)
    model = vpeft.apply_method(make(arch), "ia3")
    perturb_delta(model)
    x = tiny_input(model)

    def attn_fn(i, block, z):
        s = model.blocks[i].attn.qkv.ia3
        return reference_attention(block.attn, z, k_scale=s.k, v_scale=s.v)

    def mlp_fn(i, block, z):
        l_ff = model.blocks[i].mlp.act.ia3.ff
        return block.mlp.fc2(F.gelu(block.mlp.fc1(z)) * l_ff)

    expected = reference_forward(ref, model, x, attn_fn, mlp_fn)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    vpeft.merge(model)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_ia3_merge_changes_only_k_v_rows_and_fc2_columns():
    model = vpeft.apply_method(make_vit(), "ia3")
    perturb_delta(model)
    d = 48
    scales = [(b.attn.qkv.ia3.k.detach().clone(), b.attn.qkv.ia3.v.detach().clone()) for b in model.blocks]
    hidden = [b.mlp.act.ia3.ff.detach().clone() for b in model.blocks]
    assert model.blocks[0].attn.qkv.ia3.k.shape == (d,) and hidden[0].shape == (96,)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    vpeft.merge(model)
    after = dict(model.named_parameters())
    assert set(after) == set(before) | {"head.weight", "head.bias"}
    touched = {f"blocks.{i}.{p}" for i in range(3) for p in ("attn.qkv.weight", "attn.qkv.bias", "mlp.fc2.weight")}
    for n, p in before.items():
        if n not in touched:
            assert torch.equal(after[n], p), n
    for i, block in enumerate(model.blocks):
        (lk, lv), lff = scales[i], hidden[i]
        w, b = before[f"blocks.{i}.attn.qkv.weight"], before[f"blocks.{i}.attn.qkv.bias"]
        qkv = block.attn.qkv
        assert torch.equal(qkv.weight[:d], w[:d]) and torch.equal(qkv.bias[:d], b[:d])  # queries untouched
        torch.testing.assert_close(qkv.weight[d : 2 * d], w[d : 2 * d] * lk[:, None])
        torch.testing.assert_close(qkv.weight[2 * d :], w[2 * d :] * lv[:, None])
        torch.testing.assert_close(qkv.bias[d:], torch.cat([b[d : 2 * d] * lk, b[2 * d :] * lv]))
        fc2 = before[f"blocks.{i}.mlp.fc2.weight"]
        torch.testing.assert_close(block.mlp.fc2.weight, fc2 * lff[None, :])
        assert not torch.equal(block.mlp.fc2.weight, fc2)
        assert type(block.mlp.act) is torch.nn.GELU and not block.mlp.act._modules


def test_lora_pairs_each_segments_a_with_its_own_b():
    """With q, k and v adapted, the update of q's rows is B_q @ A_q (its own named factors), and so on."""
    model = vpeft.apply_method(make_vit(), "lora", targets=["q", "k", "v"], r=2)
    lora = model.blocks[0].attn.qkv.lora
    d = model.embed_dim
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in ("q", "k", "v"):
            lora.A[s].copy_(torch.randn(lora.A[s].shape, generator=g))
            lora.B[s].copy_(torch.randn(lora.B[s].shape, generator=g))
    expected = torch.cat([lora.B[s] @ lora.A[s] for s in ("q", "k", "v")]) * lora.scaling
    torch.testing.assert_close(lora.delta_weight(), expected)
    assert expected.shape == (3 * d, d)
