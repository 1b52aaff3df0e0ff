"""The training-speed suite: vpeft's training step, a whole final run, the usual recipe and peft, on one device.

Sections (all timed in this process, on the same device and data):
  step     every method's training step (AdamW, batch 256, bf16 on CUDA), eager and compiled, on
           ViT-B/16 and a small ViT: images/s, achieved TFLOP/s (torch.utils.flop_counter) and the
           share of the GPU's dense bf16 peak, peak memory; plus a frozen backbone (gradients to the
           activations only) as the floor of any in-backbone delta.
  final    one complete VTAB-1k final run (train800val200 x 100 epochs at batch 64, then the test
           split) through vpeft's engine: data preparation (cold: decode and cache; warm: read the
           cache), training and evaluation, eager and compiled.
  usual    the same run the usual way (DataLoader over the files, PIL resize every epoch, fp32,
           batch 64; bf16 too), same method, optimizer, schedule and seed; ratios to `final`.
  peft     Hugging Face peft's LoRA on timm's fused qkv against vpeft's LoRA on q, k and v (the
           same projections adapted): training-step images/s; merged inference against the bare model.
  scaling  images/s against the batch size (LoRA) and against VPT-deep's prompt length, with the
           per-token rate (images/s x sequence length) relative to LoRA's.
  latency  inference latency of each method (--methods) as trained and, where mergeable, merged,
           against the bare backbone in the same process: batch 1 and 64, fp32 and bf16 on CUDA.
  profile  a torch.profiler summary of a few training steps of each method in --methods (the
           slowest ones, to see where their time goes).
  sweep    final runs per GPU-hour through `run.py -m hydra/launcher=gpus` with several runs
           sharing the GPU (jobs_per_gpu), against the usual recipe's runs per hour; with
           --sweep-epochs the runs are shorter and the hour is extrapolated to --epochs.
  pack     K tune runs (--pack-ks, each run its own seed and learning rate) trained one after
           another through vpeft's engine and then packed into one (vpeft.engine.packed): the
           wall-clock ratio of training and evaluation, and how far each packed run's top-1 is from
           its run alone (--pack-epochs, --pack-img-size: a shorter, smaller run for the CPU).

``run(args)`` takes the arguments of scripts/bench_train.py and writes train_<device>.json (every number, the
environment and the arguments) and train_<device>.md through vpeft.bench.report.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch._dynamo.utils import counters as dynamo_counters

from vpeft.backbones import backbone_from_config, create_backbone
from vpeft.bench.latency import measure_latency
from vpeft.bench.report import Report, run_sections, unfinished, write_result
from vpeft.bench.speed import bf16_peak_tflops, sequence_length, train_step_flops
from vpeft.bench.training import measure_training
from vpeft.bench.usual import usual_run
from vpeft.core import apply_method, list_methods, save_delta
from vpeft.data import load_task
from vpeft.engine.loop import TrainConfig, train
from vpeft.engine.optim import param_groups
from vpeft.engine.packed import PackedRun, train_packed
from vpeft.env import device_name, environment, resolve_device
from vpeft.files import slug
from vpeft.results import iter_records

ROOT = Path(__file__).resolve().parents[3]  # the checkout: run.py and conf/ live there
SECTIONS = ("step", "final", "usual", "peft", "scaling", "latency", "profile", "sweep", "pack")
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "vtab-1k" / "cifar10"
LORA_QKV = {"r": 8, "alpha": 8, "targets": ["q", "k", "v"]}  # the projections peft's "qkv" target adapts


def backbone_configs() -> list[str]:
    """The backbone configs the run sections accept (conf/backbone/<name>.yaml)."""
    return sorted(f.stem for f in (ROOT / "conf" / "backbone").glob("*.yaml"))


# -- the step section -----------------------------------------------------------------------------
def step_row(model, name, backbone, args, device, peak, compiled, frozen=False) -> dict[str, Any]:
    size = (3, args.img_size, args.img_size)
    model.to(device)
    flops = train_step_flops(model, size)
    tokens = sequence_length(model, size)
    rep = measure_training(
        model,
        size,
        batch_size=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        device=device,
        compile=compiled,
        input_grad=frozen,
    )
    tflops = flops * rep.images_per_s / 1e12
    return {
        "backbone": backbone,
        "method": name,
        "compiled": compiled,
        "batch": rep.batch_size,
        "dtype": rep.dtype,
        "images_per_s": rep.images_per_s,
        "tokens": tokens,
        "tokens_per_s": rep.images_per_s * tokens,
        "train_gflops_per_image": flops / 1e9,
        "tflops_per_s": tflops,
        "peak_share": tflops / peak if peak else None,
        "peak_mem_mb": rep.peak_mem_mb,
        "peak_mem_kind": rep.peak_mem_kind,
        "trainable": rep.trainable,
    }


def bare(name: str, img_size: int, num_classes: int = 100):
    return create_backbone(name, num_classes, pretrained=False, img_size=img_size).model


@functools.cache
def scratch() -> Path:
    """A folder for files a measurement needs, made on first use and removed when the process ends."""
    folder = Path(tempfile.mkdtemp(prefix="vpeft-bench-inputs-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def inputs(method: str, backbone: str, args) -> dict[str, Any]:
    """The config a method needs beyond its defaults: AdapterFusion fuses two adapters, saved fresh here
    (what a step costs does not depend on the adapters' weights)."""
    if method != "adapter_fusion":
        return {}
    files = []
    for i in range(2):
        torch.manual_seed(i)
        adapter = apply_method(bare(backbone, args.img_size), "adapter_pfeiffer")
        files.append(str(save_delta(adapter, scratch() / f"{backbone}-{args.img_size}-{i}.safetensors")))
    return {"adapters": files}


def section_step(args, device, peak, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fills ``rows`` as it goes, so a run stopped part-way keeps the rows it measured."""
    methods = args.methods or list_methods()
    for backbone in args.step_backbones:
        for compiled in compile_modes(args, device):
            if not args.no_floor:
                model = bare(backbone, args.img_size)
                for p in model.parameters():
                    p.requires_grad_(False)
                rows.append(step_row(model, "(frozen backbone)", backbone, args, device, peak, compiled, frozen=True))
                log(rows[-1])
            for method in methods:
                model = apply_method(bare(backbone, args.img_size), method, **inputs(method, backbone, args))
                rows.append(step_row(model, method, backbone, args, device, peak, compiled))
                log(rows[-1])
                del model
                empty_cache(device)
    return rows


# -- the run sections ------------------------------------------------------------------------------
def backbone_config(args) -> dict[str, Any]:
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "backbone" / f"{args.backbone}.yaml"))
    cfg["drop_path_rate"] = args.drop_path  # the VTAB-1k recipes' stochastic depth (conf/experiment/vtab1k_*)
    if args.random_init:
        cfg["pretrained"] = False
    if args.checkpoint:
        cfg["checkpoint"] = args.checkpoint
    return cfg


def load_data(args, bb, cache: Path, protocol: str = "final"):
    return load_task(
        "folder", protocol, image_size=tuple(bb.input_size[1:]), interpolation=bb.interpolation, root=args.data,
        cache_dir=cache,
    )  # fmt: skip


def engine_run(args, cfg, device, cache: Path, compiled: bool, seed: int = 0) -> dict[str, Any]:
    """One final run as run.py does it: data (from the cache when warm), training, evaluation."""
    torch.manual_seed(seed)  # a random-init backbone is the same in every run
    bb = backbone_from_config(cfg, 0)
    start = time.perf_counter()
    task = load_data(args, bb, cache)
    data_seconds = time.perf_counter() - start
    torch.manual_seed(seed)
    model = bb.model
    model.reset_classifier(task.num_classes)
    apply_method(model, args.method)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=1e-4)
    result = train(
        model,
        task.train.images,
        task.train.labels,
        task.eval.images,
        task.eval.labels,
        optimizer,
        TrainConfig(epochs=args.epochs, warmup_epochs=min(10, args.epochs), compile=compiled, progress=False),
        bb.mean,
        bb.std,
        device,
        seed=seed,
    )
    return {
        "compiled": compiled,
        "cache_hit": task.cache_hit,
        "data_seconds": data_seconds,
        "train_seconds": result.train_seconds,
        "eval_seconds": result.eval_seconds,
        "total_seconds": data_seconds + result.train_seconds + result.eval_seconds,
        "train_images_per_s": result.train_images_per_s,
        "top1": result.top1,
        "n_train": len(task.train.labels),
        "n_eval": len(task.eval.labels),
        "amp": result.amp,
        "peak_mem_mb": result.peak_mem_mb,
    }


def section_final(args, device, cache: Path) -> dict[str, Any]:
    cfg = backbone_config(args)
    bb = backbone_from_config(cfg, 0)
    start = time.perf_counter()
    task = load_data(args, bb, cache)  # a first run: decode every image once and write the cache
    cold = time.perf_counter() - start
    if task.cache_hit:  # the cache was already there: time the decode it saves anyway
        start = time.perf_counter()
        load_data(args, bb, None)
        cold = time.perf_counter() - start
    del task
    out = {
        "backbone": cfg["name"],
        "weights": bb.weights,
        "method": args.method,
        "epochs": args.epochs,
        "batch": 64,
        "drop_path": args.drop_path,
        "data_cold_seconds": cold,
        "runs": [],
    }
    for compiled in compile_modes(args, device):
        out["runs"].append(engine_run(args, cfg, device, cache, compiled))
        log(out["runs"][-1])
    return out


def section_usual(args, device, cache: Path) -> dict[str, Any]:
    cfg = backbone_config(args)
    out = {"backbone": cfg["name"], "method": args.method, "runs": []}
    num_classes = None
    for dtype in ("fp32", "bf16") if device.type == "cuda" else ("fp32",):
        torch.manual_seed(0)
        bb = backbone_from_config(cfg, 0)
        num_classes = num_classes or load_data(args, bb, cache).num_classes
        torch.manual_seed(0)
        model = bb.model
        model.reset_classifier(num_classes)
        apply_method(model, args.method)
        res = usual_run(
            model,
            args.data,
            tuple(bb.input_size[1:]),
            bb.mean,
            bb.std,
            device,
            epochs=args.epochs,
            run_epochs=args.usual_epochs,
            lr=args.lr,
            warmup_epochs=min(10, args.epochs),
            dtype=dtype,
            num_workers=args.usual_workers,
            interpolation=bb.interpolation,
        )
        row = dict(res.__dict__)
        row["total_seconds"] = res.train_seconds_full + res.eval_seconds
        out["runs"].append(row)
        log(row)
    return out


def peft_model(backbone: str, img_size: int, r: int = 8):
    from peft import LoraConfig, get_peft_model

    model = bare(backbone, img_size)
    config = LoraConfig(r=r, lora_alpha=r, target_modules=["qkv"], lora_dropout=0.0, modules_to_save=["head"])
    return get_peft_model(model, config)


def section_peft(args, device, peak) -> dict[str, Any]:
    try:
        import peft
    except ImportError:
        return {"skipped": "Hugging Face peft is not installed: pip install -e '.[bench]'"}
    backbone = args.step_backbones[0]
    ours = apply_method(bare(backbone, args.img_size), "lora", **LORA_QKV)
    theirs = peft_model(backbone, args.img_size)
    rows, ratios = [], {}
    for compiled in compile_modes(args, device):  # eager against eager, compiled against compiled
        name = f"peft {peft.__version__} lora (qkv)"
        pair = [step_row(ours, "vpeft lora (q,k,v)", backbone, args, device, peak, compiled),
                step_row(theirs, name, backbone, args, device, peak, compiled)]  # fmt: skip
        for r in pair:
            log(r)
        rows += pair
        ratios["compiled" if compiled else "eager"] = pair[0]["images_per_s"] / pair[1]["images_per_s"]
    size = (3, args.img_size, args.img_size)
    latency = measure_latency(
        ours,
        size,
        batches=(1, 64),
        baseline=bare(backbone, args.img_size).to(device),
        device=device,
        dtypes=("bf16",) if device.type == "cuda" else ("fp32",),
        warmup=None if device.type == "cuda" else 1,
        iters=None if device.type == "cuda" else 3,
    )
    return {
        "backbone": backbone,
        "steps": rows,
        "batch": args.batch,
        "ours_over_peft": next(iter(ratios.values())),  # the first mode measured (eager where both ran)
        "ours_over_peft_by_mode": ratios,
        "latency": latency.to_dict(),
    }


def section_scaling(args, device) -> dict[str, Any]:
    backbone = args.step_backbones[0]
    out: dict[str, Any] = {"backbone": backbone, "batch": [], "prompts": []}
    size = (3, args.img_size, args.img_size)
    lora = apply_method(bare(backbone, args.img_size), "lora").to(device)
    rates = {}
    for b in sorted({*args.batches, args.batch}):
        rep = measure_training(lora, size, batch_size=b, steps=args.steps, warmup=args.warmup, device=device)
        rates[b] = rep.images_per_s
        if b in args.batches:
            out["batch"].append({"batch": b, "images_per_s": rep.images_per_s, "peak_mem_mb": rep.peak_mem_mb})
            log(out["batch"][-1])
    lora_tokens = rates[args.batch] * sequence_length(lora, size)
    out["lora_tokens_per_s"] = lora_tokens
    del lora
    for n in args.prompts:
        vpt = apply_method(bare(backbone, args.img_size), "vpt_deep", num_tokens=n).to(device)
        rep = measure_training(vpt, size, batch_size=args.batch, steps=args.steps, warmup=args.warmup, device=device)
        tokens = sequence_length(vpt, size)
        out["prompts"].append(
            {
                "num_tokens": n,
                "tokens": tokens,
                "images_per_s": rep.images_per_s,
                "tokens_per_s": rep.images_per_s * tokens,
                "per_token_vs_lora": rep.images_per_s * tokens / lora_tokens,
            }
        )
        log(out["prompts"][-1])
        del vpt
        empty_cache(device)
    return out


def section_latency(args, device, out: dict[str, Any]) -> dict[str, Any]:
    """Each method's inference latency as trained and merged, over the bare backbone, in one process.

    Fills ``out`` as it goes, so a run stopped part-way keeps the methods it measured.
    """
    backbone = args.step_backbones[0]
    size = (3, args.img_size, args.img_size)
    baseline = bare(backbone, args.img_size).to(device)
    cpu = device.type != "cuda"
    out.update(backbone=backbone, rows=[], reports={})
    rows, reports = out["rows"], out["reports"]
    for method in args.methods or list_methods():
        model = apply_method(bare(backbone, args.img_size), method, **inputs(method, backbone, args))
        rep = measure_latency(
            model, size, batches=args.latency_batches, baseline=baseline, device=device,
            warmup=1 if cpu else None, iters=3 if cpu else None,
        )  # fmt: skip
        reports[method] = rep.to_dict()
        for dtype in rep.dtypes:
            for b in rep.batches:
                stats = [s for s in rep.results if (s.dtype, s.batch) == (dtype, b)]
                row = {"method": method, "dtype": dtype, "batch": b, "bare_ms": rep.stat("bare", dtype, b).median_ms}
                for variant in ("unmerged", "merged"):
                    s = rep.stat(variant, dtype, b)
                    row[f"{variant}_ms"] = s.median_ms if s else None
                    row[f"{variant}_x"] = rep.ratio(variant, dtype, b)
                row["max_p90_over_median"] = max(s.p90_ms / s.median_ms for s in stats)
                rows.append(row)
                log(row)
        del model
        empty_cache(device)
    return out


def section_profile(args, device) -> dict[str, Any]:
    """Where a training step's time goes: torch.profiler over a few steps of each method in --methods."""
    from torch.profiler import ProfilerActivity, profile

    backbone = args.step_backbones[0]
    size = (3, args.img_size, args.img_size)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    out = {}
    for method in args.methods or ["lora"]:
        model = apply_method(bare(backbone, args.img_size), method, **inputs(method, backbone, args)).to(device)
        measure_training(model, size, batch_size=args.batch, steps=1, warmup=args.warmup, device=device)  # warm
        with profile(activities=activities) as prof:
            rep = measure_training(model, size, batch_size=args.batch, steps=args.steps, warmup=0, device=device)
        table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
        out[method] = {"images_per_s_profiled": rep.images_per_s, "steps": args.steps, "table": table}
        print(table, flush=True)
        del model, prof
        empty_cache(device)
    return out


def section_sweep(args, device, cache: Path, usual: dict[str, Any] | None) -> dict[str, Any]:
    """Final runs through the real launcher, ``jobs_per_gpu`` at a time on one GPU; with ``--sweep-pack K`` the runs
    (one seed, a learning rate each, so that a random-init backbone is the same in all) train K to a pack."""
    cfg = backbone_config(args)
    k = max(1, args.jobs_per_gpu)
    pack = max(1, args.sweep_pack)
    rates = ",".join(f"{args.lr * (1 + i / 10):g}" for i in range(args.sweep_runs))
    seeds = ",".join(str(s) for s in range(args.sweep_runs))
    grid = [f"seed={seeds}"] if pack == 1 else ["seed=0", f"optim.lr={rates}", f"pack={pack}"]
    epochs = args.sweep_epochs or args.epochs
    with tempfile.TemporaryDirectory(prefix="vpeft-sweep-") as tmp:
        overrides = [
            f"backbone={args.backbone}",
            f"backbone.pretrained={str(cfg['pretrained']).lower()}",
            f"backbone.drop_path_rate={args.drop_path}",
            *([f"backbone.checkpoint={cfg['checkpoint']}"] if cfg.get("checkpoint") else []),
            f"method={args.method}",
            "dataset=folder",
            f"dataset.root={Path(args.data).resolve()}",
            "protocol=final",
            *grid,
            f"trainer.epochs={epochs}",
            f"trainer.warmup_epochs={min(10, epochs)}",
            *([f"optim.lr={args.lr}"] if pack == 1 else []),
            f"trainer.compile={str(args.sweep_compile).lower()}",
            "trainer.progress=false",
            "bench.latency=false",
            "bench.flops=false",
            "save_delta=false",
            f"paths.results={tmp}/runs",
            f"paths.cache={cache.parent}",  # the data cache the final section filled
            f"hydra.sweep.dir={tmp}/multirun",
            "hydra/launcher=gpus",
            f"hydra.launcher.n_jobs={k}",
            f"jobs_per_gpu={k}",
            f"device={'auto' if device.type == 'cuda' else 'cpu'}",
        ]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", *overrides], capture_output=True, text=True)
        wall = time.perf_counter() - start
        done = [r for _, r in iter_records(Path(tmp, "runs")) if r.get("status") == "ok"]
    train_seconds = sum(r["cost"]["train_seconds"] for r in done)
    # at the full schedule every run trains args.epochs - epochs more epochs at the pace of its epochs 2..n (the first
    # one warms up: cuDNN autotuning, compilation); k jobs train at once
    more = sum(_more_seconds(r, args.epochs) for r in done)
    full_wall = wall + more / k
    out: dict[str, Any] = {
        "runs": args.sweep_runs,
        "ok": len(done),
        "jobs_per_gpu": k,
        "pack": pack,
        "compiled": args.sweep_compile,
        "epochs_run": epochs,
        "epochs": args.epochs,
        "wall_seconds": wall,
        "train_seconds_sum": train_seconds,
        "full_wall_seconds": full_wall,
        "runs_per_hour": 3600 * len(done) / full_wall,
        "extrapolated": epochs != args.epochs,
        "returncode": proc.returncode,
    }
    if proc.returncode != 0:
        out["stderr_tail"] = proc.stderr[-3000:]
    if usual and usual.get("runs"):
        out["usual_runs_per_hour"] = 3600 / usual["runs"][0]["total_seconds"]
        out["ratio_to_usual"] = out["runs_per_hour"] / out["usual_runs_per_hour"]
    log(out)
    return out


def _more_seconds(record: dict[str, Any], epochs: int) -> float:
    """How much longer ``record``'s training takes at ``epochs`` epochs, from the pace of its epochs after the first."""
    history = record["metrics"].get("history") or []
    done = len(history)
    if done >= epochs:
        return 0.0
    times = [h.get("seconds") for h in history]
    if done > 1 and None not in times:
        pace = sum(times[1:]) / (done - 1)
    else:  # one epoch (or a record without epoch times): its own pace, warm-up included
        pace = record["cost"]["train_seconds"] / max(done, 1)
    return (epochs - done) * pace


# -- helpers ---------------------------------------------------------------------------------------
def section_pack(args, device, cache: Path) -> dict[str, Any]:
    """K runs alone, one after another, then the same K runs packed: the same data, seeds and rates."""
    cfg = backbone_config(args)
    if args.pack_img_size:
        cfg["img_size"] = args.pack_img_size
    torch.manual_seed(0)
    bb = backbone_from_config(cfg, 0)
    task = load_data(args, bb, cache, args.pack_protocol)  # tune (the grid's stage): train800 -> val200
    config = TrainConfig(epochs=args.pack_epochs, warmup_epochs=min(10, args.pack_epochs // 10), progress=False,
                         compile=args.pack_compile)  # fmt: skip
    out: dict[str, Any] = {"backbone": cfg["name"], "img_size": list(bb.input_size[1:]), "method": args.method,
                           "protocol": args.pack_protocol, "compiled": args.pack_compile,
                           "epochs": args.pack_epochs, "n_train": len(task.train.labels),
                           "n_eval": len(task.eval.labels), "rows": []}  # fmt: skip

    def fresh(seed: int) -> PackedRun:
        torch.manual_seed(0)  # one backbone for every run (random-init or the same weights)
        model = backbone_from_config(cfg, 0).model
        torch.manual_seed(seed)
        model.reset_classifier(task.num_classes)
        apply_method(model, args.method)
        optimizer = torch.optim.AdamW(param_groups(model, 1e-4), lr=args.lr * (1 + seed % 4) / 2)
        return PackedRun(model, optimizer, task.train.images, task.train.labels, task.eval.images,
                         task.eval.labels, seed=seed)  # fmt: skip

    for k in args.pack_ks:
        alone, start = [], time.perf_counter()
        for seed in range(k):
            run = fresh(seed)
            alone.append(train(run.model, run.train_images, run.train_labels, run.eval_images, run.eval_labels,
                               run.optimizer, config, bb.mean, bb.std, device, seed=seed))  # fmt: skip
        sequential = time.perf_counter() - start
        runs = [fresh(seed) for seed in range(k)]
        start = time.perf_counter()
        packed = train_packed(runs, config, bb.mean, bb.std, device)
        together = time.perf_counter() - start
        gaps = [abs(p.top1 - a.top1) for p, a in zip(packed, alone, strict=True) if not isinstance(p, Exception)]
        ok = [p for p in packed if not isinstance(p, Exception)]
        images = k * len(task.train.labels) * args.pack_epochs
        row = {
            "k": k, "sequential_seconds": sequential, "packed_seconds": together, "ratio": sequential / together,
            "train_seconds_alone": sum(a.train_seconds for a in alone), "eval_seconds_alone": sum(
                a.eval_seconds for a in alone), "max_top1_gap": max(gaps) if gaps else None, "top1_gaps": gaps,
            "failed": len(packed) - len(ok),
            "alone_train_images_per_s": images / sum(a.train_seconds for a in alone),
            "packed_train_images_per_s": images / (ok[0].train_seconds * k) if ok else None,  # its share x K
            "packed_peak_mem_mb": ok[0].peak_mem_mb if ok else None,
            "peak_mem_kind": ok[0].peak_mem_kind if ok else None,
        }  # fmt: skip
        if args.pack_compile:  # another pack of the same shape (other seeds and rates) must compile nothing
            before = dynamo_counters["stats"]["unique_graphs"]
            train_packed([fresh(seed) for seed in range(k, 2 * k)], config, bb.mean, bb.std, device)
            row["graphs_compiled_by_a_second_pack"] = dynamo_counters["stats"]["unique_graphs"] - before
        out["rows"].append(row)
        log(row)
        empty_cache(device)
    return out


def compile_modes(args, device) -> list[bool]:
    mode = args.compile or ("both" if device.type == "cuda" else "eager")
    return {"eager": [False], "compiled": [True], "both": [False, True]}[mode]


def empty_cache(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def log(row: dict[str, Any]) -> None:
    short = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if not isinstance(v, (dict, list))}
    print("  " + ", ".join(f"{k}={v}" for k, v in short.items()), flush=True)


# -- the report ------------------------------------------------------------------------------------
def markdown(result: dict[str, Any]) -> str:
    env, s, args = result["environment"], result["sections"], result["args"]
    report = Report(
        f"Training speed on {result['device_name']}",
        result["command"],
        f"torch {env.get('torch')}, timm {env.get('timm')}, vpeft {env.get('vpeft')}, git {env.get('git_sha')}; "
        f"dense bf16 peak used: {result['bf16_peak_tflops'] or 'unknown'} TFLOP/s.",
    )
    report.bullets(unfinished(s))
    if rows := s.get("step"):
        rows = [{**r, "peak_pct": None if r["peak_share"] is None else 100 * r["peak_share"]} for r in rows]
        cols = [("backbone", "backbone", ""), ("method", "method", ""), ("compiled", "compiled", ""),
                ("batch", "batch", ""), ("dtype", "dtype", ""), ("images/s", "images_per_s", ",.0f"),
                ("tokens", "tokens", ""), ("TFLOP/s", "tflops_per_s", ".1f"), ("% of peak", "peak_pct", ".1f"),
                ("peak MB", "peak_mem_mb", ",.0f")]  # fmt: skip
        report.heading("Training step (AdamW)", 3).table(rows, cols, ["peak MB: " + rows[0]["peak_mem_kind"]])
    runs, notes = [], []
    if (fin := s.get("final")) and "runs" in fin:
        runs += [{**r, "recipe": "vpeft" + (" compiled" if r["compiled"] else " eager")} for r in fin["runs"]]
        notes.append(f"data decoded once, cold: {fin['data_cold_seconds']:.1f} s; the vpeft runs read the cache")
    if (usual := s.get("usual")) and "runs" in usual:
        for r in usual["runs"]:
            runs.append({**r, "recipe": f"usual {r['dtype']}", "train_seconds": r["train_seconds_full"]})
            if r["epochs_run"] != r["epochs"]:
                notes.append(
                    f"usual {r['dtype']}: {r['epochs_run']} of {r['epochs']} epochs run, training extrapolated"
                )
    if runs:
        cols = [("recipe", "recipe", ""), ("data s", "data_seconds", ".1f"), ("train s", "train_seconds", ".1f"),
                ("eval s", "eval_seconds", ".1f"), ("total s", "total_seconds", ".1f"),
                ("train images/s", "train_images_per_s", ",.0f"), ("top-1", "top1", ".2f")]  # fmt: skip
        report.heading(f"One VTAB-1k final run ({args['method']}, {args['epochs']} epochs)", 3).table(runs, cols, notes)
    if (pf := s.get("peft")) and "steps" in pf:
        cols = [("implementation", "method", ""), ("compiled", "compiled", ""), ("batch", "batch", ""),
                ("images/s", "images_per_s", ",.0f"), ("trainable", "trainable", ","),
                ("peak MB", "peak_mem_mb", ",.0f")]  # fmt: skip
        by_mode = pf.get("ours_over_peft_by_mode") or {"eager": pf["ours_over_peft"]}
        notes = [f"vpeft / peft, {mode}: {r:.2f}x" for mode, r in by_mode.items()] + [
            f"{o['variant']} {o['dtype']} batch {o['batch']}: {o['ratio']:.3f}x the bare backbone's latency"
            for o in pf["latency"].get("overheads", [])
        ]
        report.heading(f"LoRA training step: vpeft and peft ({pf['backbone']})", 3).table(pf["steps"], cols, notes)
    if (sc := s.get("scaling")) and "batch" in sc:
        cols = [("batch", "batch", ""), ("images/s", "images_per_s", ",.0f"), ("peak MB", "peak_mem_mb", ",.0f")]
        report.heading(f"LoRA against the batch size ({sc['backbone']})", 3).table(sc["batch"], cols)
        cols = [("prompts", "num_tokens", ""), ("tokens", "tokens", ""), ("images/s", "images_per_s", ",.0f"),
                ("tokens/s", "tokens_per_s", ",.0f"), ("per token / LoRA", "per_token_vs_lora", ".2f")]  # fmt: skip
        report.heading("VPT-deep against its prompt length", 3).table(sc["prompts"], cols)
    if (lat := s.get("latency")) and "rows" in lat:
        cols = [("method", "method", ""), ("dtype", "dtype", ""), ("batch", "batch", ""), ("bare ms", "bare_ms", ".2f"),
                ("unmerged ms", "unmerged_ms", ".2f"), ("unmerged / bare", "unmerged_x", ".3f"),
                ("merged ms", "merged_ms", ".2f"), ("merged / bare", "merged_x", ".3f"),
                ("max p90 / median", "max_p90_over_median", ".2f")]  # fmt: skip
        notes = ["medians of interleaved calls, each synchronised; bare re-timed beside every method"]
        report.heading(f"Inference latency ({lat['backbone']})", 3).table(lat["rows"], cols, notes)
    if (sw := s.get("sweep")) and "runs" in sw:
        cols = [("runs", "runs", ""), ("ok", "ok", ""), ("jobs per GPU", "jobs_per_gpu", ""), ("pack", "pack", ""),
                ("epochs run", "epochs_run", ""), ("wall s", "wall_seconds", ".1f"),
                ("runs per hour", "runs_per_hour", ".1f"), ("usual runs per hour", "usual_runs_per_hour", ".1f"),
                ("ratio", "ratio_to_usual", ".1f")]  # fmt: skip
        notes = [f"runs per hour at {sw['epochs']} epochs" + (" (extrapolated from the shorter runs' training time)"
                 if sw.get("extrapolated") else "")]  # fmt: skip
        report.heading("Sweep throughput (run.py -m, hydra/launcher=gpus)", 3).table([sw], cols, notes)
    if (pk := s.get("pack")) and "rows" in pk:
        cols = [("K", "k", ""), ("one after another s", "sequential_seconds", ".1f"),
                ("packed s", "packed_seconds", ".1f"), ("ratio", "ratio", ".2f"),
                ("max top-1 gap", "max_top1_gap", ".2f"), ("failed", "failed", "")]  # fmt: skip
        notes = [f"{pk['method']} on {pk['backbone']} at {pk['img_size'][0]} px, {pk['epochs']} epochs of "
                 f"{pk['n_train']} images, evaluation on {pk['n_eval']}; wall clock of training and evaluation, "
                 "each run alone after the other, then the same runs packed"]  # fmt: skip
        report.heading("Packed runs against the same runs one after another", 3).table(pk["rows"], cols, notes)
    return report.markdown()


# -- the suite -------------------------------------------------------------------------------------
def speedup_per_run(sections: dict[str, Any]) -> dict[str, float] | None:
    """The usual recipe's time per run over vpeft's best, per dtype; None until both sections ran."""
    fin, usual = sections.get("final"), sections.get("usual")
    if not (fin and usual and "runs" in fin and "runs" in usual):
        return None
    best = min(r["total_seconds"] for r in fin["runs"])
    return {u["dtype"]: u["total_seconds"] / best for u in usual["runs"]}


def run(args: argparse.Namespace, command: str) -> int:
    """Every section in ``args.sections`` on ``args.device``; the files written after each. 0 if all finished."""
    device = resolve_device(args.device)
    name = device_name(device)
    peak = bf16_peak_tflops(name) if device.type == "cuda" else None
    result: dict[str, Any] = {
        "kind": "vpeft-train-speed",
        "command": command,
        "device_name": name,
        "bf16_peak_tflops": peak,
        "environment": environment(device),
        "args": vars(args),
        "sections": {},
    }
    out = Path(args.out)
    stem = f"train_{slug(name if device.type == 'cuda' else 'cpu')}{'_quick' if args.quick else ''}"
    cache_root = args.cache or os.environ.get("VPEFT_CACHE") or Path.home() / ".cache" / "vpeft"
    cache = Path(cache_root) / "data"  # where run.py keeps decoded splits
    s = result["sections"]
    measures = {
        "step": lambda: section_step(args, device, peak, s.setdefault("step", [])),
        "final": lambda: section_final(args, device, cache),
        "usual": lambda: section_usual(args, device, cache),
        "peft": lambda: section_peft(args, device, peak),
        "scaling": lambda: section_scaling(args, device),
        "latency": lambda: section_latency(args, device, s.setdefault("latency", {})),
        "profile": lambda: section_profile(args, device),
        "sweep": lambda: section_sweep(args, device, cache, s.get("usual")),
        "pack": lambda: section_pack(args, device, cache),
    }

    def write() -> None:
        if speedup := speedup_per_run(s):
            result["speedup_per_run"] = speedup
        write_result(out, stem, result, markdown(result))

    status = run_sections(result, [(n, measures[n]) for n in SECTIONS if n in args.sections], write)
    print(f"wrote {out / stem}.json and .md", flush=True)
    return status
