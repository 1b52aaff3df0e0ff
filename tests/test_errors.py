"""Bad input gets an error that names the problem and the fix."""

import pytest
import timm
import torch
from conftest import TINY, make_vit
from timm.models.vision_transformer import VisionTransformer

import vpeft


def test_unknown_method_lists_valid_names():
    with pytest.raises(vpeft.UnknownNameError) as e:
        vpeft.apply_method(make_vit(), "loraa")
    msg = str(e.value)
    assert "unknown method 'loraa'" in msg
    for name in vpeft.list_methods():
        assert name in msg


def test_unknown_config_field_lists_fields():
    with pytest.raises(vpeft.UnknownNameError, match=r"unknown lora config field 'rank'.*alpha, dropout, r, targets"):
        vpeft.apply_method(make_vit(), "lora", rank=8)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("lora", {"r": 0}, "positive integer"),
        ("lora", {"targets": ["q", "x"]}, "valid targets: q, k, v, qkv, proj, fc1, fc2"),
        ("lora", {"targets": []}, "at least one"),
        ("adaptformer", {"bottleneck": -1}, "positive integer"),
        ("ssf", {"init": "zeros"}, "'normal' or 'identity'"),
        ("vpt_deep", {"num_tokens": 0}, "positive integer"),
        ("vpt_shallow", {"dropout": 1.5}, r"\[0, 1\)"),
        ("adapter_houlsby", {"bottleneck": 0}, "positive integer"),
        ("adapter_pfeiffer", {"bottleneck": 2.5}, "bottleneck of adapter_pfeiffer must be an integer"),
        ("adapter_houlsby", {"act": "tanh"}, "one of gelu, relu, silu"),
        ("prefix", {"num_tokens": 0}, "num_tokens must be a positive integer"),
        ("prefix", {"reparam": True, "reparam_hidden": -4}, "reparam_hidden must be a positive integer"),
        ("prefix", {"reparam": "yes"}, "true or false"),
        ("adapter_fusion", {}, r"needs adapters=\[\.\.\.\].*at least two adapter_houlsby or adapter_pfeiffer"),
        ("adapter_fusion", {"adapters": ["a.safetensors"]}, "at least two adapters"),
        ("adapter_fusion", {"adapters": [1, 2]}, "list of file paths"),
        ("adapter_fusion", {"adapters": ["a", "b"], "checksums": ["x"]}, "1 checksums for 2 adapters"),
    ],
)
def test_bad_config_values(name, kwargs, match):
    with pytest.raises(vpeft.ConfigError, match=match):
        vpeft.apply_method(make_vit(), name, **kwargs)


@pytest.mark.parametrize(
    "name",
    ["lora", "ssf", "adaptformer", "vpt_shallow", "vpt_deep", "adapter_houlsby", "adapter_pfeiffer", "prefix", "ia3"],
)
def test_unsupported_model_names_what_is_missing(name):
    model = timm.create_model("resnet10t", num_classes=3)
    with pytest.raises(vpeft.UnsupportedModelError, match=r"needs `.*` but ResNet has no `.*`.*supported: timm Vis"):
        vpeft.apply_method(model, name)


def test_bitfit_and_linear_work_on_any_timm_classifier():
    model = timm.create_model("resnet10t", num_classes=3)
    vpeft.apply_method(model, "linear")
    assert vpeft.count_parameters(model).trainable_excl_head == 0


def test_adaptformer_rejects_other_block_types():
    model = timm.create_model(
        "vit_small_patch16_224",
        num_classes=3,
        class_token=True,
        depth=2,
        img_size=32,
        block_fn=timm.models.vision_transformer.ResPostBlock,
    )
    with pytest.raises(vpeft.UnsupportedModelError, match="ResPostBlock"):
        vpeft.apply_method(model, "adaptformer")


def test_prefix_rejects_other_attention_types():
    model = VisionTransformer(**TINY, attn_layer="diff")
    with pytest.raises(vpeft.UnsupportedModelError, match="prefix rewrites timm's Attention.*DiffAttention"):
        vpeft.apply_method(model, "prefix")


def test_ia3_refuses_to_merge_through_an_mlp_norm():
    torch.manual_seed(0)
    model = vpeft.apply_method(VisionTransformer(**TINY, scale_mlp_norm=True).eval(), "ia3")
    with torch.no_grad():
        for p in vpeft.trainable_parameters(model).values():
            p.mul_(1.5)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    with pytest.raises(vpeft.NotMergeableError, match="LayerNorm between the activation and fc2"):
        vpeft.merge(model)
    # nothing was folded: the model is still the unmerged one
    assert vpeft.applied_method(model).name == "ia3"
    assert torch.equal(model(x), ref)


def test_apply_twice_is_an_error():
    model = vpeft.apply_method(make_vit(), "lora")
    with pytest.raises(vpeft.VpeftError, match="already has 'lora' applied"):
        vpeft.apply_method(model, "ssf")


def test_delta_of_plain_model_is_an_error():
    with pytest.raises(vpeft.VpeftError, match="apply_method first"):
        vpeft.delta_state_dict(make_vit())


def test_load_of_foreign_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(vpeft.VpeftError, match="not a vpeft delta file"):
        vpeft.load_delta(make_vit(), tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="no delta file"):
        vpeft.load_delta(make_vit(), tmp_path / "missing.safetensors")
