"""The serving suite: many tasks from one backbone, measured in one process: mixed-task batches, swaps, memory.

Sections (every variant timed in this process, on the same device, inputs and dtype):
  mixed   images/s and p50/p90 latency against T, the number of distinct tasks in a batch, for each
          method (--methods) and batch size: vpeft.serve's MultiDeltaModel on mixed batches (each strategy
          that applies: gather, segment), against (a) the bare backbone, (b) one single-task vpeft model,
          unmerged and merged, (c) the batch sorted by task with each sub-batch run through one resident
          model swapped to its task (unmerged; and merged in place for mergeable methods, swaps timed in),
          (d) T merged copies of the backbone (unmerged copies for non-mergeable methods), with their memory.
  swap    attaching a delta from its file and from memory, merging and unmerging in place, detaching:
          the median and p90 of --swap-repeats rounds, for each method.
  memory  LoRA deltas resident (--resident, 1 to 1,000): memory added against the deltas' own size, and
          the peak of a forward pass with min(N, batch) distinct tasks.

The targets (GPU, bf16, ViT-B/16, batch 256, T=64) are reported beside the measured numbers; on other devices
and sizes the same ratios are reported for what ran. ``run(args)`` takes the arguments of scripts/bench_serve.py
and writes serve_<device>.json (every number, the arguments, the environment) and .md through
vpeft.bench.report. Timing: vpeft.bench.latency's protocol (warm-up calls, then each call timed alone with the
device synchronised, variants taking turns in a rotating order).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from vpeft.backbones import create_backbone
from vpeft.bench._common import autocast
from vpeft.bench.latency import time_interleaved
from vpeft.bench.report import Report, run_sections, unfinished, write_result
from vpeft.core import apply_method, merge, save_delta, trainable_parameters
from vpeft.env import device_name, environment, resolve_device
from vpeft.files import slug
from vpeft.serve import MultiDeltaModel, TaskDelta, mergeable_servable_methods

SECTIONS = ("mixed", "swap", "memory")
DEFAULT_METHODS = ["lora", "ssf", "ia3", "bitfit", "vpt_deep", "adapter_pfeiffer"]
LORA_QV = {"r": 8, "targets": ["q", "v"]}  # the memory section's deltas (LoRA's default: r 8 on q and v)
TARGETS = {"lora_T64": 0.85, "vector_T64": 0.95, "attach_ms": 20.0, "merge_ms": 5.0, "memory_ratio": 1.0}


def log(text: str) -> None:
    print(text, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def module_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])


# -- backbones and deltas ----------------------------------------------------------------------------
def make_backbone(args) -> nn.Module:
    """The bare backbone every variant copies: same weights everywhere, eval mode, on the CPU."""
    torch.manual_seed(args.seed)
    if args.offline:
        return create_backbone(args.backbone, args.num_classes, offline=args.offline, img_size=args.img_size).model
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    return timm.create_model(args.backbone, pretrained=False, num_classes=args.num_classes, **kwargs).eval()


def input_size(model: nn.Module) -> tuple[int, int, int]:
    h, w = model.patch_embed.img_size
    return (3, int(h), int(w))


def method_config(method: str) -> dict[str, Any]:
    return dict(LORA_QV) if method == "lora" else {}


def template(bare: nn.Module, method: str) -> TaskDelta:
    model = apply_method(copy.deepcopy(bare), method, **method_config(method))
    return TaskDelta.from_model(model, "template")


def task_deltas(tmpl: TaskDelta, n: int, seed: int):
    """``n`` distinct deltas shaped like ``tmpl`` (random perturbations of it), generated one at a time."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        tensors = {k: v + torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.02 for k, v in tmpl.tensors.items()}
        yield TaskDelta(f"task{i}", tmpl.method, tmpl.config, tensors, tmpl.backbone, tmpl.weights)


def single_model(bare: nn.Module, delta: TaskDelta, merged: bool) -> nn.Module:
    """The project's single-task model for ``delta`` (apply_method + its tensors), merged if asked."""
    model = apply_method(copy.deepcopy(bare), delta.method, **delta.config)
    params = trainable_parameters(model)
    with torch.no_grad():
        for k, v in delta.tensors.items():
            params[k].copy_(v)
    return merge(model) if merged else model.eval()


def mixed_ids(batch: int, tasks: int, seed: int) -> list[int]:
    """``batch`` task ids with exactly ``min(tasks, batch)`` distinct tasks, interleaved (not grouped)."""
    ids = torch.arange(batch) % min(tasks, batch)
    return ids[torch.randperm(batch, generator=torch.Generator().manual_seed(seed))].tolist()


def groups(ids: list[int]) -> list[tuple[int, list[int]]]:
    out: dict[int, list[int]] = {}
    for i, t in enumerate(ids):
        out.setdefault(t, []).append(i)
    return sorted(out.items())


# -- the mixed section ---------------------------------------------------------------------------------
def section_mixed(args, device: torch.device, rows: list[dict[str, Any]]) -> None:
    """Fills ``rows`` as it measures, so a run stopped part-way keeps what it measured."""
    bare_cpu = make_backbone(args)
    for method in args.methods:
        measure_method(args, device, bare_cpu, method, rows)
        empty_cache(device)


def measure_method(args, device: torch.device, bare_cpu: nn.Module, method: str, rows: list[dict[str, Any]]) -> None:
    n_tasks = max(args.tasks)
    mergeable = method in mergeable_servable_methods()
    log(f"[mixed] {method}: building {n_tasks} deltas, the multi-task model and the baselines")
    deltas = list(task_deltas(template(bare_cpu, method), n_tasks, args.seed + 1))
    models = {
        "bare": copy.deepcopy(bare_cpu).to(device),
        "multi": MultiDeltaModel.from_deltas(copy.deepcopy(bare_cpu), deltas).to(device),
        "single unmerged": single_model(bare_cpu, deltas[0], merged=False).to(device),
    }
    models["multi"].sync_swaps = False  # (c)'s merges queue their kernels between sub-batches, as serving would
    if mergeable:
        models["single merged"] = single_model(bare_cpu, deltas[0], merged=True).to(device)
    copies = [single_model(bare_cpu, d, merged=mergeable).to(device) for d in deltas[: min(n_tasks, args.max_copies)]]
    del deltas
    size = input_size(bare_cpu)
    for batch in args.batches:
        x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(args.seed)).to(device)
        fns, meta = variants(args, device, method, x, models, copies)
        log(f"[mixed] {method}, batch {batch}: {len(fns)} variants, {args.warmup} warm-up + {args.iters} timed calls")
        with torch.inference_mode():
            times = time_interleaved({k: with_autocast(fn, args.dtype, device) for k, fn in fns.items()}, args.warmup,
                                     args.iters, device)  # fmt: skip
        base = {k: statistics.median(v) for k, v in times.items() if k in ("bare", "single unmerged")}
        for key, ms in times.items():
            m, p50 = meta[key], float(statistics.median(ms))
            row = {
                "method": method,
                "batch": batch,
                "T": m["T"],
                "variant": m.get("variant", key),
                "strategy": m.get("strategy"),
                "auto_strategy": m.get("auto"),
                "p50_ms": p50,
                "p90_ms": float(np.percentile(ms, 90)),
                "mean_ms": float(statistics.fmean(ms)),
                "min_ms": float(min(ms)),
                "n": len(ms),
                "images_per_s": batch / p50 * 1e3,
                "vs_single_unmerged": base["single unmerged"] / p50,
                "vs_bare": base["bare"] / p50,
                "memory_mb": m.get("memory_mb"),
            }
            rows.append(row)
            log(
                f"  {method} batch {batch} T={row['T']} {row['variant']}: {row['images_per_s']:,.1f} images/s "
                f"(p50 {p50:.2f} ms, p90 {row['p90_ms']:.2f} ms), {row['vs_single_unmerged']:.3f}x single unmerged"
            )


def variants(args, device, method: str, x: torch.Tensor, models: dict[str, nn.Module], copies: list[nn.Module]):
    """The timed calls of one (method, batch) and what each row says about itself."""
    batch, multi = x.shape[0], models["multi"]
    mergeable = method in mergeable_servable_methods()
    fns: dict[str, Callable[[], Any]] = {}
    meta: dict[str, dict[str, Any]] = {}
    for name in ("bare", "single unmerged", "single merged"):
        if name in models:
            fns[name], meta[name] = call(models[name], x), {"T": 1}
    for t in sorted(set(args.tasks)):
        ids = mixed_ids(batch, t, args.seed + t)
        real_t = len(set(ids))
        strategies = args.strategies if (multi.server.segmentable and real_t > 1) else ["gather"]
        for strategy in strategies:
            key = f"mixed {strategy} T={real_t}"
            fns[key] = call(run_mixed, multi, x, ids, strategy)
            auto = multi.strategy_for(real_t, device)
            meta[key] = {"T": real_t, "variant": f"mixed {strategy}" if real_t > 1 else "mixed (single task)",
                         "strategy": strategy if real_t > 1 else "single", "auto": auto,
                         "memory_mb": multi.bank_bytes() / 2**20}  # fmt: skip
        if real_t == 1:
            continue
        parts = [(task, torch.tensor(rows_, device=device)) for task, rows_ in groups(ids)]
        if not args.no_sorted:
            key = f"sorted sub-batches T={real_t}"
            fns[key], meta[key] = call(run_sorted, multi, x, parts), {"T": real_t, "variant": "sorted sub-batches"}
            if mergeable:
                key = f"sorted merge swaps T={real_t}"
                fns[key] = call(run_merge_swaps, multi, x, parts)
                meta[key] = {"T": real_t, "variant": "sorted merge swaps"}
        if real_t <= len(copies):
            kind = f"{'merged' if mergeable else 'unmerged'} copies"
            key = f"{kind} T={real_t}"
            fns[key] = call(run_copies, copies, x, parts)
            meta[key] = {"T": real_t, "variant": kind, "memory_mb": real_t * module_bytes(copies[0]) / 2**20}
    return fns, meta


def call(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    return lambda: fn(*args)


def with_autocast(fn: Callable[[], Any], dtype: str, device: torch.device) -> Callable[[], Any]:
    def run() -> Any:
        with autocast(dtype, device):
            return fn()

    return run


def run_mixed(multi: MultiDeltaModel, x: torch.Tensor, ids: list[int], strategy: str) -> torch.Tensor:
    multi.strategy = strategy
    return multi(x, ids)


def run_sorted(multi: MultiDeltaModel, x: torch.Tensor, parts: list[tuple[int, torch.Tensor]]) -> list:
    """(c) unmerged: each task's sub-batch through the resident model as a single-task model."""
    return [multi(x.index_select(0, rows_), task) for task, rows_ in parts]


def run_copies(copies: list[nn.Module], x: torch.Tensor, parts: list[tuple[int, torch.Tensor]]) -> list:
    """(d): each task's sub-batch through its own copy of the backbone."""
    return [copies[task](x.index_select(0, rows_)) for task, rows_ in parts]


def run_merge_swaps(multi: MultiDeltaModel, x: torch.Tensor, parts: list[tuple[int, torch.Tensor]]) -> list:
    """(c) with merging: each task's sub-batch at the bare backbone's speed, its merge and unmerge timed in."""
    out = []
    for task, rows_ in parts:
        multi.merge(task)  # unmerges the previous task first
        out.append(multi(x.index_select(0, rows_), task))
    multi.unmerge()
    return out


# -- the swap section ----------------------------------------------------------------------------------
def section_swap(args, device: torch.device) -> dict[str, Any]:
    bare_cpu = make_backbone(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vpeft-serve-") as tmp:
        for method in args.methods:
            tmpl = template(bare_cpu, method)
            deltas = list(task_deltas(tmpl, 2, args.seed + 7))
            path = Path(tmp) / f"{method}.safetensors"
            model = apply_method(copy.deepcopy(bare_cpu), method, **tmpl.config)
            trainable_parameters(model)  # the file is what save_delta writes for a model of this method
            with torch.no_grad():
                for k, p in trainable_parameters(model).items():
                    p.copy_(deltas[1].tensors[k])
            save_delta(model, path)
            del model
            multi = MultiDeltaModel.from_deltas(copy.deepcopy(bare_cpu).to(device), deltas[:1])  # one resident task
            ops: dict[str, list[float]] = {}
            for _ in range(args.swap_repeats):
                ev = multi.attach(path)
                ops.setdefault("attach (file)", []).append(ev.seconds)
                if method in mergeable_servable_methods():
                    ops.setdefault("merge", []).append(multi.merge(ev.task).seconds)
                    ops.setdefault("unmerge", []).append(multi.unmerge().seconds)
                ops.setdefault("detach", []).append(multi.detach(ev.task).seconds)
                ev = multi.attach(deltas[1], name="from memory")
                ops.setdefault("attach (memory)", []).append(ev.seconds)
                multi.detach(ev.task)
            for op, secs in ops.items():
                ms = [s * 1e3 for s in secs]
                rows.append(
                    {
                        "method": method,
                        "op": op,
                        "median_ms": float(statistics.median(ms)),
                        "p90_ms": float(np.percentile(ms, 90)),
                        "n": len(ms),
                        "delta_mb": tmpl.nbytes / 2**20,
                    }
                )
                log(f"  [swap] {method} {op}: median {rows[-1]['median_ms']:.3f} ms, p90 {rows[-1]['p90_ms']:.3f} ms")
            del multi
            empty_cache(device)
    return {"rows": rows, "note": "attach (file) reads a safetensors file from the page cache; one other task resident"}


# -- the memory section --------------------------------------------------------------------------------
def rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def track_large_allocations() -> bool:
    """On glibc, serve allocations of 64 KiB and more by mmap and give them back on free, so the process RSS
    follows the tensors alive; glibc otherwise raises that threshold as it goes and refills freed heap."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 64 * 1024) == 1  # M_MMAP_THRESHOLD (setting it also stops its adjustment)
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def memory_now(device: torch.device) -> int | None:
    if device.type == "cuda":
        sync(device)
        return torch.cuda.memory_allocated(device)
    gc.collect()
    return rss_bytes()


def section_memory(args, device: torch.device) -> dict[str, Any]:
    bare_cpu = make_backbone(args)
    size = input_size(bare_cpu)
    tmpl = template(bare_cpu, "lora")
    head_bytes = sum(v.numel() * v.element_size() for k, v in tmpl.tensors.items() if k.startswith("head."))
    batch = args.memory_batch or max(args.batches)
    kind = "cuda allocated" if device.type == "cuda" else "process RSS"
    if device.type != "cuda" and not track_large_allocations():
        kind += " (glibc malloc not tunable here: freed memory may be reused, understating what is added)"
    rows = []
    for n in sorted(set(args.resident)):
        empty_cache(device)
        multi = MultiDeltaModel(copy.deepcopy(bare_cpu).to(device))
        before = memory_now(device)
        multi.reserve(n)
        start = time.perf_counter()
        for delta in task_deltas(tmpl, n, args.seed + 11):
            multi.attach(delta)
        attach_s = time.perf_counter() - start
        after = memory_now(device)
        ids = mixed_ids(batch, min(n, batch), args.seed)
        x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(args.seed)).to(device)
        forward = with_autocast(call(multi, x, ids), args.dtype, device)
        with torch.inference_mode():
            forward()  # warm
            base = None
            if device.type == "cuda":  # a CPU process has no per-call peak that can be read reliably
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            sync(device)
            t0 = time.perf_counter()
            forward()
            sync(device)
            forward_s = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        payload = multi.payload_bytes()
        row = {
            "deltas": n,
            "payload_bytes": payload,
            "payload_bytes_excl_head": payload - n * head_bytes,
            "bank_bytes": multi.bank_bytes(),
            "added_bytes": None if before is None or after is None else after - before,
            "added_over_payload": None if before is None or after is None else (after - before) / payload,
            "forward_peak_over_resident_mb": None if base is None or peak is None else (peak - base) / 2**20,
            "forward_batch": batch,
            "forward_tasks": len(set(ids)),
            "forward_s": forward_s,
            "attach_all_s": attach_s,
            "copies_mb": n * module_bytes(bare_cpu) / 2**20,
        }
        rows.append(row)
        added = "?" if row["added_bytes"] is None else f"{row['added_bytes'] / 2**20:,.1f}"
        log(
            f"  [memory] {n} LoRA deltas: bank {row['bank_bytes'] / 2**20:,.1f} MB, payload {payload / 2**20:,.1f} MB, "
            f"added {added} MB ({kind}); forward batch {batch} with {row['forward_tasks']} tasks {forward_s:.3f} s"
        )
        del multi
    return {
        "rows": rows,
        "kind": kind,
        "delta": {"method": "lora", "config": tmpl.config, "bytes": tmpl.nbytes, "head_bytes": head_bytes},
        "backbone_bytes": module_bytes(bare_cpu),
    }


# -- targets and the report ----------------------------------------------------------------------------
def best_ratio(rows: list[dict], method: str) -> dict | None:
    """The mixed-batch row at the largest T and batch measured, best strategy, for ``method``."""
    mine = [r for r in rows if r["method"] == method and r["variant"].startswith("mixed")]
    if not mine:
        return None
    batch = max(r["batch"] for r in mine)
    t = max(r["T"] for r in mine if r["batch"] == batch)
    return max((r for r in mine if r["batch"] == batch and r["T"] == t), key=lambda r: r["vs_single_unmerged"])


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    s, out = result["sections"], []
    rows = s.get("mixed") if isinstance(s.get("mixed"), list) else []
    where = f"{result['device_name']}, {result['args']['dtype']}, {result['args']['backbone']}"
    for method, goal in (
        ("lora", TARGETS["lora_T64"]),
        *((m, TARGETS["vector_T64"]) for m in ("ssf", "ia3", "bitfit")),
    ):
        r = best_ratio(rows, method)
        if r is not None:
            out.append(
                {
                    "target": f"{method}: mixed-batch images/s over single-task unmerged (goal at batch 256, T=64)",
                    "goal": f">= {goal:.2f}",
                    "measured": round(r["vs_single_unmerged"], 3),
                    "met": r["vs_single_unmerged"] >= goal,
                    "as_run": f"batch {r['batch']}, T={r['T']}, {r['strategy']}; {where}",
                }
            )
    swaps = (s.get("swap") or {}).get("rows", [])
    for op, goal, name in (("attach (file)", TARGETS["attach_ms"], "attach a LoRA delta from its file"),):
        r = next((r for r in swaps if r["method"] == "lora" and r["op"] == op), None)
        if r:
            out.append(
                {
                    "target": name,
                    "goal": f"< {goal:g} ms",
                    "measured": round(r["median_ms"], 3),
                    "met": r["median_ms"] < goal,
                    "as_run": where,
                }
            )
    for op in ("merge", "unmerge"):
        r = next((r for r in swaps if r["method"] == "lora" and r["op"] == op), None)
        if r:
            out.append(
                {
                    "target": f"LoRA {op} in place (GPU)",
                    "goal": f"< {TARGETS['merge_ms']:g} ms",
                    "measured": round(r["median_ms"], 3),
                    "met": r["median_ms"] < TARGETS["merge_ms"],
                    "as_run": where,
                }
            )
    mem = (s.get("memory") or {}).get("rows", [])
    if mem:
        r = max(mem, key=lambda r: r["deltas"])
        ratio = r["added_over_payload"]
        out.append(
            {
                "target": f"{r['deltas']} resident LoRA deltas (r 8 on q,v): memory added over their own size",
                "goal": f"<= {TARGETS['memory_ratio']:.2f}",
                "measured": None if ratio is None else round(ratio, 3),
                "met": None if ratio is None else ratio <= TARGETS["memory_ratio"],
                "as_run": f"{s['memory']['kind']}; bank/payload {r['bank_bytes'] / r['payload_bytes']:.4f}; {where}",
            }
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    env, s, a = result["environment"], result["sections"], result["args"]
    report = Report(
        f"Serving many tasks on {result['device_name']}",
        result["command"],
        f"{a['backbone']}{' (' + a['offline'] + ')' if a.get('offline') else ''} at {a['input_size'][1]} px, "
        f"{a['dtype']}, {a['num_classes']} classes per task; torch {env.get('torch')}, timm {env.get('timm')}, "
        f"{env.get('torch_threads')} threads, git {env.get('git_sha')}; {a['warmup']} warm-up + {a['iters']} timed "
        f"calls per variant, interleaved; load average {env.get('loadavg_at_start', ['?'])[0]} at the start, "
        f"{env.get('loadavg_now', ['?'])[0]} at the end ({env.get('cpu_count')} CPUs).",
    )
    if result.get("targets"):
        report.targets([{**t, "wanted": t["goal"]} for t in result["targets"]], [("as run", "as_run", "")])
    mixed = s.get("mixed")
    if isinstance(mixed, list) and mixed:
        report.heading("Mixed-task batches").text(
            "images/s from the median call; `x single` = images/s over the single-task unmerged model's "
            "(vpeft.apply_method), `x bare` over the bare backbone's; `auto` = the strategy `strategy='auto'` picks."
        )
        cols = [("method", "method", ""), ("batch", "batch", ""), ("T", "T", ""), ("variant", "variant", ""),
                ("auto", "auto_strategy", ""), ("images/s", "images_per_s", ""), ("p50 ms", "p50_ms", ""),
                ("p90 ms", "p90_ms", ""), ("min ms", "min_ms", ""), ("x single", "vs_single_unmerged", ""),
                ("x bare", "vs_bare", ""), ("MB", "memory_mb", "")]  # fmt: skip
        report.table(mixed, cols).text("MB: the resident deltas' banks (mixed), or the T model copies (copies).")
    swap = s.get("swap")
    if isinstance(swap, dict) and swap.get("rows"):
        cols = [("method", "method", ""), ("op", "op", ""), ("median ms", "median_ms", ""), ("p90 ms", "p90_ms", ""),
                ("n", "n", ""), ("delta MB", "delta_mb", "")]  # fmt: skip
        report.heading("Swaps").text(swap["note"]).table(swap["rows"], cols)
    mem = s.get("memory")
    if isinstance(mem, dict) and mem.get("rows"):
        report.heading("Resident LoRA deltas").text(
            f"LoRA {mem['delta']['config']}, {mem['delta']['bytes'] / 2**20:.3f} MB per delta with its head "
            f"({mem['delta']['head_bytes'] / 2**20:.3f} MB); added: {mem['kind']} after attaching minus before "
            "(on a CPU the process RSS, coarse: the bank column is the exact account); forward peak: CUDA's peak "
            "during one forward pass over what was allocated before it (GPU only); "
            f"N copies: N x {mem['backbone_bytes'] / 2**20:,.1f} MB."
        )
        mb = 2**20
        cols = [("deltas", "deltas", ""), ("payload MB", lambda r: r["payload_bytes"] / mb, ""),
                ("bank MB", lambda r: r["bank_bytes"] / mb, ""),
                ("added MB", lambda r: None if r["added_bytes"] is None else r["added_bytes"] / mb, ""),
                ("added / payload", "added_over_payload", ""), ("forward peak MB", "forward_peak_over_resident_mb", ""),
                ("tasks in batch", "forward_tasks", ""), ("forward s", "forward_s", ""),
                ("N copies MB", "copies_mb", "")]  # fmt: skip
        report.table(mem["rows"], cols)
    return report.bullets(unfinished(s)).markdown()


# -- the suite -------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, command: str) -> int:
    """Every section in ``args.sections``; the files written after each, the targets printed at the end."""
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    args.iters = args.iters if args.iters is not None else (20 if device.type == "cuda" else 3)
    name = device_name(device)
    args.input_size = list(input_size(make_backbone(args)))
    result: dict[str, Any] = {
        "kind": "vpeft-serve-bench",
        "command": command,
        "device_name": name,
        "environment": {**environment(device), "loadavg_at_start": list(os.getloadavg())},
        "args": vars(args),
        "sections": {},
        "targets": [],
    }
    out = Path(args.out)
    stem = f"serve_{slug(name) if device.type == 'cuda' else 'cpu'}{'_quick' if args.quick else ''}"
    stem += f"_{slug(args.tag)}" if args.tag else ""
    s = result["sections"]
    measures = {
        "mixed": lambda: section_mixed(args, device, s.setdefault("mixed", [])),
        "swap": lambda: section_swap(args, device),
        "memory": lambda: section_memory(args, device),
    }
    started = time.perf_counter()

    def write() -> None:
        result["targets"] = targets(result)
        result["seconds"] = time.perf_counter() - started
        result["environment"]["loadavg_now"] = list(os.getloadavg())
        write_result(out, stem, result, markdown(result))

    status = run_sections(result, [(n, measures[n]) for n in SECTIONS if n in args.sections], write)
    for t in result["targets"]:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        log(f"target: {t['target']}: {t['measured']} (goal {t['goal']}) {verdict} [{t['as_run']}]")
    log(f"wrote {out / stem}.json and .md in {result['seconds']:.0f} s")
    return status
