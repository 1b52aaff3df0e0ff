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


def _lora_run(fused_by_engine: bool):
    from vpeft.engine import TrainConfig, train

    model = vpeft.apply_method(make_vit(), "lora")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2) if fused_by_engine else torch.optim.AdamW(params, lr=1e-2, foreach=True)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(40) % 5
    cfg = TrainConfig(epochs=2, batch_size=16, warmup_epochs=0, amp="none", progress=False)
    train(model, images, labels, images, labels, opt, cfg, (0.5,) * 3, (0.5,) * 3, torch.device("cuda"))
    return opt, vpeft.delta_state_dict(model)


def test_adamw_on_cuda_takes_the_fused_kernel_and_trains_the_same():
    fused, d_fused = _lora_run(True)
    chosen, d_chosen = _lora_run(False)  # an implementation the caller chose is kept
    assert all(g["fused"] for g in fused.param_groups) and not any(g["fused"] for g in chosen.param_groups)
    for n in d_chosen:
        torch.testing.assert_close(d_fused[n], d_chosen[n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_packed_runs_on_cuda_end_where_each_ends_alone(amp):
    """Three LoRA runs (two tasks, seeds, rates; drop path 0.1) packed on the GPU, against each alone."""
    import dataclasses

    from test_packed import CONFIG, MEAN, STD, build, copied

    from vpeft.engine import train
    from vpeft.engine.packed import train_packed

    config = dataclasses.replace(CONFIG, amp=amp)
    runs = [build("lora", t, s, {"lr": lr, "weight_decay": 1e-4}) for t, s, lr in
            (("five", 1, 1e-2), ("three", 2, 3e-3), ("five", 3, 5e-3))]  # fmt: skip
    for r in runs:
        r.model.float()
    copies = [copied(r) for r in runs]
    packed = train_packed(runs, config, MEAN, STD, torch.device("cuda"))
    tol = 1e-4 if amp == "none" else 3e-2
    for run, own, res in zip(runs, copies, packed, strict=True):
        alone = train(own.model, own.train_images, own.train_labels, own.eval_images, own.eval_labels, own.optimizer,
                      config, MEAN, STD, torch.device("cuda"), seed=own.seed)  # fmt: skip
        assert [e.train_loss for e in res.epochs] == pytest.approx([e.train_loss for e in alone.epochs], rel=tol)
        mine = dict(run.model.named_parameters())
        for name, p in own.model.named_parameters():
            torch.testing.assert_close(mine[name].detach().cpu(), p.detach().cpu(), atol=tol, rtol=tol, msg=name)
