"""A run stopped at a rung and resumed ends exactly where it ends trained straight through (float64, CPU).

Successive halving stops a tune run after some epochs of its schedule and, if it survives, continues it:
the data order, learning rate, dropout and drop-path masks and optimizer state must go on as if it never
stopped, so every trained tensor, the optimizer state, the per-epoch losses and the evaluations match bitwise.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from test_packed import CONFIG, DEVICE, MEAN, STD, build

from vpeft.engine import Resume, train
from vpeft.errors import ConfigError

SCHEDULE = dataclasses.replace(CONFIG, epochs=4, warmup_epochs=1, eval_every=1)


def straight(method: str, **kwargs):
    run = build(method, "five", 3, {"lr": 1e-2, "weight_decay": 1e-4}, **kwargs)
    result = train(run.model, run.train_images, run.train_labels, run.eval_images, run.eval_labels, run.optimizer,
                   SCHEDULE, MEAN, STD, DEVICE, seed=run.seed)  # fmt: skip
    return run, result


def in_stages(method: str, rungs: list[int], **kwargs):
    """Trained to each rung in turn; between rungs the run is rebuilt from scratch and given only what a rung's
    state holds: its trainable tensors, its optimizer's state dict, its history."""
    state, resume, results = None, None, []
    for rung in rungs:
        run = build(method, "five", 3, {"lr": 1e-2, "weight_decay": 1e-4}, **kwargs)
        if state is not None:
            tensors, optim = state
            with torch.no_grad():
                for name, p in run.model.named_parameters():
                    if name in tensors:
                        p.copy_(tensors[name])
            run.optimizer.load_state_dict(optim)
        result = train(run.model, run.train_images, run.train_labels, run.eval_images, run.eval_labels, run.optimizer,
                       SCHEDULE, MEAN, STD, DEVICE, seed=run.seed, resume=resume,
                       stop_after=rung if rung < SCHEDULE.epochs else None)  # fmt: skip
        results.append(result)
        state = ({n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad},
                 copy.deepcopy(run.optimizer.state_dict()))  # fmt: skip
        best = (result.best_epoch_top1, result.best_epoch) if result.best_epoch is not None else None
        resume = Resume(epoch=rung, history=result.epochs, best=best)
    return run, results


@pytest.mark.parametrize(("method", "kwargs"), [("lora", {"dropout": 0.1}), ("vpt_deep", {}), ("ssf", {})])
def test_stopped_and_resumed_is_trained_straight(method, kwargs):
    """Rungs at 1, 3 and 4 of 4 epochs, with drop path 0.1 in the backbone and the method's own dropout."""
    run, whole = straight(method, **kwargs)
    staged, results = in_stages(method, [1, 3, 4], **kwargs)
    mine = dict(staged.model.named_parameters())
    for name, p in run.model.named_parameters():
        assert torch.equal(mine[name], p), name
    a, b = run.optimizer.state_dict(), staged.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(b["state"][i][key], value), (i, key)
    final = results[-1]
    assert [(e.epoch, e.train_loss, e.lr, e.eval_top1) for e in final.epochs] == [
        (e.epoch, e.train_loss, e.lr, e.eval_top1) for e in whole.epochs]  # fmt: skip
    assert (final.top1, final.eval_loss) == (whole.top1, whole.eval_loss)
    assert (final.best_epoch_top1, final.best_epoch) == (whole.best_epoch_top1, whole.best_epoch)
    # a rung's result is the straight run's evaluation after that epoch
    assert [r.top1 for r in results[:2]] == [whole.epochs[0].eval_top1, whole.epochs[2].eval_top1]
    assert [len(r.epochs) for r in results] == [1, 3, 4]


def test_what_cannot_stop_or_resume_is_refused():
    run = build("lora", "five", 3, {"lr": 1e-2, "weight_decay": 0.0})
    args = (run.model, run.train_images, run.train_labels, run.eval_images, run.eval_labels, run.optimizer, SCHEDULE,
            MEAN, STD, DEVICE)  # fmt: skip
    with pytest.raises(ValueError, match="cannot train epochs 1..5 of a 4-epoch schedule"):
        train(*args, stop_after=5)
    with pytest.raises(ValueError, match="cannot train epochs 3..2 of a 4-epoch schedule"):
        train(*args, resume=Resume(epoch=2, history=[]), stop_after=2)
    ada = build("adalora", "five", 3, {"lr": 1e-2, "weight_decay": 0.0})
    with pytest.raises(ConfigError, match="adalora keeps per-step state outside its tensors"):
        train(ada.model, ada.train_images, ada.train_labels, ada.eval_images, ada.eval_labels, ada.optimizer,
              SCHEDULE, MEAN, STD, DEVICE, stop_after=2)  # fmt: skip
