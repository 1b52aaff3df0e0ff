"""Every CUDA path of vpeft in one call that fits a short GPU lease, and the speed targets measured.

    python scripts/gpu_check.py pack         # make gpu-pack: the bundle a bare GPU machine lacks, in .gpu-check/
    python scripts/gpu_check.py run          # make gpu-check: on the GPU machine, every step in priority order
    python scripts/gpu_check.py run --dry    # make gpu-check-dry: the same steps on a CPU at tiny sizes

The bundle (.gpu-check/, at most a few tens of MB): wheels of the pure-Python packages a GPU image
usually lacks (Hydra, its launchers, submitit), the real VTAB-1k cifar10 task as one tar (thousands
of small files travel slowly), and the offline DINOv2 ViT-S/14 resampled for 224 px as one fp16
safetensors file. `run` installs the wheels into a private folder when Hydra or OmegaConf is missing, unpacks the
task and the weights into a work folder, and then runs the steps, each a subprocess with its own
time cap inside one overall budget, in this order:

  pytest_gpu      pytest -m "gpu and not slow": the method contract and the cost measurements on CUDA
  launcher        a two-job `run.py -m hydra/launcher=gpus` sweep sharing the GPU (slot locks, records),
                  run twice: the second run must skip both jobs
  accuracy        100-epoch final runs on the cifar10 task with the offline ViT-S/14 at 224 px, batch 64,
                  bf16: linear and LoRA r 8 on q,k,v, against a plain timm + peft script's accuracy
  step_eager      every method's training step, ViT-B/16 at 224, batch 256, and the frozen floor
  final           one VTAB-1k final run (ViT-B/16, LoRA) eager and compiled, and the usual recipe
  step_compiled   LoRA's and VPT-deep's step under torch.compile
  peft            our LoRA step against Hugging Face peft's on the same projections
  latency         bare / unmerged / merged at batch 1 and 64, fp32 and bf16
  profile         a torch.profiler summary of the slowest PEFT method's training step
  sweep           final runs per GPU-hour through the launcher, 1 and 4 runs sharing the GPU
  pytest_gpu_slow the slow GPU tests (bench_train.py end to end on a tiny model)
  serve           scripts/bench_serve.py: mixed-task batches (T up to 64), swaps, 1,000 resident deltas

A step that runs out of time is killed with everything it started and recorded as such; the steps
after it still run while the budget lasts. After every step the whole result is written again
(atomically): results/benchmarks/gpu_check_<gpu>.json and .md, and the same files plus the full log
under $OUT when that variable is set (the device machine's return folder). SIGTERM or SIGINT stops the step
under way, with what it started, and writes what was measured. The steps: vpeft/bench/suites/gpu_check.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / ".gpu-check"
# what vpeft imports and a bare GPU machine may lack: the bundle's wheels provide it
NEEDED = "import omegaconf, hydra, hydra_plugins.hydra_joblib_launcher"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="build the bundle a bare GPU machine needs")
    pk.add_argument("--out", default=str(BUNDLE))
    pk.add_argument("--data", default=None, help="the VTAB-1k task folder to pack (default: ../shared's cifar10)")
    pk.add_argument("--no-wheels", dest="wheels", action="store_false", help="leave the wheels out")
    r = sub.add_parser("run", help="run the steps (on a GPU; --dry: on a CPU at tiny sizes)")
    r.add_argument("--dry", action="store_true", help="CPU, tiny sizes: a check of the script itself")
    r.add_argument("--budget", type=float, default=None, help="seconds for all steps (default 450; dry 900)")
    r.add_argument("--steps", nargs="+", metavar="STEP", help="only these steps (named in `gpu_check.py --help`)")
    r.add_argument("--resume", action="store_true", help="keep the other steps of the last result for this GPU")
    r.add_argument("--bundle", default=str(BUNDLE))
    r.add_argument("--data", default=None, help="a task folder (default: the bundle's, else ../shared's cifar10)")
    r.add_argument("--work", default=None, help="work folder (default: a new temporary one)")
    r.add_argument("--out", default=str(ROOT / "results" / "benchmarks"))
    r.add_argument("--python", default=None, help="interpreter of the steps (default: this one)")
    r.add_argument("--dry-images", type=int, default=24, help="dry run: images per split")
    r.add_argument("--cap-scale", type=float, default=None, help="multiply every step's cap (default 1; dry 3)")
    return p


def bundled_site(args: argparse.Namespace) -> Path | None:
    """Where Hydra or OmegaConf is missing (a bare GPU machine), the bundle's wheels installed into the work
    folder and put on the path, before vpeft, which imports them, is; None where nothing was missing."""
    wheels = sorted((Path(args.bundle) / "wheels").glob("*.whl"))
    pythons = {sys.executable, args.python or sys.executable}  # this process, and the steps' interpreter
    if not wheels or all(subprocess.run([py, "-c", NEEDED], capture_output=True).returncode == 0 for py in pythons):
        return None
    if args.work is None:
        args.work = tempfile.mkdtemp(prefix="vpeft-gpu-check-")
    site = Path(args.work) / "site"
    cmd = [args.python or sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--target", str(site), *map(str, wheels)]  # fmt: skip
    subprocess.run(cmd, check=True)
    sys.path.insert(0, str(site))
    return site


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    site = bundled_site(args) if args.cmd == "run" else None
    sys.path.insert(0, str(ROOT))
    # imported here, not above: vpeft needs OmegaConf, which bundled_site may just have put on the path
    from vpeft.bench.suites import gpu_check

    if args.cmd == "pack":
        return gpu_check.pack(args)
    if unknown := [s for s in args.steps or [] if s not in gpu_check.STEP_NAMES]:
        p.error(f"--steps: unknown step {', '.join(unknown)}; the steps: {', '.join(gpu_check.STEP_NAMES)}")
    if args.budget is None:
        args.budget = 900.0 if args.dry else 450.0
    if args.cap_scale is None:
        args.cap_scale = 3.0 if args.dry else 1.0
    command = " ".join(["python", "scripts/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    return gpu_check.run(args, command, site)


if __name__ == "__main__":
    sys.exit(main())
