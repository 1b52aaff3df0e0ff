"""AdapterFusion: learn to combine N adapters trained on other tasks, which stay frozen.

Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition for Transfer Learning", EACL 2021:
stage one trains one adapter per source task; stage two loads them all, frozen, at their positions and
learns per position a fusion attention (``vpeft.layers.AdapterFusion``) plus the target task's head.

The adapters are the delta files of ``adapter_houlsby`` or ``adapter_pfeiffer`` runs on the same
backbone, named by path in ``adapters``. The fusion's delta file holds only the fusion parameters and
the head; its config names the adapter files and their SHA-256 (filled in when the method is applied),
so loading it needs those files and refuses ones that changed since.

LayerNorms: an ``adapter_houlsby`` file trained with ``train_layernorm`` also holds its task's block
LayerNorms (``blocks.<i>.norm1`` / ``norm2``). AdapterFusion keeps everything of stage one frozen (the
paper's section 3.1, stage two: the pretrained parameters and all adapters fixed, only the fusion and
the head learn), and N tasks' LayerNorms give no single one to use, so the fused model keeps the
backbone's own LayerNorms, frozen: those tensors of the adapter files are read past, and the fusion's
delta holds none.

Regularisation: as AdapterHub's fusion configs (``regularization=True`` by default), each step's loss gets
``0.01 * ||I - V||^2`` summed over the fusion layers, which keeps every value matrix near the identity it
starts at; ``regularization: false`` trains without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import torch
from torch import nn

from vpeft.errors import ConfigError, DataError
from vpeft.layers import AdapterFusion, FrozenAdapter, attach
from vpeft.methods._base import Method, MethodConfig, check, embed_dim, register, require, vit_blocks
from vpeft.methods._delta_file import backbone_name, read_delta

ADAPTER_METHODS = {"adapter_houlsby": ("attn", "mlp"), "adapter_pfeiffer": ("mlp",)}  # method -> adapter sites


@dataclasses.dataclass
class AdapterFusionConfig(MethodConfig):
    adapters: tuple[str, ...] = ()  # delta files of adapter_houlsby / adapter_pfeiffer runs, at least two
    checksums: tuple[str, ...] = ()  # their SHA-256; empty: computed when applied (a saved delta holds them)
    regularization: bool = True  # AdapterHub's default: 0.01 * ||I - V||^2 per fusion layer added to the loss

    def __post_init__(self):
        for name in ("adapters", "checksums"):
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)):
                value = (value,)
            check(
                isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in value),
                f"adapter_fusion {name} must be a list of file paths, got {value!r}",
            )
            setattr(self, name, tuple(os.fspath(v) for v in value))
        check(
            len(self.adapters) != 1,
            "adapter_fusion fuses at least two adapters; with one, train that adapter (or fuse it with others)",
        )
        check(
            isinstance(self.regularization, bool),
            f"adapter_fusion regularization must be true or false, got {self.regularization!r}",
        )
        check(
            not self.checksums or len(self.checksums) == len(self.adapters),
            f"adapter_fusion has {len(self.checksums)} checksums for {len(self.adapters)} adapters",
        )


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_adapter(path: str, expected_sha: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """One adapter delta file: its tensors, metadata and SHA-256, checked to be an adapter run's."""
    tensors, info = read_delta(path)
    digest = sha256(path)
    if expected_sha and digest != expected_sha:
        raise DataError(
            f"adapter file {path} changed since this fusion was set up (SHA-256 {digest[:12]}..., expected "
            f"{expected_sha[:12]}...): the fusion was trained on other adapters; restore the original file"
        )
    if info["method"] not in ADAPTER_METHODS:
        raise DataError(
            f"{path} holds a {info['method']} delta; adapter_fusion fuses {' or '.join(ADAPTER_METHODS)} deltas"
        )
    return tensors, info, digest


@register("adapter_fusion")
class AdapterFusionMethod(Method):
    Config = AdapterFusionConfig
    runs_alone = "AdapterFusion loads a pool of adapter files into each run and regularises its values"

    def inject(self, model: nn.Module) -> None:
        cfg: AdapterFusionConfig = self.config
        if not cfg.adapters:
            raise ConfigError(
                "adapter_fusion needs adapters=[...]: the delta files of at least two adapter_houlsby or "
                "adapter_pfeiffer runs on this backbone"
            )
        dim = embed_dim(model, self.name)
        files = [read_adapter(p, cfg.checksums[i] if cfg.checksums else None) for i, p in enumerate(cfg.adapters)]
        methods = {info["method"] for _, info, _ in files}
        if len(methods) > 1:
            raise DataError(f"adapter_fusion needs adapters of one kind; got {', '.join(sorted(methods))}")
        sites = ADAPTER_METHODS[methods.pop()]
        ours = backbone_name(model)
        for path, (_, info, _) in zip(cfg.adapters, files):
            theirs = info["backbone"]
            if ours and theirs and theirs.split(".")[0] != ours.split(".")[0]:
                raise DataError(f"adapter {path} was trained on {theirs}; this model is {ours}")
        blocks = vit_blocks(model, self.name, sites)
        used: list[set[str]] = [set() for _ in files]
        planned = []  # every adapter is read and checked before the model changes
        for i, block in enumerate(blocks):
            for site in sites:
                host = require(block, site, f"{self.name} (block {i})")
                weight = next(host.parameters())
                dd = {"device": weight.device, "dtype": weight.dtype}
                prefix = f"blocks.{i}.{site}.adapter."
                frozen = []
                for j, (tensors, info, _) in enumerate(files):
                    state = {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}
                    used[j] |= {prefix + k for k in state}
                    frozen.append(_frozen_adapter(cfg.adapters[j], prefix, state, dim, info["config"], dd))
                planned.append((host, AdapterFusion(dim, frozen, **dd)))
        for j, (tensors, _, _) in enumerate(files):
            # the task's own LayerNorms (adapter_houlsby's train_layernorm) stay unused: the backbone's are kept
            extra = sorted(k for k in set(tensors) - used[j] if ".adapter." in k)
            if extra:
                raise DataError(
                    f"adapter {cfg.adapters[j]} has adapters this model has no place for ({extra[:3]}): it was "
                    f"trained on a deeper backbone than this one ({len(blocks)} blocks)"
                )
        for host, fusion in planned:
            attach(host, "fusion", fusion)
        cfg.checksums = tuple(digest for _, _, digest in files)  # the saved delta names exactly these files

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        """AdapterHub's ``get_fusion_regularization_loss``: the value penalty summed over every fusion layer."""
        if not self.config.regularization:
            return None
        penalties = [m.value_penalty() for m in model.modules() if isinstance(m, AdapterFusion)]
        return torch.stack(penalties).sum() if penalties else None


def _frozen_adapter(
    path: str, prefix: str, state: dict[str, torch.Tensor], dim: int, config: dict[str, Any], dd: dict[str, Any]
) -> FrozenAdapter:
    expected = {"down.weight", "down.bias", "up.weight", "up.bias"}
    if set(state) != expected:
        raise DataError(
            f"adapter {path} has no complete adapter at {prefix.rstrip('.')} (found {sorted(state)}): it was "
            "trained on a backbone with fewer blocks or another layout"
        )
    bottleneck = state["down.weight"].shape[0]
    if tuple(state["down.weight"].shape) != (bottleneck, dim):
        raise DataError(
            f"adapter {path} has width {state['down.weight'].shape[1]} at {prefix.rstrip('.')}; this model's is {dim}"
        )
    act = config.get("act", "gelu")
    adapter = FrozenAdapter(dim, bottleneck, act, **dd)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            p.copy_(state[name])
    adapter.requires_grad_(False)
    return adapter
