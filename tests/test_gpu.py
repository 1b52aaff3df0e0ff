"""The method contract on CUDA under bf16 autocast (skipped without a GPU)."""

import pytest
import torch
from conftest import make_vit, tiny_input
from test_methods import MERGEABLE, contract_config, perturb_delta  # noqa: F401 (a fixture)

import vpeft

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", vpeft.list_methods())
def test_cuda_bf16_contract(name, tmp_path, contract_config):  # noqa: F811 - the fixture imported above
    model = vpeft.apply_method(make_vit("dinov2_reg").cuda(), name, **contract_config(name, "dinov2_reg"))
    x = tiny_input(model, batch=4).cuda()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), torch.arange(4, device="cuda"))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    model.eval()
    perturb_delta(model.cpu())
    model.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(x).float()
    path = vpeft.save_delta(model, tmp_path / "d.safetensors")
    fresh = vpeft.load_delta(make_vit("dinov2_reg").cuda(), path)  # adapter_fusion: its adapters by path
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(fresh(x).float(), ref)
    if name in MERGEABLE:
        vpeft.merge(model)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            torch.testing.assert_close(model(x).float(), ref, atol=5e-2, rtol=5e-2)
