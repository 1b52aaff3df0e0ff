"""AdapterFusion (Pfeiffer et al., EACL 2021) against the paper's equations and on the method contract."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, make_vit, tiny_input
from test_methods import adapter_files, perturb_delta
from timm.models.vision_transformer import VisionTransformer

import vpeft
from vpeft.engine import TrainConfig, train
from vpeft.layers import AdapterFusion, FrozenAdapter


def fusions(model):
    return [m for m in model.modules() if isinstance(m, AdapterFusion)]


def test_layer_matches_the_papers_equations():
    """o = h + sum_n softmax_n(q . k_n) v_n with q = Q h + b_q, k_n = K z_n (+ any b_k), v_n = V z_n (eq. 3-5)."""
    torch.manual_seed(0)
    d, b, n = 12, 4, 3
    adapters = [FrozenAdapter(d, b) for _ in range(n)]
    for a in adapters:
        torch.nn.init.normal_(a.up.weight, std=0.5)
    layer = AdapterFusion(d, adapters)
    with torch.no_grad():
        for p in layer.delta_parameters():
            p[1].normal_(std=0.3)
    h = torch.randn(2, 5, d)
    z = [a.up(F.gelu(a.down(h))) for a in adapters]
    q = h @ layer.query.weight.T + layer.query.bias
    b_k = torch.randn(d)  # a key bias shifts every score by q . b_k: the softmax does not see it
    scores = torch.stack([(q * (zn @ layer.key.weight.T + b_k)).sum(-1) for zn in z], dim=-1)
    s = torch.softmax(scores, dim=-1)
    expected = h + sum(s[..., i : i + 1] * (z[i] @ layer.value.weight.T) for i in range(n))
    torch.testing.assert_close(layer(h, h), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.attention(h, torch.stack(z, dim=-2)), s, atol=1e-6, rtol=1e-5)


def test_init_as_the_authors_code():
    layer = AdapterFusion(64, [FrozenAdapter(64, 4), FrozenAdapter(64, 4)])
    v = layer.value.weight
    assert torch.equal(v.diagonal(), torch.ones(64))
    off = v[~torch.eye(64, dtype=torch.bool)]
    assert torch.all(off == torch.tensor(1e-6))
    assert torch.equal(layer.query.bias, torch.zeros(64))
    for w in (layer.query.weight, layer.key.weight):
        assert 0.015 < w.std().item() < 0.025 and abs(w.mean().item()) < 0.005
    assert layer.key.bias is None and layer.value.bias is None
    assert [n for n, _ in layer.delta_parameters()] == ["query.weight", "query.bias", "key.weight", "value.weight"]


@pytest.mark.parametrize("kind", ["adapter_pfeiffer", "adapter_houlsby"])
def test_fusing_one_adapter_twice_is_that_adapter(kind, tmp_path):
    """With z_1 = z_2 the softmax weights sum to one whatever Q and K are: V = I gives the adapter's own model."""
    extra = {"train_layernorm": False} if kind == "adapter_houlsby" else {}  # fusion keeps the backbone's norms
    (path,) = adapter_files("dinov2_reg", tmp_path, kind, n=1, **extra)
    ref_model = vpeft.load_delta(make_vit("dinov2_reg"), path)
    x = tiny_input(ref_model)
    ref = ref_model(x)
    model = vpeft.apply_method(make_vit("dinov2_reg"), "adapter_fusion", adapters=[path, path])
    assert len(fusions(model)) == (2 if kind == "adapter_houlsby" else 1) * TINY["depth"]
    with torch.no_grad():
        for f in fusions(model):
            f.value.weight.copy_(torch.eye(f.value.weight.shape[0]))
            f.query.weight.normal_(std=1.0)  # the weights no longer matter
    model.head.load_state_dict(ref_model.head.state_dict())
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_frozen_adapters_hold_the_files_weights(tmp_path):
    paths = adapter_files("vit", tmp_path, "adapter_houlsby", n=2, bottleneck=3, act="relu")
    model = vpeft.apply_method(make_vit(), "adapter_fusion", adapters=paths)
    for j, path in enumerate(paths):
        tensors, _ = vpeft.read_delta(path)
        frozen = model.blocks[1].attn.fusion.adapters[j]
        assert isinstance(frozen.act, torch.nn.ReLU)
        assert torch.equal(frozen.down.weight, tensors["blocks.1.attn.adapter.down.weight"])
        assert torch.equal(frozen.up.bias, tensors["blocks.1.attn.adapter.up.bias"])
    trainable = vpeft.trainable_parameters(model)
    assert all(".fusion.adapters." not in n for n in trainable)
    assert {n.rsplit(".fusion.", 1)[-1] for n in trainable if ".fusion." in n} == {
        "query.weight",
        "query.bias",
        "key.weight",
        "value.weight",
    }


def test_trains_with_the_engine_and_leaves_the_adapters(tmp_path):
    paths = adapter_files("vit", tmp_path)
    model = vpeft.apply_method(make_vit(), "adapter_fusion", adapters=paths)
    frozen = {n: p.clone() for n, p in model.named_parameters() if ".fusion.adapters." in n}
    fusion_before = model.blocks[0].mlp.fusion.key.weight.clone()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 5, (16,), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    cfg = TrainConfig(epochs=4, batch_size=8, warmup_epochs=0, progress=False)
    result = train(model, images, labels, images, labels, opt, cfg, [0.5] * 3, [0.5] * 3, torch.device("cpu"))
    assert result.epochs[-1].train_loss < result.epochs[0].train_loss
    assert not torch.equal(model.blocks[0].mlp.fusion.key.weight, fusion_before)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_delta_file_holds_the_fusion_and_names_the_adapters(tmp_path):
    paths = adapter_files("vit", tmp_path, n=3)
    model = vpeft.apply_method(make_vit(), "adapter_fusion", adapters=paths)
    perturb_delta(model)
    x = tiny_input(model)
    path = vpeft.save_delta(model, tmp_path / "fusion.safetensors")
    tensors, info = vpeft.read_delta(path)
    assert all(".fusion.adapters." not in k for k in tensors)
    assert info["config"]["adapters"] == paths
    from vpeft.methods.adapter_fusion import sha256

    assert info["config"]["checksums"] == [sha256(p) for p in paths]
    fresh = vpeft.load_delta(make_vit(), path)
    assert torch.equal(fresh(x), model(x))


def test_a_changed_adapter_file_is_refused(tmp_path):
    paths = adapter_files("vit", tmp_path)
    model = vpeft.apply_method(make_vit(), "adapter_fusion", adapters=paths)
    path = vpeft.save_delta(model, tmp_path / "fusion.safetensors")
    other = vpeft.apply_method(make_vit(), "adapter_pfeiffer")
    perturb_delta(other, seed=99)
    vpeft.save_delta(other, paths[1])  # same path, other weights
    with pytest.raises(vpeft.DataError, match=r"adapter file .*-1.safetensors changed since this fusion was set up"):
        vpeft.load_delta(make_vit(), path)


def test_bad_adapter_files(tmp_path):
    pfeiffer = adapter_files("vit", tmp_path)
    houlsby = adapter_files("vit", tmp_path, "adapter_houlsby", n=1)
    lora = str(vpeft.save_delta(vpeft.apply_method(make_vit(), "lora"), tmp_path / "lora.safetensors"))
    with pytest.raises(vpeft.DataError, match="holds a lora delta; adapter_fusion fuses adapter_houlsby or adapter_pf"):
        vpeft.apply_method(make_vit(), "adapter_fusion", adapters=[pfeiffer[0], lora])
    with pytest.raises(vpeft.DataError, match="adapters of one kind; got adapter_houlsby, adapter_pfeiffer"):
        vpeft.apply_method(make_vit(), "adapter_fusion", adapters=[pfeiffer[0], houlsby[0]])
    with pytest.raises(FileNotFoundError, match="no delta file at .*missing.safetensors"):
        vpeft.apply_method(make_vit(), "adapter_fusion", adapters=[pfeiffer[0], str(tmp_path / "missing.safetensors")])
    shallow = VisionTransformer(**{**TINY, "depth": 2})
    with pytest.raises(vpeft.DataError, match="trained on a deeper backbone than this one \\(2 blocks\\)"):
        vpeft.apply_method(shallow, "adapter_fusion", adapters=pfeiffer)
    assert not fusions(shallow) and vpeft.applied_method(shallow) is None  # refused before changing the model
    deeper = VisionTransformer(**{**TINY, "depth": 4})
    with pytest.raises(vpeft.DataError, match="no complete adapter at blocks.3.mlp"):
        vpeft.apply_method(deeper, "adapter_fusion", adapters=pfeiffer)
    wider = VisionTransformer(**{**TINY, "embed_dim": 60, "num_heads": 3})
    with pytest.raises(vpeft.DataError, match="width 48 at blocks.0.mlp.adapter; this model's is 60"):
        vpeft.apply_method(wider, "adapter_fusion", adapters=pfeiffer)


def test_not_mergeable(tmp_path):
    model = vpeft.apply_method(make_vit(), "adapter_fusion", adapters=adapter_files("vit", tmp_path))
    with pytest.raises(vpeft.NotMergeableError, match="adapter_fusion cannot be merged"):
        vpeft.merge(model)
