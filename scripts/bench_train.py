"""Training speed on one GPU, measured in one process: vpeft against the usual recipe and against peft.

    python scripts/bench_train.py                      # every section, ViT-B/16 at 224, on the GPU
    python scripts/bench_train.py --sections step scaling --methods lora vpt_deep
    python scripts/bench_train.py --quick              # a CPU check of every section in a few minutes
    python scripts/bench_train.py --sections pack --backbone dinov2_s14_offline --pack-img-size 56 --pack-epochs 2

Sections: step, final, usual, peft, scaling, latency, profile, sweep, pack (vpeft/bench/suites/train_speed.py says
what each measures). Writes results/benchmarks/train_<device>.json (every number, the environment and the
arguments) and train_<device>.md. The data is a VTAB-1k task folder (default: the real cifar10 task in
../shared/data/vtab-1k/cifar10); accuracy needs pretrained weights (--checkpoint, or timm's download),
--random-init times the runs without them (accuracy then means nothing and says so).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vpeft  # noqa: E402
from vpeft.bench.suites.train_speed import DEFAULT_DATA, SECTIONS, backbone_configs, run  # noqa: E402
from vpeft.data.base import layout  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--methods", nargs="+", default=None, help="step section (default: every method)")
    p.add_argument("--step-backbones", nargs="+", default=["vit_base_patch16_224", "vit_small_patch16_224"])
    p.add_argument("--img-size", type=int, default=224, help="input size of the step and scaling sections")
    p.add_argument("--batch", type=int, default=256, help="training batch of the step and peft sections")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    p.add_argument("--compile", choices=("eager", "compiled", "both"), default=None, help="default: both on CUDA")
    p.add_argument("--no-floor", action="store_true", help="step section: leave out the frozen-backbone floor")
    p.add_argument("--backbone", default="vit_b16_in21k", help="conf/backbone/<name>.yaml of the run sections")
    p.add_argument("--checkpoint", default=None, help="local weights for that backbone")
    p.add_argument("--random-init", action="store_true", help="no pretrained weights (timing only)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="a VTAB-1k task folder (train800val200.txt, test.txt)")
    p.add_argument("--method", default="lora", help="method of the run sections (default config)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--drop-path", type=float, default=0.1, help="backbone drop path of the run sections (recipes: 0.1)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--usual-epochs", type=int, default=None, help="run only this many usual epochs, extrapolate")
    p.add_argument("--usual-workers", type=int, default=8, help="DataLoader workers of the usual recipe")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    p.add_argument("--prompts", type=int, nargs="+", default=[10, 25, 50, 100, 200])
    p.add_argument("--sweep-runs", type=int, default=8, help="final runs in the sweep section")
    p.add_argument("--sweep-epochs", type=int, default=None, help="shorter sweep runs; runs/hour extrapolated")
    p.add_argument("--jobs-per-gpu", type=int, default=4, help="runs sharing the GPU in the sweep section")
    p.add_argument("--latency-batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--pack-ks", type=int, nargs="+", default=[4, 8], help="pack section: runs per pack")
    p.add_argument("--pack-epochs", type=int, default=100, help="pack section: epochs of every run")
    p.add_argument("--pack-img-size", type=int, default=None, help="pack section: input size (default: the config's)")
    p.add_argument("--pack-protocol", choices=("tune", "final"), default="tune", help="pack section: the runs' splits")
    p.add_argument("--pack-compile", action="store_true", help="pack section: torch.compile, alone and packed")
    p.add_argument("--sweep-pack", type=int, default=1, help="sweep section: runs per pack (run.py's pack=K)")
    p.add_argument("--sweep-compile", action="store_true", help="sweep section: trainer.compile=true")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(ROOT / "results" / "benchmarks"))
    p.add_argument("--cache", default=None, help="cache root, as run.py's paths.cache (default: ~/.cache/vpeft)")
    p.add_argument("--quick", action="store_true", help="a CPU-sized check: tiny ViT, 32 px, few steps and epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.step_backbones, args.img_size, args.batch, args.steps, args.warmup = ["vit_tiny_patch16_224"], 32, 8, 2, 1
        args.backbone, args.random_init, args.epochs, args.usual_epochs = "vit_tiny_random", True, 2, 1
        args.usual_workers, args.batches, args.prompts = 0, [4, 8], [4, 16]
        args.latency_batches = [1, 4]
        if args.pack_ks == p.get_default("pack_ks") and args.pack_epochs == p.get_default("pack_epochs"):
            args.pack_ks, args.pack_epochs = [2], 1
        if args.sweep_epochs:
            args.sweep_epochs = 1  # still shorter than the schedule: the extrapolation is exercised
        if args.sweep_runs == p.get_default("sweep_runs") and args.jobs_per_gpu == p.get_default("jobs_per_gpu"):
            args.sweep_runs, args.jobs_per_gpu = 2, 2
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Bad names and a missing data folder fail here, before any measurement starts."""
    methods = vpeft.list_methods()
    for name in [args.method, *(args.methods or [])]:
        if name not in methods:
            p.error(f"unknown method {name!r}; valid methods: {', '.join(methods)}")
    backbones = backbone_configs()
    if args.backbone not in backbones:
        p.error(f"unknown backbone config {args.backbone!r}; valid (conf/backbone/): {', '.join(backbones)}")
    if {"final", "usual", "sweep", "pack"} & set(args.sections):
        missing = [f for f in ("train800val200.txt", "test.txt") if not Path(args.data, f).is_file()]
        if missing:
            p.error(
                f"--data {args.data} lacks {', '.join(missing)}; a VTAB-1k task folder looks like:\n{layout(args.data)}"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(["python", "scripts/bench_train.py", *(sys.argv[1:] if argv is None else argv)])
    return run(args, command)


if __name__ == "__main__":
    sys.exit(main())
