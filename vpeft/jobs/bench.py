"""The bench job (``python run.py method=lora bench.only=true``): a (backbone, method) measured, no training.

Random weights (costs do not depend on them), so no download and no dataset is needed. A
measurement is always taken anew (it is the point of asking); its record is named by what was
measured: the device, the backbone, the method and its config, the input size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

import vpeft
from vpeft.backbones import create_backbone
from vpeft.bench import BenchConfig, bench_record, bench_record_path, benchmark, write_bench_record
from vpeft.jobs.runner import Context, Job, Plan
from vpeft.jobs.train import plan_run

log = logging.getLogger("vpeft")


class BenchJob(Job):
    kind = "bench"
    skippable = False
    records_failures = False  # a bench record holds a measurement; a failed one has none to hold

    def plan(self, cfg: DictConfig) -> Plan:
        run = plan_run(cfg)  # the same validation and identity as a training run of this config
        return Plan(cfg=run.cfg, resolved=run.resolved, overrides=run.overrides, identity=run.identity,
                    record_path=None, extra=run.extra)  # fmt: skip

    def base_record(self, plan: Plan, env: dict[str, Any], started: str) -> dict[str, Any]:
        return {"env": env, "started_at": started}

    def execute(self, plan: Plan, device: torch.device, record: dict[str, Any], ctx: Context) -> None:
        r = plan.resolved
        bb_cfg, bench = r["backbone"], r["bench"]
        num_classes = int(bench.get("num_classes", 100))
        torch.manual_seed(plan.identity["seed"])

        def make():
            return create_backbone(bb_cfg["name"], num_classes, pretrained=False, img_size=bb_cfg.get("img_size"))

        backbone = make()
        method_kwargs = {k: v for k, v in r["method"].items() if k != "name"}
        model = vpeft.apply_method(backbone.model, plan.identity["method"], **method_kwargs)
        cfg = BenchConfig.from_dict(bench, ignore=("only", "num_classes"))
        ctx.phase = "measuring"
        report = benchmark(model, make().model, backbone.input_size, device, cfg)
        measured = bench_record(report, plan.identity["backbone"], record["env"])
        record.clear()
        record.update(measured)
        plan.record_path = ctx.state["path"] = bench_record_path(r["paths"]["bench"], record)

    def write(self, path: Path, record: dict[str, Any]) -> bool:
        write_bench_record(path, record)
        return True

    def after(self, ctx: Context, record: dict[str, Any], ok: bool) -> None:
        if ok:
            print(summary(record))
            print(f"bench record: {ctx.state['path']}")


def summary(record: dict[str, Any]) -> str:
    p, lines = record["params"], []
    lines.append(
        f"{record['backbone']} + {record['method']} on {record['env']['device_name']}: "
        f"{p['trainable_excl_head']:,} trainable (excl. head), delta {p['delta_bytes'] / 1024:.1f} KiB"
    )
    if record["flops"]:
        f = record["flops"]
        ratio = f" ({f['ratio']:.3f}x the backbone)" if f.get("ratio") else ""
        lines.append(f"  forward: {f['macs'] / 1e9:.3f} GMACs{ratio}")
    for s in (record["latency"] or {}).get("results", []):
        lines.append(
            f"  latency {s['variant']:8s} {s['dtype']} bs {s['batch']:3d}: median {s['median_ms']:.2f} ms, "
            f"p90 {s['p90_ms']:.2f} ms"
        )
    if record["training"]:
        t = record["training"]
        lines.append(
            f"  training: {t['images_per_s']:.1f} images/s, peak {t['peak_mem_mb']:.0f} MB ({t['peak_mem_kind']})"
        )
    return "\n".join(lines)
