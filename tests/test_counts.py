"""Trainable parameter counts against closed forms computed from the architecture's dimensions."""

import pytest
import timm
from conftest import ARCHS, TINY, make_vit

import vpeft

# Published / hand-derived counts on ViT-B/16 (d=768, 12 blocks, MLP 3072), head excluded.
VIT_B16 = [
    ("bitfit", {}, 102_912),
    ("lora", {"r": 8}, 294_912),
    ("lora", {"r": 8, "targets": ["qkv"]}, 294_912),  # A 8 x 768 shared, B 2304 x 8: as many as q and v
    ("adaptformer", {"bottleneck": 8}, 156_768),
    ("adaptformer", {"bottleneck": 64}, 1_189_632),
    ("ssf", {}, 205_824),
    ("vpt_shallow", {"num_tokens": 10}, 7_680),
    ("vpt_deep", {"num_tokens": 10}, 92_160),
    ("linear", {}, 0),
    ("full", {}, 85_798_656),
    ("adapter_houlsby", {"bottleneck": 8}, 350_400),  # adapters 313,536 + norm1/norm2 weight and bias 36,864
    ("adapter_houlsby", {"bottleneck": 8, "train_layernorm": False}, 313_536),
    ("adapter_pfeiffer", {"bottleneck": 8}, 156_768),
    ("prefix", {"num_tokens": 10}, 184_320),
    ("ia3", {}, 55_296),
    ("dora", {"r": 8}, 313_344),
    ("repadapter", {}, 239_808),
    ("fact", {}, 21_504),
    ("fact", {"variant": "tk"}, 13_952),
    ("adapter_plus", {}, 165_984),
    ("adalora", {}, 1_991_520),
]


@pytest.mark.parametrize(("name", "kwargs", "expected"), VIT_B16)
def test_vit_base_counts(name, kwargs, expected):
    model = timm.create_model("vit_base_patch16_224", num_classes=100, device="meta")
    vpeft.apply_method(model, name, **kwargs)
    count = vpeft.count_parameters(model)
    assert count.trainable_excl_head == expected
    assert count.trainable == expected + 768 * 100 + 100
    added = 0 if name in ("full", "linear", "bitfit") else expected - backbone_tensors(name, kwargs, 768, 12)
    assert count.total == 85_798_656 + 76_900 + added


def backbone_tensors(name: str, kwargs: dict, d: int, depth: int) -> int:
    """The part of a delta that is the backbone's own tensors (trained in place, not added)."""
    if name == "adapter_houlsby" and kwargs.get("train_layernorm", True):
        return depth * 2 * 2 * d  # norm1 and norm2: weight and bias
    return 0


def closed_form(name: str, kwargs: dict, d: int, depth: int, hidden: int, qkv_bias: bool) -> int:
    qkv_b = 3 * d if qkv_bias else 0
    if name == "linear":
        return 0
    if name == "bitfit":  # qkv, proj, fc1, fc2, norm1, norm2 biases per block; patch embed; final norm
        return depth * (qkv_b + d + hidden + d + 2 * d) + d + d
    if name == "lora":
        r, per = (
            kwargs.get("r", 8),
            {"q": 2 * d, "k": 2 * d, "v": 2 * d, "qkv": d + 3 * d, "proj": 2 * d, "fc1": d + hidden, "fc2": hidden + d},
        )
        return depth * sum(r * per[t] for t in kwargs.get("targets", ["q", "v"]))
    if name == "adaptformer":
        b = kwargs.get("bottleneck", 64)
        return depth * (2 * d * b + b + d + (1 if kwargs.get("learnable_scale") else 0))
    if name == "ssf":  # scale + shift after qkv, proj, fc1, fc2, norm1, norm2; patch embed; final norm
        return 2 * (depth * (3 * d + d + hidden + d + 2 * d) + d + d)
    if name == "vpt_shallow":
        return kwargs.get("num_tokens", 10) * d
    if name == "vpt_deep":
        return depth * kwargs.get("num_tokens", 10) * d
    if name in ("adapter_houlsby", "adapter_pfeiffer"):  # down (d x b + b) and up (b x d + d) per adapter
        b = kwargs.get("bottleneck", 8)  # Houlsby's train_layernorm: + norm1, norm2 weight and bias per block
        return (2 if name == "adapter_houlsby" else 1) * depth * (2 * d * b + b + d) + backbone_tensors(
            name, kwargs, d, depth
        )
    if name == "prefix":
        n = kwargs.get("num_tokens", 10)
        if not kwargs.get("reparam"):  # a key and a value vector per token per block
            return depth * 2 * n * d
        h = kwargs.get("reparam_hidden", 512)  # P' (n x d), d -> h, h -> every block's keys and values
        return n * d + (d * h + h) + (h * depth * 2 * d + depth * 2 * d)
    if name == "ia3":  # l_k, l_v (d each) and l_ff (hidden) per block
        return depth * (2 * d + hidden)
    if name == "dora":  # LoRA's factors plus a magnitude per adapted output row
        rows = {"q": d, "k": d, "v": d, "qkv": 3 * d, "proj": d, "fc1": hidden, "fc2": d}
        targets = kwargs.get("targets", ["q", "v"])
        return closed_form("lora", kwargs, d, depth, hidden, qkv_bias) + depth * sum(rows[t] for t in targets)
    if name == "repadapter":  # before qkv and fc1: down (d x h + h), group-wise up (d x h / groups + d)
        h, g = kwargs.get("dim", 8), kwargs.get("groups", 2)
        return depth * 2 * (d * h + h + d * h // g + d)
    if name == "fact":  # shared U, V (d x r each); TT: cores per block, TK: a shared r^3 core and P (r x slots)
        r, m = kwargs.get("rank", 8), hidden // d
        if kwargs.get("variant", "tt") == "tt":  # q, k, v, o (r x r), fc1 (m r x r), fc2 (r x m r)
            return 2 * d * r + depth * (4 + 2 * m) * r * r
        return 2 * d * r + r**3 + r * depth * (4 + 2 * m)
    if name == "adapter_plus":  # per block: down (d x b + b), up (b x d + d), channel scaling (d)
        b = kwargs.get("bottleneck", 8)
        return depth * (2 * d * b + b + d + d)
    if name == "adalora":  # P (out x r), lambda (r), Q (r x in) per adapted matrix at init_r (pruning masks)
        r = kwargs.get("init_r", 12)
        per = {"q": 2 * d, "k": 2 * d, "v": 2 * d, "proj": 2 * d, "fc1": d + hidden, "fc2": hidden + d}
        return depth * sum(r * (per[t] + 1) for t in kwargs.get("targets", list(per)))
    raise KeyError(name)


CASES = [
    ("bitfit", {}),
    ("lora", {}),
    ("lora", {"r": 3, "targets": ["q", "k", "v", "proj", "fc1", "fc2"]}),
    ("lora", {"r": 3, "targets": ["qkv", "fc1"]}),
    ("adaptformer", {"bottleneck": 5}),
    ("adaptformer", {"bottleneck": 5, "learnable_scale": True}),
    ("ssf", {}),
    ("vpt_shallow", {"num_tokens": 7}),
    ("vpt_deep", {"num_tokens": 7}),
    ("linear", {}),
    ("adapter_houlsby", {}),
    ("adapter_houlsby", {"bottleneck": 5, "act": "relu"}),
    ("adapter_houlsby", {"train_layernorm": False}),
    ("adapter_pfeiffer", {"bottleneck": 5}),
    ("prefix", {"num_tokens": 7}),
    ("prefix", {"num_tokens": 7, "reparam": True, "reparam_hidden": 16}),
    ("ia3", {}),
    ("dora", {}),
    ("dora", {"r": 3, "targets": ["q", "k", "v", "proj", "fc1", "fc2"]}),
    ("dora", {"r": 3, "targets": ["qkv", "fc2"]}),
    ("repadapter", {}),
    ("repadapter", {"dim": 12, "groups": 4}),
    ("fact", {}),
    ("fact", {"variant": "tk", "rank": 5}),
    ("adapter_plus", {}),
    ("adapter_plus", {"bottleneck": 3}),
    ("adalora", {}),
    ("adalora", {"init_r": 3, "target_r": 2, "targets": ["q", "v"]}),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_tiny_counts(name, kwargs, arch):
    model = make_vit(arch)
    total_before = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.get_classifier().parameters())
    vpeft.apply_method(model, name, **kwargs)
    d, depth = TINY["embed_dim"], TINY["depth"]
    hidden = int(d * TINY["mlp_ratio"])
    expected = closed_form(name, kwargs, d, depth, hidden, ARCHS[arch].get("qkv_bias", True))
    count = vpeft.count_parameters(model)
    assert count.trainable_excl_head == expected
    assert count.trainable == expected + head
    added = 0 if name in ("linear", "bitfit") else expected - backbone_tensors(name, kwargs, d, depth)
    assert count.total == total_before + added


def test_full_counts_everything():
    model = vpeft.apply_method(make_vit(), "full")
    count = vpeft.count_parameters(model)
    assert count.trainable == count.total == sum(p.numel() for p in model.parameters())


def test_prefix_fold_leaves_only_the_prefixes():
    """Training through the MLP counts it; folding it away leaves the plain prefix count."""
    model = vpeft.apply_method(make_vit(), "prefix", num_tokens=4, reparam=True, reparam_hidden=16)
    assert vpeft.count_parameters(model).trainable_excl_head == closed_form(
        "prefix", {"num_tokens": 4, "reparam": True, "reparam_hidden": 16}, 48, 3, 96, True
    )
    vpeft.applied_method(model).fold(model)
    count = vpeft.count_parameters(model)
    assert count.trainable_excl_head == closed_form("prefix", {"num_tokens": 4}, 48, 3, 96, True)
    assert count.total == sum(p.numel() for p in make_vit().parameters()) + count.trainable_excl_head


def fusion_closed_form(d: int, depth: int, sites: int) -> int:
    """Per fused position Q (d x d + d), K (d x d: its bias cancels in the softmax), V (d x d): 3 d^2 + d."""
    return sites * depth * (3 * d * d + d)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("kind", "sites"), [("adapter_pfeiffer", 1), ("adapter_houlsby", 2)])
def test_adapter_fusion_tiny_counts(arch, kind, sites, tmp_path):
    from test_methods import adapter_files

    paths = adapter_files(arch, tmp_path, kind, n=3, bottleneck=5)
    model = make_vit(arch)
    total_before = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.get_classifier().parameters())
    vpeft.apply_method(model, "adapter_fusion", adapters=paths)
    d, depth = TINY["embed_dim"], TINY["depth"]
    expected = fusion_closed_form(d, depth, sites)
    count = vpeft.count_parameters(model)
    assert count.trainable_excl_head == expected
    assert count.trainable == expected + head
    # the three adapters, loaded frozen (a Houlsby file's LayerNorms are not: the backbone's are kept)
    frozen = 3 * closed_form(kind, {"bottleneck": 5, "train_layernorm": False}, d, depth, 0, True)
    assert count.total == total_before + expected + frozen


def test_adapter_fusion_vit_base_count(tmp_path):
    """ViT-B/16 with two Pfeiffer adapters (the fusion's size does not depend on how many are fused)."""
    from vpeft.layers import SerialAdapter

    paths = []
    for i in range(2):
        source = vpeft.apply_method(
            timm.create_model("vit_base_patch16_224", num_classes=10, device="meta"), "adapter_pfeiffer"
        )
        for m in [*(m for m in source.modules() if isinstance(m, SerialAdapter)), source.head]:
            m.to_empty(device="cpu")
            for p in m.parameters():
                p.data.normal_(std=0.02)
        paths.append(str(vpeft.save_delta(source, tmp_path / f"a{i}.safetensors")))
    model = timm.create_model("vit_base_patch16_224", num_classes=100, device="meta")
    vpeft.apply_method(model, "adapter_fusion", adapters=paths)
    count = vpeft.count_parameters(model)
    assert count.trainable_excl_head == fusion_closed_form(768, 12, 1) == 21_242_880
    assert count.trainable == 21_242_880 + 768 * 100 + 100
    assert count.total == 85_798_656 + 76_900 + 21_242_880 + 2 * 156_768
