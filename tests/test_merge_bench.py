"""scripts/merge_bench.py: what it launches for a pool (dry run) and the bad input it refuses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "merge_bench.py"


def bench(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True)


def test_the_default_pool_is_every_offline_task_and_each_method_merges_in_its_space():
    out = bench("--dry-run", "--methods", "lora,adapter_pfeiffer", "backbone=vit_tiny_random")
    assert out.returncode == 0, out.stderr
    commands = [line for line in out.stdout.splitlines() if line.startswith("$ ")]
    train = [c for c in commands if "protocol=tune,final" in c]
    cifar10 = ROOT.parent / "shared" / "data" / "vtab-1k" / "cifar10"
    pools = ["dataset=digits", "dataset=fashion_mnist", f"dataset.root={cifar10}", "dataset=dsprites_loc"]
    assert len(train) == 4 and all(p in c for p, c in zip(pools, train, strict=True))
    assert all("method=adapter_pfeiffer,lora" in c and c.endswith("backbone=vit_tiny_random") for c in train)
    merges = [c for c in commands if "job=merge" in c]
    pool = f"merge.tasks=[digits,fashion_mnist,folder:{cifar10},dsprites_loc]"
    lora = next(c for c in merges if "method=lora" in c)
    assert "merge=task_arithmetic,ties,dare_ties,weighted_average" in lora and pool in lora and " -m " in lora
    adapter = next(c for c in merges if "method=adapter_pfeiffer" in c)  # not mergeable: its own tensors
    assert "merge=weighted_average" in adapter and "merge.space=delta" in adapter and pool in adapter
    fusion = [c for c in commands if "method=adapter_fusion" in c]
    assert len(fusion) == 2 * 4  # tune and final, on every task of the pool


def test_bad_input_is_named_with_exit_2():
    for args, needle in [
        (["--methods", "lorra"], "unknown method 'lorra'"),
        (["--tasks", "digits"], "at least two tasks"),
        (["--bogus"], "unknown option --bogus"),
    ]:
        out = bench("--dry-run", *args)
        assert out.returncode == 2 and needle in out.stderr, (args, out.stderr)
