"""How each method's deltas live on a resident backbone: the tensors a delta file holds, the sites they
fill, and, for methods whose delta folds into the weights, how it merges in and back out in place.

Unmerging restores the weights a merge changed from a copy kept while merged, bit for bit: undoing a
fold arithmetically (``W / s`` after ``W * s``, ``W - dW`` after ``W + dW``) rounds, and a scale near
zero (an IA3 or SSF scale of 1e-30 flushes ``W * s`` to zero or overflows ``W / s``) would corrupt the
backbone every resident task shares.

A server reads the structure the single-task method reads (``vpeft.methods``: LoRA's targets, SSF's
layers, IA3's parts, the adapters' sites) so both agree on names and places; it never changes
``vpeft.methods`` or ``vpeft.layers`` and needs nothing of them at run time but their constants.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.hooks import RemovableHandle

from vpeft.errors import NotMergeableError, UnsupportedModelError
from vpeft.layers.adapter import ACTIVATIONS
from vpeft.layers.rescale import fold_input_scale
from vpeft.layers.scale_shift import fold_affine
from vpeft.methods import METHODS
from vpeft.methods._base import SUPPORTED, embed_dim, final_norm, head_parameters
from vpeft.methods.adapter_houlsby import NORMS as HOULSBY_NORMS
from vpeft.methods.lora import TARGETS
from vpeft.methods.ssf import BLOCK_LAYERS
from vpeft.serve.errors import IncompatibleDeltaError
from vpeft.serve.routing import Router
from vpeft.serve.sites import (
    AdaptFormerBlock,
    BottleneckSite,
    LayerNormSite,
    LoRASite,
    PrefixAttention,
    PrefixSite,
    PromptBlocks,
    PromptSite,
    Site,
    VectorSite,
    output_hook,
)

SERVERS: dict[str, type[Server]] = {}

# why a registered method has no server (anything else unlisted: no per-sample implementation yet)
NOT_SERVABLE = {"full": "its delta is every weight of the backbone, so no two tasks can share one"}
_MERGE_INSTEAD = "vpeft.serve has no per-sample implementation of it yet; vpeft.merge folds it into a per-task model"
NOT_SERVABLE |= {name: _MERGE_INSTEAD for name in ("adalora", "dora", "fact", "repadapter")}
NOT_SERVABLE["adapter_plus"] = "vpeft.serve has no per-sample implementation of its post-block adapter yet"


def serves(name: str):
    def decorator(cls: type[Server]) -> type[Server]:
        cls.name = name
        SERVERS[name] = cls
        return cls

    return decorator


def servable_methods() -> list[str]:
    """Methods whose deltas can share one backbone pass, sorted."""
    return sorted(SERVERS)


def mergeable_servable_methods() -> list[str]:
    """Servable methods whose delta can also be merged into the weights in place (and unmerged)."""
    return sorted(n for n, cls in SERVERS.items() if cls.mergeable)


def _blocks(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise UnsupportedModelError(f"serving needs `blocks` (a non-empty nn.Sequential); supported: {SUPPORTED}")
    return list(blocks)


def _linear(block: nn.Module, path: str, where: str) -> nn.Linear:
    try:
        module = block.get_submodule(path)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise UnsupportedModelError(f"{where} needs `{path}` to be an nn.Linear; supported: {SUPPORTED}")
    return module


class Server(nn.Module):
    """One method's resident deltas on one backbone: what a delta file holds, where it acts, how it merges.

    Sites live in ``sites`` (so ``.to()`` moves their banks); the backbone is a plain reference. Hooks and
    replaced modules are recorded so ``uninstall`` leaves the backbone as it found it.
    """

    name: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    segmentable: ClassVar[bool] = False  # has per-task matmuls, for which grouping the batch can pay off

    def __init__(self, backbone: nn.Module, router: Router) -> None:
        super().__init__()
        self.__dict__["backbone"] = backbone
        self.router = router
        self.sites = nn.ModuleDict()
        self._paths: dict[str, str] = {}  # site key -> module path in the backbone
        self._hooks: dict[str, RemovableHandle] = {}
        self._replaced: list[tuple[nn.Module, str, nn.Module]] = []
        self.configs: dict[int, Any] = {}  # slot -> the method's config dataclass
        self.installed = False
        self._originals: list[tuple[nn.Module, str, torch.Tensor]] | None = None  # while merged: the weights before

    # -- what a delta holds -------------------------------------------------------------------------
    def expected(self, cfg: Any) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor a delta with config ``cfg`` holds for this backbone (head excluded)."""
        raise NotImplementedError

    def check_config(self, cfg: Any, source: str) -> None:
        """Raise IncompatibleDeltaError if ``cfg`` cannot sit beside the resident configs."""

    # -- life cycle ---------------------------------------------------------------------------------
    def install(self, cfg: Any) -> None:
        """Put the sites into the backbone (the first delta's config decides what a method needs)."""
        self.installed = True

    def uninstall(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        for parent, attr, original in reversed(self._replaced):
            setattr(parent, attr, original)
        self._replaced.clear()
        for key in list(self.sites):
            del self.sites[key]
        self._paths.clear()
        self.configs.clear()
        self.installed = False

    def write(self, slot: int, tensors: dict[str, torch.Tensor], cfg: Any, capacity: int) -> None:
        raise NotImplementedError

    def clear(self, slot: int) -> None:
        for site in self.sites.values():
            site.bank.clear(slot)
            if hasattr(site, "ntok"):
                site.ntok.pop(slot, None)
        self.configs.pop(slot, None)

    def resize(self, capacity: int) -> None:
        for site in self.sites.values():
            site.bank.resize(capacity)

    # -- merging: folding one task's delta into the weights, and restoring them exactly ---------------
    def merge(self, slot: int) -> None:
        """Fold task ``slot`` into the backbone in place, first copying every weight the fold changes
        (``merge_targets``): ``unmerge`` copies them back. Costs one copy of those weights while merged."""
        if not self.mergeable:
            raise NotMergeableError(self._not_mergeable())
        seen, originals = set(), []
        for module, name in self.merge_targets():
            p = module._parameters.get(name)
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                originals.append((module, name, p.detach().clone()))
        try:
            self.merge_weights(slot)
        except BaseException:
            self._restore(originals)
            raise
        self._originals = originals

    def unmerge(self, slot: int) -> None:
        """Restore the weights ``merge`` changed, bit for bit, whatever the delta's values."""
        if not self.mergeable:
            raise NotMergeableError(self._not_mergeable())
        self._restore(self._originals or [])
        self._originals = None
        self.after_unmerge()

    @staticmethod
    def _restore(originals: list[tuple[nn.Module, str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for module, name, original in originals:
                module._parameters[name].copy_(original)

    def merge_targets(self) -> list[tuple[nn.Module, str]]:
        """(module, parameter name) of every weight ``merge_weights`` writes: by default all of each site's host."""
        hosts = [self.backbone.get_submodule(path) for path, _ in self.site_items()]
        return [(m, name) for m in hosts for name, _ in m.named_parameters(recurse=False)]

    def merge_weights(self, slot: int) -> None:
        """Fold task ``slot``'s delta into the weights in place (mergeable servers)."""
        raise NotMergeableError(self._not_mergeable())

    def after_unmerge(self) -> None:
        """Undo what a merge did besides changing weights ``merge_targets`` names (SSF's created biases)."""

    def _not_mergeable(self) -> str:
        return (
            f"{self.name} deltas cannot be merged into the backbone's weights (they change the computation, "
            f"not just the weights); servable methods that merge: {', '.join(mergeable_servable_methods())}"
        )

    # -- helpers ------------------------------------------------------------------------------------
    def _add_site(self, path: str, site: Site, hook_on: nn.Module | None = None) -> Site:
        key = path.replace(".", "_") or "model"
        self.sites[key] = site
        self._paths[key] = path
        if hook_on is not None:
            self._hooks[key] = hook_on.register_forward_hook(output_hook(site))
        return site

    def _site(self, path: str) -> Site | None:
        try:
            return self.sites[path.replace(".", "_")]
        except KeyError:  # nn.ModuleDict has no .get
            return None

    def _drop_site(self, path: str) -> None:
        key = path.replace(".", "_")
        if key in self._hooks:
            self._hooks.pop(key).remove()
        del self.sites[key]
        del self._paths[key]

    def _replace(self, parent: nn.Module, attr: str, new: nn.Module) -> None:
        self._replaced.append((parent, attr, getattr(parent, attr)))
        setattr(parent, attr, new)

    def site_items(self) -> Iterator[tuple[str, Site]]:
        for key, site in self.sites.items():
            yield self._paths[key], site


@serves("linear")
class LinearServer(Server):
    """Only the heads differ: the backbone runs as it is."""

    mergeable = True

    def expected(self, cfg: Any) -> dict[str, tuple[int, ...]]:
        return {}

    def write(self, slot: int, tensors: dict[str, torch.Tensor], cfg: Any, capacity: int) -> None:
        self.configs[slot] = cfg

    def merge_weights(self, slot: int) -> None:
        pass  # nothing to fold: the heads are swapped per task


@functools.lru_cache(maxsize=64)
@serves("lora")
class LoRAServer(Server):
    """LoRA on any of its targets; deltas of different ranks, alphas and targets share the sites (zero-padded)."""

    mergeable = True
    segmentable = True

    def _targets(self, cfg: Any) -> Iterator[tuple[str, nn.Linear, str, int, int]]:
        for i, block in enumerate(_blocks(self.backbone)):
            for target in cfg.targets:
                path, third = TARGETS[target]
                host = _linear(block, path, f"lora (block {i})")
                if third is None:
                    yield f"blocks.{i}.{path}", host, path.rsplit(".", 1)[1], 0, host.out_features
                else:
                    size = host.out_features // 3
                    yield f"blocks.{i}.{path}", host, "qkv"[third], third * size, (third + 1) * size

    def expected(self, cfg: Any) -> dict[str, tuple[int, ...]]:
        out = {}
        for path, host, seg, start, end in self._targets(cfg):
            out[f"{path}.lora.A.{seg}"] = (cfg.r, host.in_features)
            out[f"{path}.lora.B.{seg}"] = (end - start, cfg.r)
        return out

    def write(self, slot: int, tensors: dict[str, torch.Tensor], cfg: Any, capacity: int) -> None:
        scaling = cfg.alpha / cfg.r
        for path, host, seg, _, _ in self._targets(cfg):
            site = self._site(path)
            if site is None:
                if path.endswith("qkv"):
                    size = host.out_features // 3
                    segments = {s: (j * size, (j + 1) * size) for j, s in enumerate("qkv")}
                    segments["qkv"] = (0, host.out_features)  # the target qkv: the whole fused layer
                else:
                    segments = {path.rsplit(".", 1)[1]: (0, host.out_features)}
                site = self._add_site(path, LoRASite(self.router, segments), hook_on=host)
            site.bank.put(f"A_{seg}", slot, tensors[f"{path}.lora.A.{seg}"], capacity)
            site.bank.put(f"B_{seg}", slot, tensors[f"{path}.lora.B.{seg}"] * scaling, capacity)
            site.refresh()
        self.configs[slot] = cfg

    def clear(self, slot: int) -> None:
        super().clear(slot)
        for path, site in list(self.site_items()):
            site.refresh()
            if not site.present:  # no resident task adapts this layer any more: it runs bare again
                self._drop_site(path)

    def merge_targets(self) -> list[tuple[nn.Module, str]]:
        return [(self.backbone.get_submodule(path), "weight") for path, _ in self.site_items()]

    def merge_weights(self, slot: int) -> None:
        for path, site in self.site_items():
            host = self.backbone.get_submodule(path)
            for seg, start, end in site.present:
                if site.bank.shape_of(f"A_{seg}", slot) is None:
                    continue
                a, b = site.bank[f"A_{seg}"][slot].float(), site.bank[f"B_{seg}"][slot].float()
                host.weight[start:end].add_((b @ a).to(host.weight.dtype))


@serves("ssf")
class SSFServer(Server):
    """SSF's scale and shift after the patch embedding, every block layer of ``BLOCK_LAYERS`` and the final norm."""

    mergeable = True

    def _hosts(self) -> list[tuple[str, nn.Module, int]]:
        model = self.backbone
        proj = getattr(getattr(model, "patch_embed", None), "proj", None)
        if not isinstance(proj, (nn.Conv2d, nn.Linear)):
            raise UnsupportedModelError(f"ssf needs `patch_embed.proj` (Conv2d or Linear); supported: {SUPPORTED}")
        hosts = [("patch_embed.proj", proj, 1 if isinstance(proj, nn.Conv2d) else -1)]
        for i, block in enumerate(_blocks(model)):
            hosts += [(f"blocks.{i}.{p}", block.get_submodule(p), -1) for p in BLOCK_LAYERS]
        norm = final_norm(model)
        if norm is not None:
            hosts.append(("norm" if norm is getattr(model, "norm", None) else "fc_norm", norm, -1))
        return hosts

    def expected(self, cfg: Any) -> dict[str, tuple[int, ...]]:
        out = {}
        for path, layer, _ in self._hosts():
            weight = getattr(layer, "weight", None)
            channels = weight.shape[0] if weight is not None else layer.normalized_shape[-1]
            out[f"{path}.ssf.scale"] = out[f"{path}.ssf.shift"] = (channels,)
        return out

    def install(self, cfg: Any) -> None:
        for path, layer, axis in self._hosts():
            self._add_site(path, VectorSite(self.router, "affine", axis), hook_on=layer)
        self._created_bias: set[str] = set()
        super().install(cfg)

    def write(self, slot: int, tensors: dict[str, torch.Tensor], cfg: Any, capacity: int) -> None:
        for path, site in self.site_items():
            site.bank.put("scale", slot, tensors[f"{path}.ssf.scale"], capacity)
            site.bank.put("shift", slot, tensors[f"{path}.ssf.shift"], capacity)
        self.configs[slot] = cfg

    def merge_weights(self, slot: int) -> None:
        for path, _ in self.site_items():  # check every layer first: a refused merge changes nothing
            if not isinstance(getattr(self.backbone.get_submodule(path), "weight", None), nn.Parameter):
                raise NotMergeableError(f"ssf cannot merge into {path}: it has no weight to scale")
        for path, site in self.site_items():
            host = self.backbone.get_submodule(path)
            if host.bias is None:
                self._created_bias.add(path)
            fold_affine(host, site.bank["scale"][slot], site.bank["shift"][slot])

    def after_unmerge(self) -> None:
        for path in self._created_bias:
            self.backbone.get_submodule(path).bias = None  # the layer had no bias before the merge gave it one
        self._created_bias.clear()


@serves("ia3")
class IA3Server(Server):
    """IA3's key and value scales on ``attn.qkv``'s output and the hidden scale on ``mlp.act``'s."""

    mergeable = True

    def _parts(self) -> Iterator[tuple[int, nn.Module, nn.Linear, nn.Module, nn.Linear]]:
        for i, block in enumerate(_blocks(self.backbone)):
            qkv = _linear(block, "attn.qkv", f"ia3 (block {i})")
            fc2 = _linear(block, "mlp.fc2", f"ia3 (block {i})")
            act = getattr(getattr(block, "mlp", None), "act", None)
            if act is None or qkv.out_features % 3:
                raise UnsupportedModelError(f"ia3 (block {i}) needs mlp.act and a fused attn.qkv; {SUPPORTED}")
            yield i, block, qkv, act, fc2

    def expected(self, cfg: Any) -> dict[str, tuple[int, ...]]:
        out = {}
        for i, _, qkv, _, fc2 in self._parts():
            size = qkv.out_features // 3
            out[f"blocks.{i}.attn.qkv.ia3.k"] = out[f"blocks.{i}.attn.qkv.ia3.v"] = (size,)
            out[f"blocks.{i}.mlp.act.ia3.ff"] = (fc2.in_features,)
        return out

    def install(self, cfg: Any) -> None:
        for i, _, qkv, act, _ in self._parts():
            self._add_site(f"blocks.{i}.attn.qkv", VectorSite(self.router, "scale"), hook_on=qkv)
            self._add_site(f"blocks.{i}.mlp.act", VectorSite(self.router, "scale"), hook_on=act)
        super().install(cfg)

    def write(self, slot: int, tensors: dict[str, torch.Tensor], cfg: Any, capacity: int) -> None:
        for i, _, qkv, _, _ in self._parts():
            k, v = tensors[f"blocks.{i}.attn.qkv.ia3.k"], tensors[f"blocks.{i}.attn.qkv.ia3.v"]
            full = torch.cat([k.new_ones(qkv.out_features // 3), k, v])  # queries keep scale one (Rescale.scale)
            self._site(f"blocks.{i}.attn.qkv").bank.put("scale", slot, full, capacity)
            self._site(f"blocks.{i}.mlp.act").bank.put("scale", slot, tensors[f"blocks.{i}.mlp.act.ia3.ff"], capacity)
        self.configs[slot] = cfg

    def merge_targets(self) -> list[tuple[nn.Module, str]]:
        return [
            (m, name)
            for _, _, qkv, _, fc2 in self._parts()
            for m, name in ((qkv, "weight"), (qkv, "bias"), (fc2, "weight"))
        ]

    def merge_weights(self, slot: int) -> None:
        parts = list(self._parts())
        for i, block, *_ in parts:
            norm = getattr(block.mlp, "norm", None)
            if norm is not None and not isinstance(norm, nn.Identity):
                raise NotMergeableError(
                    f"ia3 cannot merge block {i}: its MLP has a {type(norm).__name__} between the activation "
                    f"and fc2, so the hidden scale does not fold into fc2's weights; keep it unmerged"
                )
        for i, _, qkv, _, fc2 in parts:
            fold_affine(qkv, self._site(f"blocks.{i}.attn.qkv").bank["scale"][slot])
            fold_input_scale(fc2, self._site(f"blocks.{i}.mlp.act").bank["scale"][slot])


@serves("bitfit")
class BitFitServer(Server):
    """Every bias of the backbone: each task's trained bias minus the backbone's, added per sample."""

    mergeable = True

    def _hosts(self) -> list[tuple[str, nn.Module]]:
        head = {id(p) for _, p in head_parameters(self.backbone)}
        out = []
        for path, module in self.backbone.named_modules():
            bias = module._parameters.get("bias")
            if isinstance(bias, nn.Parameter) and id(bias) not in head:
                out.append((path, module))
        return out

    def expected(self, cfg: Any) -> dict[str, tuple[int, ...]]:
        return {f"{path}.bias": tuple(module.bias.shape) for path, module in self._hosts()}

    def install(self, cfg: Any) -> None:
        for path, module in self._hosts():
            site = VectorSite(self.router, "shift", 1 if isinstance(module, nn.Conv2d) else -1)
            site.register_buffer("base", module.bias.detach().clone(), persistent=False)
            self._add_site(path, site, hook_on=module)
        super().install(cfg)

    def write(self, slot: int, tensors: dict[str, torch.Tensor], cfg: Any, capacity: int) -> None:
        for path, site in self.site_items():
            site.bank.put("shift", slot, tensors[f"{path}.bias"] - site.base, capacity)
        self.configs[slot] = cfg

    def merge_targets(self) -> list[tuple[nn.Module, str]]:
        return [(self.backbone.get_submodule(path), "bias") for path, _ in self.site_items()]

    def merge_weights(self, slot: int) -> None:
        for path, site in self.site_items():
            bias = self.backbone.get_submodule(path).bias
            bias.add_(site.bank["shift"][slot].to(bias.dtype))


@serves("adapter_houlsby")
class AdapterServer(Server):
    """Serial bottleneck adapters on the sub-layers of ``sites``; bottlenecks may differ (zero-padded).

    Houlsby deltas with ``train_layernorm`` also hold every block's ``norm1`` / ``norm2`` weight and bias:
    while such a delta is resident, each of those LayerNorms gets a ``LayerNormSite`` that applies each
    sample's task's parameters (the backbone's own for tasks that did not train them), so tasks with and
    without trained LayerNorms share a pass; with none resident the LayerNorms run as they are.
    """

    segmentable = True
    sub_layers: ClassVar[tuple[str, ...]] = ()

    def _sub_layers(self) -> tuple[str, ...]:
        return self.sub_layers or METHODS.get(self.name).sites

    def _norms(self) -> list[tuple[str, nn.LayerNorm]]:
        out = []
        for i, block in enumerate(_blocks(self.backbone)):
            for name in HOULSBY_NORMS:
                norm = getattr(block, name, None)
                if not isinstance(norm, nn.LayerNorm) or not isinstance(norm.weight, nn.Parameter) or norm.bias is None:
                    raise UnsupportedModelError(
                        f"{self.name} with train_layernorm needs blocks.{i}.{name} to be a LayerNorm with weight and "
                        f"bias; supported: {SUPPORTED}"
                    )
                out.append((f"blocks.{i}.{name}", norm))
        return out

    def expected(self, cfg: Any) -> dict[str, tuple[int, ...]]:
        dim, n = embed_dim(self.backbone, self.name), cfg.bottleneck
        out = {}
        for i, _ in enumerate(_blocks(self.backbone)):
            for s in self._sub_layers():
                p = f"blocks.{i}.{s}.adapter"
                out.update({f"{p}.down.weight": (n, dim), f"{p}.down.bias": (n,)})
                out.update({f"{p}.up.weight": (dim, n), f"{p}.up.bias": (dim,)})
        if getattr(cfg, "train_layernorm", False):
            for path, norm in self._norms():
                out[f"{path}.weight"] = out[f"{path}.bias"] = tuple(norm.weight.shape)
        return out

    def check_config(self, cfg: Any, source: str) -> None:
        acts = {c.act for c in self.configs.values()}
        if acts and cfg.act not in acts:
            raise IncompatibleDeltaError(
                f"{source}: a {self.name} delta with act={cfg.act!r} cannot share a pass with the resident ones "
                f"(act={acts.pop()!r}); serve it from another MultiDeltaModel"
            )

    def install(self, cfg: Any) -> None:
        for i, block in enumerate(_blocks(self.backbone)):
            for s in self._sub_layers():
                host = getattr(block, s, None)
                if not isinstance(host, nn.Module):
                    raise UnsupportedModelError(f"{self.name} (block {i}) needs `{s}`; supported: {SUPPORTED}")
                self._add_site(f"blocks.{i}.{s}", BottleneckSite(self.router, ACTIVATIONS[cfg.act]()), hook_on=host)
        super().install(cfg)

    def _norm_sites(self) -> list[tuple[str, LayerNormSite]]:
        return [(path, site) for path, site in self.site_items() if isinstance(site, LayerNormSite)]

    def _add_norm_sites(self, capacity: int) -> None:
        """The LayerNorm sites, every resident task's rows holding the backbone's own parameters."""
        for path, norm in self._norms():
            site = LayerNormSite(self.router, norm.normalized_shape, norm.eps)
            site.register_buffer("base_weight", norm.weight.detach().clone(), persistent=False)
            site.register_buffer("base_bias", norm.bias.detach().clone(), persistent=False)
            for slot in self.configs:
                site.bank.put("weight", slot, site.base_weight, capacity)
                site.bank.put("bias", slot, site.base_bias, capacity)
            self._add_site(path, site, hook_on=norm)

    def write(self, slot: int, tensors: dict[str, torch.Tensor], cfg: Any, capacity: int) -> None:
        trained = bool(getattr(cfg, "train_layernorm", False))
        if trained and not self._norm_sites():
            self._add_norm_sites(capacity)
        for path, site in self.site_items():
            if isinstance(site, LayerNormSite):
                if trained:
                    weight, bias = tensors[f"{path}.weight"], tensors[f"{path}.bias"]
                else:  # the task did not train them: the backbone's own
                    weight, bias = site.base_weight, site.base_bias
                site.bank.put("weight", slot, weight, capacity)
                site.bank.put("bias", slot, bias, capacity)
                (site.trained.add if trained else site.trained.discard)(slot)
                continue
            p = f"{path}.adapter"
            for key, name in (("dw", "down.weight"), ("db", "down.bias"), ("uw", "up.weight"), ("ub", "up.bias")):
                site.bank.put(key, slot, tensors[f"{p}.{name}"], capacity)
        self.configs[slot] = cfg

    def clear(self, slot: int) -> None:
        super().clear(slot)
        norms = self._norm_sites()
        for _, site in norms:
            site.trained.discard(slot)
        if norms and not any(site.trained for _, site in norms):  # no resident task trained them: run them bare
            for path, _ in norms:
                self._drop_site(path)


@serves("adapter_pfeiffer")
class PfeifferServer(AdapterServer):
    pass


@serves("adaptformer")
class AdaptFormerServer(Server):
    """AdaptFormer's scaled bottleneck beside every MLP; bottleneck and scale (fixed or learned) per task."""

    segmentable = True

    def expected(self, cfg: Any) -> dict[str, tuple[int, ...]]:
        dim, n = embed_dim(self.backbone, "adaptformer"), cfg.bottleneck
        out = {}
        for i, _ in enumerate(_blocks(self.backbone)):
            p = f"blocks.{i}.adapter"
            out.update({f"{p}.down.weight": (n, dim), f"{p}.down.bias": (n,)})
            out.update({f"{p}.up.weight": (dim, n), f"{p}.up.bias": (dim,)})
            if cfg.learnable_scale:
                out[f"{p}.scale"] = (1,)
        return out

    def install(self, cfg: Any) -> None:
        blocks = self.backbone.blocks
        for i, block in enumerate(_blocks(self.backbone)):
            if type(block) is not Block:
                raise UnsupportedModelError(
                    f"adaptformer rewrites timm's pre-norm Block; block {i} is a {type(block).__name__}; "
                    f"supported: {SUPPORTED}"
                )
        for i, block in enumerate(list(blocks)):
            site = self._add_site(f"blocks.{i}", BottleneckSite(self.router, nn.ReLU(), scaled=True))
            self._replace(blocks, str(i), AdaptFormerBlock(block, site))
        super().install(cfg)

    def write(self, slot: int, tensors: dict[str, torch.Tensor], cfg: Any, capacity: int) -> None:
        for path, site in self.site_items():
            p = f"{path}.adapter"
            for key, name in (("dw", "down.weight"), ("db", "down.bias"), ("uw", "up.weight"), ("ub", "up.bias")):
                site.bank.put(key, slot, tensors[f"{p}.{name}"], capacity)
            like = tensors[f"{p}.up.bias"]
            scale = tensors[f"{p}.scale"] if cfg.learnable_scale else like.new_tensor([float(cfg.scale)])
            site.bank.put("scale", slot, scale, capacity)
        self.configs[slot] = cfg


def _takes_attn_mask(block: nn.Module) -> bool:
    try:
        return "attn_mask" in inspect.signature(block.forward).parameters
    except (TypeError, ValueError):
        return False


class _PaddedTokens(Server):
    """Methods whose tasks may add different numbers of tokens: padded to the longest in a batch, masked."""

    def check_config(self, cfg: Any, source: str) -> None:
        lengths = {c.num_tokens for c in self.configs.values()}
        if lengths and cfg.num_tokens not in lengths and not self._maskable():
            raise IncompatibleDeltaError(
                f"{source}: {cfg.num_tokens} tokens beside resident deltas of {sorted(lengths)} needs a padding "
                "mask, and this timm version's blocks take no attn_mask; serve each length from its own model"
            )

    def _maskable(self) -> bool:
        return True


@serves("vpt_shallow")
class VPTServer(_PaddedTokens):
    """VPT prompts (shallow, or deep with one set per block) after the prefix tokens, per sample."""

    def _sets(self) -> int:
        return len(_blocks(self.backbone)) if METHODS.get(self.name).deep else 1

    def expected(self, cfg: Any) -> dict[str, tuple[int, ...]]:
        return {"blocks.prompt_embeddings": (self._sets(), cfg.num_tokens, embed_dim(self.backbone, self.name))}

    def _maskable(self) -> bool:
        return all(_takes_attn_mask(b) for b in _blocks(self.backbone))

    def install(self, cfg: Any) -> None:
        model = self.backbone
        _blocks(model)
        if getattr(model, "grad_checkpointing", False):
            raise UnsupportedModelError(f"{self.name} cannot run with timm gradient checkpointing; turn it off")
        prefix = getattr(model, "num_prefix_tokens", None)
        if not isinstance(prefix, int):
            raise UnsupportedModelError(f"{self.name} needs `num_prefix_tokens`; supported: {SUPPORTED}")
        site = self._add_site("blocks", PromptSite(self.router))
        self._replace(model, "blocks", PromptBlocks(model.blocks, site, prefix, METHODS.get(self.name).deep))
        super().install(cfg)

    def write(self, slot: int, tensors: dict[str, torch.Tensor], cfg: Any, capacity: int) -> None:
        site = self._site("blocks")
        prompts = tensors["blocks.prompt_embeddings"]
        site.bank.put("prompts", slot, prompts, capacity)
        site.ntok[slot] = cfg.num_tokens
        self.configs[slot] = cfg


@serves("vpt_deep")
class VPTDeepServer(VPTServer):
    pass


@serves("prefix")
class PrefixServer(_PaddedTokens):
    """Prefix keys and values in every attention layer, per sample."""

    def _attn(self) -> list[tuple[int, nn.Module, nn.Module]]:
        out = []
        for i, block in enumerate(_blocks(self.backbone)):
            attn = getattr(block, "attn", None)
            if type(attn) not in (Attention, PrefixAttention):
                raise UnsupportedModelError(
                    f"prefix rewrites timm's Attention; block {i}'s attn is a {type(attn).__name__}; {SUPPORTED}"
                )
            out.append((i, block, attn))
        return out

    def expected(self, cfg: Any) -> dict[str, tuple[int, ...]]:
        out = {}
        for i, _, attn in self._attn():
            width = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
            out[f"blocks.{i}.attn.prefix_k"] = out[f"blocks.{i}.attn.prefix_v"] = (cfg.num_tokens, width)
        return out

    def check_config(self, cfg: Any, source: str) -> None:
        if cfg.reparam:
            raise IncompatibleDeltaError(
                f"{source}: a prefix delta with reparam=true holds the encoder, not the prefixes; save it with "
                "vpeft.save_delta, which writes the materialised prefixes"
            )
        super().check_config(cfg, source)

    def _maskable(self) -> bool:
        return True  # our own attention takes the padding mask

    def install(self, cfg: Any) -> None:
        for i, block, attn in self._attn():
            site = self._add_site(f"blocks.{i}.attn", PrefixSite(self.router))
            self._replace(block, "attn", PrefixAttention(attn, site))
        super().install(cfg)

    def write(self, slot: int, tensors: dict[str, torch.Tensor], cfg: Any, capacity: int) -> None:
        for path, site in self.site_items():
            k = tensors[f"{path}.prefix_k"]
            site.bank.put("k", slot, k, capacity)
            site.bank.put("v", slot, tensors[f"{path}.prefix_v"], capacity)
            site.ntok[slot] = cfg.num_tokens
        self.configs[slot] = cfg
