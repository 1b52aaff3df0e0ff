"""Houlsby adapters train their blocks' LayerNorms (``train_layernorm``), as the reference code does:
the trainable set, the delta file, serving mixed batches, AdapterFusion and composition over such deltas."""

import pytest
import torch
from conftest import ARCHS, TINY, make_vit, tiny_input
from test_methods import adapter_files, perturb_delta
from torch import nn

import vpeft
from vpeft import compose
from vpeft.serve import MultiDeltaModel

D, DEPTH = TINY["embed_dim"], TINY["depth"]
NORM_KEYS = {f"blocks.{i}.{n}.{p}" for i in range(DEPTH) for n in ("norm1", "norm2") for p in ("weight", "bias")}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapter_keys(sites=("attn", "mlp")) -> set[str]:
    return {
        f"blocks.{i}.{s}.adapter.{layer}.{p}"
        for i in range(DEPTH)
        for s in sites
        for layer in ("down", "up")
        for p in ("weight", "bias")
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_layernorms_train_by_default(arch):
    model = vpeft.apply_method(make_vit(arch), "adapter_houlsby")
    assert vpeft.applied_method(model).config.train_layernorm is True
    trainable = vpeft.trainable_parameters(model)
    assert set(trainable) == adapter_keys() | NORM_KEYS | {"head.weight", "head.bias"}
    params = dict(model.named_parameters())
    for name in NORM_KEYS:
        assert trainable[name] is params[name] and params[name].requires_grad, name
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "blocks.0.attn.qkv.weight" in frozen and "patch_embed.proj.weight" in frozen
    final = "fc_norm.weight" if arch == "avgpool" else "norm.weight"
    assert final in frozen, "only the blocks' LayerNorms train, not the final norm"
    # gradients reach them
    x = tiny_input(model)
    model(x).sum().backward()
    assert model.blocks[0].norm1.weight.grad is not None and model.blocks[-1].norm2.bias.grad is not None
    assert model.blocks[0].attn.qkv.weight.grad is None


def test_train_layernorm_false_is_the_adapters_only():
    model = vpeft.apply_method(make_vit(), "adapter_houlsby", train_layernorm=False)
    assert set(vpeft.trainable_parameters(model)) == adapter_keys() | {"head.weight", "head.bias"}
    assert not any(model.blocks[i].norm1.weight.requires_grad for i in range(DEPTH))
    pfeiffer = vpeft.apply_method(make_vit(), "adapter_pfeiffer")  # shares the adapter, not the config field
    assert not hasattr(vpeft.applied_method(pfeiffer).config, "train_layernorm")
    assert set(vpeft.trainable_parameters(pfeiffer)) == adapter_keys(("mlp",)) | {"head.weight", "head.bias"}
    with pytest.raises(vpeft.UnknownNameError):
        vpeft.apply_method(make_vit(), "adapter_pfeiffer", train_layernorm=True)


def test_config_checks():
    with pytest.raises(vpeft.ConfigError, match="train_layernorm of adapter_houlsby must be true or false"):
        vpeft.apply_method(make_vit(), "adapter_houlsby", train_layernorm="yes")


def test_a_block_without_layernorm_is_refused_unless_adapters_only():
    model = make_vit()
    model.blocks[1].norm2 = nn.Identity()
    with pytest.raises(vpeft.UnsupportedModelError, match=r"blocks\.1\.norm2 to be a LayerNorm.*train_layernorm=false"):
        vpeft.apply_method(model, "adapter_houlsby")
    assert not any(hasattr(b.attn, "adapter") for b in model.blocks), "a refused model is left as it was"
    vpeft.apply_method(model, "adapter_houlsby", train_layernorm=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_delta_file_round_trip(arch, tmp_path):
    model = vpeft.apply_method(make_vit(arch), "adapter_houlsby", bottleneck=3)
    perturb_delta(model)
    x = tiny_input(model)
    with torch.no_grad():
        out = model(x)
    path = vpeft.save_delta(model, tmp_path / "houlsby.safetensors")
    tensors, info = vpeft.read_delta(path)
    assert info["config"] == {"bottleneck": 3, "act": "gelu", "train_layernorm": True}
    assert set(tensors) == adapter_keys() | NORM_KEYS | {"head.weight", "head.bias"}, "only what trained"
    assert torch.equal(tensors["blocks.2.norm1.weight"], model.blocks[2].norm1.weight)
    assert not torch.equal(tensors["blocks.2.norm1.weight"], make_vit(arch).blocks[2].norm1.weight)

    loaded = vpeft.load_delta(make_vit(arch), path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out, atol=0, rtol=0)
    # every other backbone tensor is bitwise the pretrained one
    bare = dict(make_vit(arch).named_parameters())
    delta = set(vpeft.trainable_parameters(loaded))
    for name, p in loaded.named_parameters():
        if name in bare and name not in delta:
            assert torch.equal(p, bare[name]), name
    assert vpeft.count_parameters(loaded).trainable_excl_head == 2 * DEPTH * (2 * D * 3 + 3 + D) + 4 * D * DEPTH


def test_adapters_only_file_round_trip(tmp_path):
    model = vpeft.apply_method(make_vit(), "adapter_houlsby", train_layernorm=False)
    perturb_delta(model)
    path = vpeft.save_delta(model, tmp_path / "a.safetensors")
    tensors, info = vpeft.read_delta(path)
    assert info["config"]["train_layernorm"] is False
    assert not NORM_KEYS & set(tensors)
    loaded = vpeft.load_delta(make_vit(), path)
    x = tiny_input(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# -- serving --------------------------------------------------------------------------------------------


def task_file(tmp_path, task: int, classes: int, **config):
    model = make_vit()
    model.reset_classifier(classes)
    vpeft.apply_method(model, "adapter_houlsby", **config)
    g = torch.Generator().manual_seed(200 + task)
    with torch.no_grad():
        for p in vpeft.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return vpeft.save_delta(model.eval(), tmp_path / f"t{task}.safetensors")


def reference(path, classes: int, x):
    model = make_vit()
    model.reset_classifier(classes)
    vpeft.load_delta(model, path)
    with torch.no_grad():
        return model.eval()(x)


CONFIGS = [({"bottleneck": 4}, 5), ({"bottleneck": 6, "train_layernorm": False}, 3), ({"bottleneck": 4}, 4)]


@pytest.mark.parametrize("strategy", ["gather", "segment"])
@pytest.mark.parametrize("order", [(0, 1, 2), (1, 0, 2)])  # (1, 0, 2): a delta without trained norms comes first
def test_serving_mixes_trained_and_backbone_layernorms(strategy, order, tmp_path):
    files = {t: task_file(tmp_path, t, CONFIGS[t][1], **CONFIGS[t][0]) for t in range(3)}
    backbone = make_vit()
    served = MultiDeltaModel.from_files(backbone, [files[t] for t in order], strategy=strategy)
    ids = {t: served.tasks[f"t{t}"] for t in range(3)}
    x = tiny_input(backbone, batch=6)
    refs = {t: reference(files[t], CONFIGS[t][1], x) for t in range(3)}
    mixed = [0, 1, 2, 1, 0, 2]
    with torch.no_grad():
        out = served(x, [ids[t] for t in mixed])
        for i, t in enumerate(mixed):
            torch.testing.assert_close(out[i, : CONFIGS[t][1]], refs[t][i], atol=1e-5, rtol=1e-4)
        for t in range(3):  # one task: that task's own arithmetic, to the bit
            single = served(x, ids[t])
            assert torch.equal(single[:, : CONFIGS[t][1]], refs[t]), t
        # a layernorm task detached: the others still right; with none left the norms run bare again
        served.detach(ids[0])
        served.detach(ids[2])
        assert not any(norm._forward_hooks for b in backbone.blocks for norm in (b.norm1, b.norm2))
        assert torch.equal(served(x, ids[1])[:, :3], refs[1])
        served.attach(files[2])
        assert all(b.norm1._forward_hooks for b in backbone.blocks)
        out = served(x, [served.tasks["t1"], served.tasks["t2"]] * 3)
        for i in range(6):
            t = (1, 2)[i % 2]
            torch.testing.assert_close(out[i, : CONFIGS[t][1]], refs[t][i], atol=1e-5, rtol=1e-4)
    served.close()
    assert not any(m._forward_hooks for m in backbone.modules())
    bare = make_vit()
    for (name, p), q in zip(backbone.named_parameters(), bare.parameters()):
        assert torch.equal(p, q), name


def test_serving_refuses_a_file_without_its_layernorms(tmp_path):
    """A file whose config says train_layernorm but lacks the tensors is refused, never served with the backbone's."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = task_file(tmp_path, 0, 5)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = {k: v for k, v in load_file(str(path)).items() if k not in NORM_KEYS}
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(vpeft.serve.IncompatibleDeltaError, match=r"missing \['blocks\.0\.norm1\.bias'"):
        MultiDeltaModel.from_files(make_vit(), [tmp_path / "cut.safetensors"])


# -- AdapterFusion and composition -----------------------------------------------------------------------


def test_fusion_keeps_the_backbones_layernorms(tmp_path):
    paths = adapter_files("vit", tmp_path, "adapter_houlsby", n=2, bottleneck=3)
    assert set(vpeft.read_delta(paths[0])[0]) >= NORM_KEYS, "the adapter files hold their tasks' LayerNorms"
    model = vpeft.apply_method(make_vit(), "adapter_fusion", adapters=paths)
    bare = make_vit()
    for i in range(DEPTH):
        for n in ("norm1", "norm2"):
            norm, ref = getattr(model.blocks[i], n), getattr(bare.blocks[i], n)
            assert torch.equal(norm.weight, ref.weight) and torch.equal(norm.bias, ref.bias)
            assert not norm.weight.requires_grad and not norm.bias.requires_grad
    assert not NORM_KEYS & set(vpeft.trainable_parameters(model))
    path = vpeft.save_delta(model, tmp_path / "fusion.safetensors")
    assert not NORM_KEYS & set(vpeft.read_delta(path)[0])


def test_fusing_one_layernorm_adapter_twice_is_its_adapters_on_the_backbones_norms(tmp_path):
    (path,) = adapter_files("vit", tmp_path, "adapter_houlsby", n=1)
    ref_model = vpeft.load_delta(make_vit(), path)
    bare = make_vit()
    with torch.no_grad():  # the adapters of the file on the backbone's own LayerNorms
        for b, r in zip(ref_model.blocks, bare.blocks):
            b.norm1.load_state_dict(r.norm1.state_dict())
            b.norm2.load_state_dict(r.norm2.state_dict())
    model = vpeft.apply_method(make_vit(), "adapter_fusion", adapters=[path, path])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, vpeft.layers.AdapterFusion):
                m.value.weight.copy_(torch.eye(D))
    model.head.load_state_dict(ref_model.head.state_dict())
    x = tiny_input(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_model(x), atol=1e-5, rtol=1e-5)


def test_delta_space_composition_carries_the_layernorms():
    base = make_vit()
    deltas = []
    for seed in (1, 2):
        model = vpeft.apply_method(make_vit(), "adapter_houlsby", bottleneck=3)
        perturb_delta(model, seed)
        deltas.append(compose.TaskDelta.from_model(model))
    vectors = [compose.task_vector(d, base, space="delta") for d in deltas]
    assert set(vectors[0].tensors) >= NORM_KEYS
    merged = compose.apply_vector(base, compose.weighted_average(vectors))
    for name in ("blocks.0.norm1.weight", "blocks.2.norm2.bias"):
        expected = (deltas[0].tensors[name] + deltas[1].tensors[name]) / 2
        torch.testing.assert_close(dict(merged.named_parameters())[name], expected)
    plain = vpeft.apply_method(make_vit(), "adapter_houlsby", bottleneck=3, train_layernorm=False)
    with pytest.raises(compose.IncompatibleDeltasError, match="different configs in delta space"):
        compose.add(vectors[0], compose.task_vector(compose.TaskDelta.from_model(plain), base, space="delta"))


def test_a_file_from_before_the_field_loads_as_adapters_only(tmp_path):
    """A Houlsby delta file written before ``train_layernorm`` existed holds no such field and no norms: it
    was trained with the adapters only, and loads so (not as a file missing its norms)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = vpeft.apply_method(make_vit(), "adapter_houlsby", train_layernorm=False)
    perturb_delta(model)
    path = vpeft.save_delta(model, tmp_path / "new.safetensors")
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    del config["train_layernorm"]
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**meta, "config": json.dumps(config)})
    loaded = vpeft.load_delta(make_vit(), old)
    assert vpeft.applied_method(loaded).config.train_layernorm is False
    x = tiny_input(model)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)
