"""The method contract, checked for every registered method on tiny ViTs of each variant."""

import copy
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, make_vit, tiny_input
from torch import nn

import vpeft
from vpeft.layers import Delta

METHODS = vpeft.list_methods()
# methods whose delta is zero at init (or that change no computation), so outputs equal the backbone's
IDENTITY_AT_INIT = {
    "linear": {},
    "full": {},
    "bitfit": {},
    "lora": {"targets": ["q", "k", "v", "proj", "fc1", "fc2"]},
    "adaptformer": {},
    "ssf": {"init": "identity"},
    "adapter_houlsby": {},
    "adapter_pfeiffer": {},
    "ia3": {},
    "dora": {"targets": ["q", "k", "v", "proj", "fc1", "fc2"]},
    "repadapter": {},
    "fact": {},
    "adalora": {},
}
MERGEABLE = {"linear", "full", "bitfit", "lora", "ssf", "ia3", "dora", "repadapter", "fact", "adalora"}


def test_list_methods():
    assert METHODS == [
        "adalora",
        "adapter_fusion",
        "adapter_houlsby",
        "adapter_pfeiffer",
        "adapter_plus",
        "adaptformer",
        "bitfit",
        "dora",
        "fact",
        "full",
        "ia3",
        "linear",
        "lora",
        "prefix",
        "repadapter",
        "ssf",
        "vpt_deep",
        "vpt_shallow",
    ]


def perturb_delta(model: nn.Module, seed: int = 3) -> None:
    """Give every trainable tensor random values so merged/save tests see a non-trivial delta."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vpeft.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def adapter_files(arch: str, directory: Path, method: str = "adapter_pfeiffer", n: int = 2, **config) -> list[str]:
    """``n`` adapter delta files on the tiny ViT ``arch``, each with its own non-zero weights."""
    paths = []
    for i in range(n):
        model = vpeft.apply_method(make_vit(arch), method, **config)
        perturb_delta(model, seed=10 + i)
        paths.append(str(vpeft.save_delta(model, directory / f"{method}-{arch}-{i}.safetensors")))
    return paths


@pytest.fixture(scope="session")
def contract_config(tmp_path_factory):
    """``kwargs(name, arch)``: the config the contract applies, the defaults plus adapter files for adapter_fusion."""
    files: dict[str, list[str]] = {}

    def kwargs(name: str, arch: str = "vit") -> dict:
        if name != "adapter_fusion":
            return {}
        if arch not in files:
            files[arch] = adapter_files(arch, tmp_path_factory.mktemp(f"adapters-{arch}"))
        return {"adapters": files[arch]}

    return kwargs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", METHODS)
def test_shape_and_frozen_set(name, arch, contract_config):
    model = make_vit(arch)
    x = tiny_input(model)
    ref_shape = model(x).shape
    out = vpeft.apply_method(model, name, **contract_config(name, arch))
    assert out is model
    assert model(x).shape == ref_shape
    trainable = vpeft.trainable_parameters(model)
    ids = {id(p) for p in trainable.values()}
    for n, p in model.named_parameters():
        assert p.requires_grad == (id(p) in ids), n
    head = {id(p) for p in model.get_classifier().parameters()}
    assert head <= ids, "the head always trains"
    if name not in ("full",):
        # the backbone's own weights stay frozen for every PEFT method
        assert not model.patch_embed.proj.weight.requires_grad
        assert not model.blocks[0].attn.qkv.weight.requires_grad


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(IDENTITY_AT_INIT))
def test_identity_at_init(name, arch):
    model = make_vit(arch)
    x = tiny_input(model)
    ref = model(x)
    vpeft.apply_method(model, name, **IDENTITY_AT_INIT[name])
    assert torch.equal(model(x), ref)


@pytest.mark.parametrize("name", ["vpt_shallow", "vpt_deep", "ssf", "prefix"])
def test_non_identity_methods_change_outputs(name):
    model = make_vit()
    x = tiny_input(model)
    ref = model(x)
    vpeft.apply_method(model, name)
    assert not torch.allclose(model(x), ref)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(MERGEABLE))
def test_merged_equals_unmerged(name, arch):
    kwargs = IDENTITY_AT_INIT.get(name, {}) if name in ("lora", "dora") else {}
    model = vpeft.apply_method(make_vit(arch), name, **kwargs)
    perturb_delta(model)
    x = tiny_input(model)
    unmerged = model(x)
    tol = type(vpeft.applied_method(model)).merge_atol
    merged = vpeft.merge(model)
    assert merged is model
    torch.testing.assert_close(merged(x), unmerged, atol=tol, rtol=1e-5)
    # plain timm modules only: no delta modules, no hooks, no extra parameters beyond the backbone's
    assert not [m for m in merged.modules() if isinstance(m, Delta)]
    assert not [m for m in merged.modules() if m._forward_hooks]
    fresh = make_vit(arch)
    extra = set(merged.state_dict()) - set(fresh.state_dict())
    assert not {k for k in extra if not k.endswith(".bias")}, extra  # SSF may give bias-free layers a bias
    assert vpeft.applied_method(merged) is None


@pytest.mark.parametrize("name", ["lora", "ssf", "ia3"])
def test_merge_changes_weights_not_structure(name):
    model = vpeft.apply_method(make_vit(), name)
    perturb_delta(model)
    before = model.blocks[0].attn.qkv.weight.clone()
    vpeft.merge(model)
    assert type(model.blocks[0].attn.qkv) is nn.Linear
    assert not torch.equal(model.blocks[0].attn.qkv.weight, before)


@pytest.mark.parametrize("name", sorted(set(METHODS) - MERGEABLE))
def test_merge_of_non_mergeable_raises(name, contract_config):
    model = vpeft.apply_method(make_vit(), name, **contract_config(name))
    with pytest.raises(vpeft.NotMergeableError, match=f"mergeable methods: {', '.join(sorted(MERGEABLE))}$"):
        vpeft.merge(model)


@pytest.mark.parametrize("arch", ["vit", "dinov2_reg"])
@pytest.mark.parametrize("name", METHODS)
def test_one_step_changes_only_the_delta(name, arch, contract_config):
    model = vpeft.apply_method(make_vit(arch), name, **contract_config(name, arch))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = vpeft.trainable_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = tiny_input(model, batch=4)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    moved = {n for n, p in trainable.items() if p.grad.abs().sum() > 0}
    assert "head.weight" in moved
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # frozen tensors are bitwise unchanged; every delta tensor with a gradient moved
    assert moved <= changed <= set(trainable), (changed - set(trainable), moved - changed)


@pytest.mark.parametrize("arch", ["vit", "dinov2_reg", "avgpool"])
@pytest.mark.parametrize("name", METHODS)
def test_save_load_roundtrip(name, arch, tmp_path, contract_config):
    model = vpeft.apply_method(make_vit(arch), name, **contract_config(name, arch))
    perturb_delta(model)
    x = tiny_input(model)
    ref = model(x)
    path = vpeft.save_delta(model, tmp_path / "task.safetensors")
    fresh = make_vit(arch)  # same seed: the same frozen backbone, as a pretrained checkpoint would give
    assert not torch.equal(fresh(x), ref)
    vpeft.load_delta(fresh, path)
    assert vpeft.applied_method(fresh).name == name
    assert torch.equal(fresh(x), ref)
    tensors, info = vpeft.read_delta(path)
    assert set(tensors) == set(vpeft.trainable_parameters(model))
    assert info["method"] == name and info["config"] == vpeft.applied_method(model).config_dict()
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    assert payload == vpeft.count_parameters(model).trainable * 4
    assert path.stat().st_size < payload + 64 * 1024  # header only beside the tensors


def test_save_load_keeps_config(tmp_path):
    model = vpeft.apply_method(make_vit(), "lora", r=4, alpha=8, targets=["k", "fc1"])
    path = vpeft.save_delta(model, tmp_path / "d.safetensors")
    fresh = vpeft.load_delta(make_vit(), path)
    cfg = vpeft.applied_method(fresh).config_dict()
    assert cfg == {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["k", "fc1"]}


def test_load_rejects_other_head_and_other_method(tmp_path):
    path = vpeft.save_delta(vpeft.apply_method(make_vit(), "bitfit"), tmp_path / "d.safetensors")
    with pytest.raises(vpeft.VpeftError, match="num_classes"):
        other = make_vit()
        other.reset_classifier(7)
        vpeft.load_delta(other, path)
    with pytest.raises(vpeft.VpeftError, match="fresh backbone"):
        vpeft.load_delta(vpeft.apply_method(make_vit(), "lora"), path)


def test_deepcopy_keeps_the_delta_working():
    model = vpeft.apply_method(make_vit(), "lora")
    perturb_delta(model)
    x = tiny_input(model)
    assert torch.equal(copy.deepcopy(model)(x), model(x))


@pytest.mark.parametrize("name", METHODS)
def test_bf16_autocast_keeps_the_backbones_dtypes(name, contract_config):
    """Under bf16 autocast every backbone layer outputs the dtype it outputs without the method.

    A delta kept in fp32 must not promote the activations it touches to fp32: that doubles their
    memory and adds a cast before the next matmul (SSF once ran at half LoRA's speed on a GPU so).
    """

    def dtypes(model):
        seen = {}

        def record(name):
            def hook(module, args, out):
                seen.setdefault(name, out.dtype)

            return hook

        hooks = [
            m.register_forward_hook(record(n))
            for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Conv2d))
        ]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(tiny_input(model))
        for h in hooks:
            h.remove()
        return seen

    bare = dtypes(make_vit())
    tuned = dtypes(vpeft.apply_method(make_vit(), name, **contract_config(name)))
    assert {n: tuned[n] for n in bare if n in tuned} == {n: bare[n] for n in bare if n in tuned}


def test_lora_qkv_is_one_low_rank_update_of_the_fused_layer():
    """targets [qkv]: x @ (W + (alpha / r) B A)^T + b on the fused attn.qkv, A r x d shared by q, k and v."""
    torch.manual_seed(0)
    model = vpeft.apply_method(make_vit(), "lora", r=4, alpha=8.0, targets=["qkv"])
    perturb_delta(model, 1)
    qkv = model.blocks[0].attn.qkv
    a, b, lora_cls = qkv.lora.A["qkv"], qkv.lora.B["qkv"], type(qkv.lora)
    d = qkv.in_features
    assert a.shape == (4, d) and b.shape == (3 * d, 4) and set(qkv.lora.A) == {"qkv"}
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        expected = x @ (qkv.weight + 2.0 * b @ a).T + qkv.bias
        torch.testing.assert_close(qkv(x), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(
            qkv(x)[..., d : 2 * d], x @ qkv.weight[d : 2 * d].T + qkv.bias[d : 2 * d]
        )  # k moves too
        inp = tiny_input(model)
        before = model.eval()(inp)
        vpeft.merge(model)
        assert not any(isinstance(m, lora_cls) for m in model.modules())
        torch.testing.assert_close(model(inp), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [["qkv", "q"], ["v", "qkv"], ["qkv", "k", "fc1"]])
def test_lora_qkv_cannot_be_combined_with_its_thirds(targets):
    with pytest.raises(vpeft.ConfigError, match="cannot combine qkv"):
        vpeft.apply_method(make_vit(), "lora", targets=targets)
