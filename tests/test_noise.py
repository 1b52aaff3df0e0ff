"""The counter-based stream of dropout and drop-path masks (vpeft.layers.noise)."""

from __future__ import annotations

import random

import pytest
import torch
from timm.layers import DropPath as TimmDropPath
from torch import nn
from torch.func import vmap

from vpeft.layers import noise

M32 = 0xFFFFFFFF


def mix_reference(x: int) -> int:
    """The hash transcribed on Python integers (no int64 overflow anywhere)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def uniform_reference(seed: int, step: int, site: int, sub: int, count: int) -> list[float]:
    seed = (seed ^ (seed >> 32)) & M32
    base = mix_reference(mix_reference(mix_reference(seed) ^ (step & M32)) ^ site)
    base = mix_reference(base ^ sub)
    return [(mix_reference((i * 0x9E3779B9 + base) & M32) >> 8) / (1 << 24) for i in range(count)]


def key(seed: int, step: int) -> torch.Tensor:
    return torch.tensor([seed, step], dtype=torch.int64)


def test_the_tensor_hash_is_the_integer_hash():
    """int64 products past 2^63 wrap; the low 32 bits must still be the true ones."""
    rng = random.Random(0)
    values = [rng.randrange(0, 2**32) for _ in range(2000)] + [0, 1, M32, 2**31, 2**31 - 1]
    got = noise._mix(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [mix_reference(v) for v in values]
    for seed, step, site, sub in [(0, 0, 0, 0), (3, 1599, 7, 2), (2**40 + 5, 12, 31, 0), (123456789, 3, 0, 11)]:
        with noise.keyed(key(seed, step)):
            u = noise.uniform((50,), site, sub)
        assert u.tolist() == uniform_reference(seed, step, site, sub, 50)


def test_masks_are_a_function_of_seed_step_site_and_position():
    with noise.keyed(key(5, 10)):
        a = noise.uniform((4, 6), 3)
        assert torch.equal(a, noise.uniform((4, 6), 3))
        assert torch.equal(a[:2], noise.uniform((2, 6), 3))  # sample i's numbers do not depend on the batch size
        others = [noise.uniform((4, 6), 4), noise.uniform((4, 6), 3, sub=1)]
    with noise.keyed(key(5, 11)):
        others.append(noise.uniform((4, 6), 3))
    with noise.keyed(key(6, 10)):
        others.append(noise.uniform((4, 6), 3))
    for b in others:
        assert not torch.equal(a, b)
    assert noise.uniform((3,), 0) is None  # no key outside the training loop


def test_the_numbers_are_uniform():
    """Mean, the rate of u < 0.1 and 16 equal bins, each within 5 standard errors, over 2^20 numbers."""
    n = 1 << 20
    with noise.keyed(key(0, 0)):
        u = noise.uniform((n,), 0).double()
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12) ** 0.5 / n**0.5
    assert abs(float((u < 0.1).double().mean()) - 0.1) < 5 * (0.1 * 0.9 / n) ** 0.5
    counts = torch.histc(u, bins=16, min=0, max=1)
    assert float((counts - n / 16).abs().max()) < 5 * (n / 16 * 15 / 16) ** 0.5


def test_dropout_and_drop_path_as_torch_and_timm_define_them():
    """Keyed: the kept entries are scaled by 1 / keep, the others zero, at rate p; unkeyed: torch's generator."""
    x = torch.ones(4000, 8, dtype=torch.float64)
    with noise.keyed(key(1, 2)):
        y = noise.dropout(x, 0.25, True, site=0)
        paths = noise.DropPath(0.25).train()(x)
    for out, unit in ((y, y.flatten()), (paths, paths[:, 0])):
        assert set(out.unique().tolist()) <= {0.0, 1 / 0.75}
        assert abs(float((unit == 0).double().mean()) - 0.25) < 0.02
    assert all(len(set(row.tolist())) == 1 for row in paths[:50])  # one decision per sample
    torch.manual_seed(3)
    want = nn.Dropout(0.25).train()(x)
    torch.manual_seed(3)
    assert torch.equal(noise.Dropout(0.25).train()(x), want)
    torch.manual_seed(4)
    want = TimmDropPath(0.25).train()(x)
    torch.manual_seed(4)
    assert torch.equal(noise.DropPath(0.25).train()(x), want)
    with noise.keyed(key(1, 2)):
        assert torch.equal(noise.Dropout(0.25).eval()(x), x)  # evaluation draws nothing


def test_under_vmap_each_run_gets_its_own_masks():
    keys = torch.stack([key(1, 4), key(2, 4), key(3, 9)])

    def draw(k: torch.Tensor) -> torch.Tensor:
        with noise.keyed(k):
            return noise.dropout(torch.ones(5, 7), 0.5, True, site=2)

    batched = vmap(draw)(keys)
    for i in range(3):
        assert torch.equal(batched[i], draw(keys[i]))


def test_counter_based_swaps_torch_and_timm_modules_and_numbers_the_sites():
    model = nn.Sequential(nn.Dropout(0.1), TimmDropPath(0.2), nn.Dropout(0.0), nn.Linear(3, 3))
    model.add_module("attn_drop", nn.Dropout(0.3))
    drawing, left = noise.counter_based(model)
    assert isinstance(model[0], noise.Dropout) and isinstance(model[1], noise.DropPath)
    assert type(model[2]) is nn.Dropout  # rate 0: nothing to key
    assert [model[0].noise_site, model[1].noise_site] == [0, 1] and drawing == 2
    assert left == ["attn_drop (Dropout 0.3)"]


@pytest.mark.parametrize("p", [0.0, 1.0 - 2**-30])
def test_extreme_rates(p):
    x = torch.ones(64)
    with noise.keyed(key(0, 0)):
        y = noise.dropout(x, p, True, site=0)
    assert torch.equal(y, x) if p == 0 else int((y != 0).sum()) <= 1
