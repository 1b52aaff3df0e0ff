"""Packed training against each run trained alone by ``vpeft.engine.train``, in float64.

Four runs of one method with different tasks (5 and 3 classes, split sizes that leave a partial last
batch), seeds, learning rates, weight decays and the method's fixed scale (LoRA's alpha, ...) train in
one pack; each must end where it ends alone: the same per-epoch losses, learning rates, evaluation,
trained tensors and optimizer state.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_vit
from omegaconf import OmegaConf
from timm.models.vision_transformer import VisionTransformer

import vpeft
from vpeft.engine import Resume, TrainConfig, param_groups, train
from vpeft.engine.packed import PackedRun, PackError, train_packed
from vpeft.methods import METHODS

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
DEVICE = torch.device("cpu")
# every method with its own dropout / drop path as configured, LoRA's and the prompts' dropout on too, and
# stochastic depth 0.1 in the backbone: masks are keyed by (seed, step, site, position)
NOISY = {"lora": {"dropout": 0.1}, "dora": {"dropout": 0.1}, "vpt_deep": {"dropout": 0.1},
         "vpt_shallow": {"dropout": 0.1}}  # fmt: skip
ALONE = {"full", "adalora", "adapter_fusion"}
PACKABLE = [m for m in vpeft.list_methods() if m not in ALONE]
# each run's own value of what a pack may hold per run (Method.per_run_config)
PER_RUN = {"alpha": [4.0, 16.0, 8.0, 12.0], "scale": [0.1, 1.0, 0.5, 3.0]}


def per_run(method: str, i: int) -> dict[str, float]:
    return {key: PER_RUN[key][i] for key in METHODS.get(method).per_run_config}


def task(classes: int, n_train: int, n_eval: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_train + n_eval, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, classes, (n_train + n_eval,), generator=g)
    return images[:n_train], labels[:n_train], images[n_train:], labels[n_train:]


TASKS = {"five": (5, task(5, 40, 24, 1)), "three": (3, task(3, 40, 30, 2))}


def backbone(drop_path: float) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**{**TINY, "drop_path_rate": drop_path})


def build(method: str, task_name: str, seed: int, optim: dict, drop_path: float = 0.1, **method_kwargs) -> PackedRun:
    """A run as the training job builds it: the shared backbone, then the run's seed for its head and delta."""
    classes, (xtr, ytr, xev, yev) = TASKS[task_name]
    model = backbone(drop_path).double()
    torch.manual_seed(seed)
    model.reset_classifier(classes)
    model.double()
    vpeft.apply_method(model, method, **{**NOISY.get(method, {}), **method_kwargs})
    model.train()
    kind = optim.get("kind", "adamw")
    groups = param_groups(model, optim["weight_decay"], decay_1d=optim.get("decay_1d", False))
    if kind == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=optim["lr"], betas=(0.9, 0.999))
    else:
        optimizer = torch.optim.SGD(groups, lr=optim["lr"], momentum=0.9)
    return PackedRun(model, optimizer, xtr, ytr, xev, yev, seed=seed)


def copied(run: PackedRun) -> PackedRun:
    """A copy of the run's model and optimizer (taken before the pack trains them)."""
    model = copy.deepcopy(run.model)
    named = dict(model.named_parameters())
    ids = {id(p): n for n, p in run.model.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [named[ids[id(p)]] for p in g["params"]]}
              for g in run.optimizer.param_groups]  # fmt: skip
    optimizer = type(run.optimizer)(groups)
    return dataclasses.replace(run, model=model, optimizer=optimizer)


def alone(run: PackedRun, config: TrainConfig):
    """The run trained by itself through vpeft.engine.train."""
    result = train(run.model, run.train_images, run.train_labels, run.eval_images, run.eval_labels, run.optimizer,
                   config, MEAN, STD, DEVICE, seed=run.seed)  # fmt: skip
    return run.model, run.optimizer, result


def packed_and_alone(runs: list[PackedRun], config: TrainConfig):
    """The pack's results, and each run's own (trained from copies taken before the pack)."""
    copies = [copied(r) for r in runs]
    results = train_packed(runs, config, MEAN, STD, DEVICE)
    return results, copies


def close(a: float, b: float, tol: float = 1e-12) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def assert_equal_entries(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Within 1e-12, but for entries that are roundoff on both sides.

    A key's bias cannot change attention (softmax ignores a shift shared by all keys), so its gradient is
    zero in exact arithmetic and about 1e-20 in floating point, differently rounded alone and packed.
    AdamW divides that by sqrt(v) + eps and moves the entry by up to about 1e-13 per step: such entries
    stay below 1e-10 on both sides (checked), while every other entry agrees to 1e-12.
    """
    diff = (a - b).abs()
    noise = torch.maximum(a.abs(), b.abs()) <= 1e-10
    bad = (diff > 1e-12) & ~noise
    assert not bad.any(), f"{name}: {diff[bad].max().item()} at {bad.nonzero()[0].tolist()}"


def assert_same_as_alone(runs: list[PackedRun], config: TrainConfig, results, copies) -> None:
    for run, packed, own in zip(runs, results, copies, strict=True):
        model, optimizer, result = alone(own, config)
        assert not isinstance(packed, Exception), packed
        assert len(packed.epochs) == len(result.epochs)
        for a, b in zip(packed.epochs, result.epochs, strict=True):
            assert close(a.train_loss, b.train_loss), (a, b)
            assert close(a.lr, b.lr), (a, b)
        assert packed.top1 == result.top1
        assert close(packed.eval_loss, result.eval_loss)
        mine = dict(run.model.named_parameters())
        for name, p in model.named_parameters():
            assert_equal_entries(name, mine[name].detach(), p.detach())
        theirs = {id(p): n for n, p in model.named_parameters()}
        names = {id(p): n for n, p in run.model.named_parameters()}
        want = {theirs[id(p)]: s for p, s in optimizer.state.items()}
        got = {names[id(p)]: s for p, s in run.optimizer.state.items()}
        assert sorted(got) == sorted(want)
        for name, state in want.items():
            assert sorted(got[name]) == sorted(state), name
            for key, value in state.items():
                assert_equal_entries(f"{name} {key}", got[name][key].double(), value.double())


CONFIG = TrainConfig(epochs=3, batch_size=16, warmup_epochs=1, eval_batch_size=16, amp="none", progress=False)


@pytest.mark.parametrize("method", PACKABLE)
def test_packed_runs_end_where_each_ends_alone(method):
    """Tasks with 5 and 3 classes, seeds, lr, weight decay and its rule, and the method's fixed scale all differ;
    40 images in batches of 16."""
    runs = [
        build(method, "five", 1, {"lr": 1e-2, "weight_decay": 1e-4}, **per_run(method, 0)),
        build(method, "three", 2, {"lr": 3e-3, "weight_decay": 5e-2}, **per_run(method, 1)),
        # one param group where the others have two
        build(method, "five", 3, {"lr": 5e-3, "weight_decay": 0.0}, **per_run(method, 2)),
        # 1-D tensors decay too
        build(method, "three", 4, {"lr": 2e-3, "weight_decay": 1e-2, "decay_1d": True}, **per_run(method, 3)),
    ]
    before = [scales(r.model) for r in runs]
    results, copies = packed_and_alone(runs, CONFIG)
    assert_same_as_alone(runs, CONFIG, results, copies)
    assert [scales(r.model) for r in runs] == before  # each run's floats are back in its layers
    if METHODS.get(method).per_run_config:
        assert len({tuple(s.values()) for s in before}) == len(runs)  # the values the runs differ in are there


def scales(model) -> dict[str, float]:
    """Every per-run float of the model's delta layers (Delta.per_run), each checked to be a float."""
    out = {}
    for path, module in model.named_modules():
        for attr in getattr(module, "per_run", ()):
            value = getattr(module, attr)
            assert isinstance(value, float | torch.nn.Parameter), (path, attr, type(value))
            if isinstance(value, float):
                out[f"{path}.{attr}"] = value
    return out


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(
            epochs=2,
            batch_size=16,
            warmup_epochs=0,
            label_smoothing=0.1,
            grad_clip=0.05,
            amp="none",
            progress=False,
            eval_every=1,
        ),  # fmt: skip
    ],
    ids=["smoothing-clip-eval_every"],
)
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_label_smoothing_clipping_and_sgd(config, kind):
    """Label smoothing over each run's own classes, each run's own gradient norm clipped, SGD with momentum."""
    runs = [
        build("lora", "five", 4, {"lr": 2e-2, "weight_decay": 1e-3, "kind": kind}),
        build("lora", "three", 5, {"lr": 1e-2, "weight_decay": 0.0, "kind": kind}),
    ]
    results, copies = packed_and_alone(runs, config)
    assert_same_as_alone(runs, config, results, copies)
    assert results[0].best_epoch is not None


def test_gradients_do_not_cross_runs():
    """The gradient of run k's loss is zero outside run k's slice of every stacked tensor."""
    from torch.func import functional_call, vmap

    runs = [build("ssf", "five", s, {"lr": 1e-2, "weight_decay": 0.0}, drop_path=0.0) for s in (1, 2, 3)]
    template = runs[0].model
    names = [n for n, p in template.named_parameters() if p.requires_grad]
    params = {
        n: torch.stack([dict(r.model.named_parameters())[n].detach() for r in runs]).requires_grad_() for n in names
    }
    x = torch.randn(3, 4, 3, 32, 32, dtype=torch.float64)
    logits = vmap(lambda p, xb: functional_call(template, p, (xb,)))(params, x)
    for k in range(3):
        grads = torch.autograd.grad(logits[k].square().sum(), list(params.values()), retain_graph=True)
        for name, g in zip(names, grads, strict=True):
            others = torch.cat([g[:k].flatten(), g[k + 1 :].flatten()])
            assert torch.count_nonzero(others) == 0, name
            assert torch.count_nonzero(g[k]) > 0 or name.startswith("head"), name


def test_a_diverging_run_fails_alone():
    """An lr of 1e200 makes one run's loss non-finite: it fails with the single run's error, the others match alone."""
    runs = [
        build("lora", "five", 1, {"lr": 1e-2, "weight_decay": 0.0}),
        build("lora", "five", 2, {"lr": 1e200, "weight_decay": 0.0}),
        build("lora", "three", 3, {"lr": 1e-2, "weight_decay": 0.0}),
    ]
    config = TrainConfig(epochs=3, batch_size=16, warmup_epochs=0, amp="none", progress=False)
    results, copies = packed_and_alone(runs, config)
    assert isinstance(results[1], vpeft.engine.DivergedError)
    assert "training diverged" in str(results[1])
    with pytest.raises(vpeft.engine.DivergedError):
        alone(copies[1], config)
    assert_same_as_alone([runs[0], runs[2]], config, [results[0], results[2]], [copies[0], copies[2]])


def test_runs_that_cannot_share_a_step_are_refused():
    """Each refusal names what differs."""
    a = build("lora", "five", 1, {"lr": 1e-2, "weight_decay": 0.0})
    shares = r"method.*'r': 4.*a pack shares one method config \(they may differ in alpha\)"
    with pytest.raises(PackError, match=shares):
        train_packed([a, build("lora", "five", 2, {"lr": 1e-2, "weight_decay": 0.0}, r=4)], CONFIG, MEAN, STD, DEVICE)
    with pytest.raises(PackError, match="method"):
        train_packed([a, build("ssf", "five", 2, {"lr": 1e-2, "weight_decay": 0.0})], CONFIG, MEAN, STD, DEVICE)
    other = build("lora", "five", 2, {"lr": 1e-2, "weight_decay": 0.0})
    with torch.no_grad():
        other.model.blocks[0].attn.qkv.weight.add_(1e-9)
    with pytest.raises(PackError, match="frozen blocks.0.attn.qkv.weight"):
        train_packed([a, other], CONFIG, MEAN, STD, DEVICE)
    short = build("lora", "five", 2, {"lr": 1e-2, "weight_decay": 0.0})
    short.train_images, short.train_labels = short.train_images[:30], short.train_labels[:30]
    with pytest.raises(PackError, match="30 training images"):
        train_packed([a, short], CONFIG, MEAN, STD, DEVICE)
    sgd = build("lora", "five", 2, {"lr": 1e-2, "weight_decay": 0.0, "kind": "sgd"})
    with pytest.raises(PackError, match="optimizer"):
        train_packed([a, sgd], CONFIG, MEAN, STD, DEVICE)
    momentum = build("lora", "five", 2, {"lr": 1e-2, "weight_decay": 0.0})
    momentum.optimizer.param_groups[0]["betas"] = (0.8, 0.999)
    with pytest.raises(PackError, match="betas"):
        train_packed([a, momentum], CONFIG, MEAN, STD, DEVICE)
    fused = build("lora", "five", 2, {"lr": 1e-2, "weight_decay": 0.0})
    fused.model.blocks[1].attn.attn_drop.p = 0.1  # a rate timm hands to the fused attention kernel
    with pytest.raises(PackError, match=r"blocks.1.attn.attn_drop \(Dropout 0.1\) draws from torch's generator"):
        train_packed([fused], CONFIG, MEAN, STD, DEVICE)


@pytest.mark.parametrize("method", ["adaptformer", "vpt_deep"])
def test_a_run_trains_the_same_at_any_position_of_any_pack(method):
    """Dropout and drop path masks belong to the run: alone, first of three, or last of two, it ends the same."""
    spec = [("five", 7, 1e-2), ("three", 8, 3e-3), ("five", 9, 5e-3)]
    runs = [build(method, t, s, {"lr": lr, "weight_decay": 1e-4}) for t, s, lr in spec]
    first, copies = packed_and_alone(runs, CONFIG)
    again = [build(method, t, s, {"lr": lr, "weight_decay": 1e-4}) for t, s, lr in (spec[2], spec[0])]
    second = train_packed(again, CONFIG, MEAN, STD, DEVICE)
    assert_same_as_alone([runs[0]], CONFIG, [first[0]], [copies[0]])
    trained = dict(runs[0].model.named_parameters())
    for name, p in again[1].model.named_parameters():  # run (five, 7) as the last of two
        assert_equal_entries(name, p.detach(), trained[name].detach())
    assert [e.train_loss for e in second[1].epochs] == pytest.approx([e.train_loss for e in first[0].epochs], 1e-12)


@pytest.mark.parametrize("method", sorted(ALONE))
def test_methods_that_run_alone_say_why(method):
    assert METHODS.get(method).runs_alone
    from vpeft.engine.packed import check_packable

    cls = METHODS.get(method)
    with pytest.raises(PackError, match=f"{method} runs cannot be packed: {cls.runs_alone}"):
        check_packable(cls.__new__(cls), make_vit())


def test_every_other_method_packs():
    assert {m for m in vpeft.list_methods() if METHODS.get(m).runs_alone} == ALONE


@pytest.mark.slow
def test_a_compiled_pack_trains_what_an_eager_pack_does():
    """trainer.compile on a pack: one compilation for every step (the last batch of 8 padded to 16) and for the next
    pack of the same shape (other models, seeds, rates and scales), float32 results within compilation's rounding of
    the eager pack's."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    results = []
    for compiled in (False, True):
        runs = [build("adaptformer", t, s, {"lr": 1e-2, "weight_decay": 1e-4}, scale=c)
                for t, s, c in (("five", 1, 0.1), ("three", 2, 1.0))]  # fmt: skip
        for r in runs:
            r.model.float()
        config = dataclasses.replace(CONFIG, epochs=2, compile=compiled)
        results.append((train_packed(runs, config, MEAN, STD, DEVICE), runs))
    (eager, eager_runs), (comp, comp_runs) = results
    graphs = dict(torch._dynamo.utils.counters["stats"])
    assert graphs["unique_graphs"] >= 1
    again = [build("adaptformer", t, s, {"lr": 1e-3, "weight_decay": 0.0}, scale=c)
             for t, s, c in (("three", 5, 0.5), ("five", 6, 3.0))]  # fmt: skip
    for r in again:
        r.model.float()
    train_packed(again, dataclasses.replace(CONFIG, epochs=1, compile=True), MEAN, STD, DEVICE)
    assert dict(torch._dynamo.utils.counters["stats"]) == graphs  # another pack of one shape: nothing recompiles
    for a, b in zip(eager, comp, strict=True):
        assert [e.train_loss for e in a.epochs] == pytest.approx([e.train_loss for e in b.epochs], rel=1e-4)
        assert abs(a.top1 - b.top1) <= 100 / 24  # at most one evaluation image apart
    for a, b in zip(eager_runs, comp_runs, strict=True):
        for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
            torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-3, msg=name)


def test_a_pack_group_that_fails_takes_no_other_group_down():
    """In a pack job, two LoRA runs train together and two SSF runs whose images are broken fail: the SSF runs get
    the error (their records say failed), the LoRA runs their results."""
    from types import SimpleNamespace

    from vpeft.engine import TrainResult
    from vpeft.jobs.pack import Member, _train
    from vpeft.jobs.runner import Context

    trainer = dataclasses.asdict(dataclasses.replace(CONFIG, epochs=1))
    members = []
    spec = [("lora", 1, {"alpha": 8.0}), ("lora", 2, {"alpha": 16.0}), ("ssf", 3, {}), ("ssf", 4, {}),
            ("lora", 5, {"alpha": 8.0, "r": 4})]  # fmt: skip
    for num, (method, seed, options) in enumerate(spec):
        run = build(method, "five", seed, {"lr": 1e-2, "weight_decay": 0.0}, drop_path=0.0, **options)
        if method == "ssf":
            run.train_images = run.train_images[:, :2]  # two channels: the patch embedding refuses them
        resolved = {"trainer": trainer, "method": {"name": method, **options}, "optim": {"lr": 1e-2},
                    "backbone": {"name": "t"}}  # fmt: skip
        plan = SimpleNamespace(resolved=resolved, record_path=Path(f"/nowhere/{num}.json"), cfg=OmegaConf.create({}),
                               identity={"config_hash": f"h{num}"})  # fmt: skip
        ctx = Context(state={"backbone": SimpleNamespace(mean=MEAN, std=STD)})
        members.append(Member(num=num, overrides=[], cfg=None, plan=plan, ctx=ctx, run=run))
    results = _train(members, DEVICE)
    # the LoRA runs of alpha 8 and 16 share their steps, the one of rank 4 trains alone
    assert [(type(results[id(m)][0]), results[id(m)][1]) for m in (members[0], members[1], members[4])] == [
        (TrainResult, 2), (TrainResult, 2), (TrainResult, 1)]  # fmt: skip
    assert all(isinstance(results[id(m)][0], RuntimeError) and results[id(m)][1] == 2 for m in members[2:4])


def test_the_stack_holds_each_runs_own_tensors_bitwise():
    """At learning rate 0 a pack changes nothing: every run's tensors (heads of 5 and 3 classes, stacked into one
    padded to 5, and the delta) come back from the stack bitwise, and the first epoch's loss is the one the run
    has alone at its initial values."""
    runs = [build("lora", t, s, {"lr": 0.0, "weight_decay": 0.0}, drop_path=0.0, alpha=a)
            for t, s, a in (("five", 1, 4.0), ("three", 2, 16.0))]  # fmt: skip
    before = [{n: p.detach().clone() for n, p in r.model.named_parameters()} for r in runs]
    config = dataclasses.replace(CONFIG, epochs=1, warmup_epochs=0, min_lr=0.0, warmup_lr=0.0)
    results, copies = packed_and_alone(runs, config)
    for run, init in zip(runs, before, strict=True):
        for name, p in run.model.named_parameters():
            assert torch.equal(p, init[name]), name
    for packed, own in zip(results, copies, strict=True):
        assert packed.epochs[0].train_loss == pytest.approx(alone(own, config)[2].epochs[0].train_loss, rel=1e-13)


RUNG = TrainConfig(epochs=4, batch_size=16, warmup_epochs=1, eval_batch_size=16, amp="none", progress=False,
                   eval_every=1)  # fmt: skip


def _resume(result) -> Resume:
    best = (result.best_epoch_top1, result.best_epoch) if result.best_epoch is not None else None
    return Resume(epoch=result.epochs[-1].epoch, history=list(result.epochs), best=best)


@pytest.mark.parametrize(("stop_packed", "go_on_packed"), [(True, True), (False, True), (True, False)],
                         ids=["pack-then-pack", "alone-then-pack", "pack-then-alone"])  # fmt: skip
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_a_pack_stops_at_a_rung_and_goes_on_as_each_run_does_straight(kind, stop_packed, go_on_packed):
    """Successive halving's rungs in a pack: stopped after epoch 2 of 4 (packed or alone), then continued from
    each run's state (packed or alone); every run ends where it ends trained straight through."""
    runs = [
        build("lora", "five", 1, {"lr": 1e-2, "weight_decay": 1e-4, "kind": kind}, alpha=4.0),
        build("lora", "three", 2, {"lr": 3e-3, "weight_decay": 5e-2, "kind": kind}, alpha=16.0),
    ]
    copies = [copied(r) for r in runs]
    if stop_packed:
        halves = train_packed(runs, RUNG, MEAN, STD, DEVICE, stop_after=2)
    else:
        halves = [train(r.model, r.train_images, r.train_labels, r.eval_images, r.eval_labels, r.optimizer, RUNG,
                        MEAN, STD, DEVICE, seed=r.seed, stop_after=2) for r in runs]  # fmt: skip
    assert [len(h.epochs) for h in halves] == [2, 2] and all(h.epochs[-1].eval_top1 is not None for h in halves)
    resumes = [_resume(h) for h in halves]
    if go_on_packed:
        results = train_packed(runs, RUNG, MEAN, STD, DEVICE, resumes=resumes)
    else:
        results = [train(r.model, r.train_images, r.train_labels, r.eval_images, r.eval_labels, r.optimizer, RUNG,
                         MEAN, STD, DEVICE, seed=r.seed, resume=res) for r, res in zip(runs, resumes)]  # fmt: skip
    assert_same_as_alone(runs, RUNG, results, copies)
    for half, whole in zip(halves, results, strict=True):  # the rung's evaluation is in the whole run's history
        assert whole.epochs[1].eval_top1 == half.epochs[1].eval_top1


def test_a_pack_resumes_only_from_one_rung():
    runs = [build("lora", "five", 1, {"lr": 1e-2, "weight_decay": 0.0}),
            build("lora", "three", 2, {"lr": 1e-2, "weight_decay": 0.0})]  # fmt: skip
    halves = train_packed(runs, RUNG, MEAN, STD, DEVICE, stop_after=1)
    with pytest.raises(PackError, match="resume from one epoch"):
        train_packed(runs, RUNG, MEAN, STD, DEVICE, resumes=[_resume(halves[0]), None])
