import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

# Tiny ViTs covering the family's variants: class token (vit_*), avg pooling, DINOv2-style with
# register tokens and layer scale (no pos-embed on prefix tokens), and DeiT-style qkv without bias.
ARCHS = {
    "vit": dict(),
    "avgpool": dict(class_token=False, global_pool="avg", fc_norm=True),
    "dinov2_reg": dict(reg_tokens=4, no_embed_class=True, init_values=1e-5, patch_size=4, img_size=16),
    "no_qkv_bias": dict(qkv_bias=False),
}
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0, num_classes=5)


def make_vit(arch: str = "vit", seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(**{**TINY, **ARCHS[arch]})
    return model.eval()


def tiny_input(model: VisionTransformer, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = model.patch_embed.img_size
    return torch.randn(batch, 3, *size, generator=g)


@pytest.fixture
def real_cifar10():
    """The real task folder; its absence is a broken setup, not a reason to skip."""
    from data_helpers import REAL_CIFAR10

    assert REAL_CIFAR10.is_dir(), f"the real VTAB-1k cifar10 task is expected at {REAL_CIFAR10} (../shared)"
    return REAL_CIFAR10


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
