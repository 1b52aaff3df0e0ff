"""Multi-task sites: the places in a backbone where a method's delta acts, each holding every resident
task's tensors in a ``Bank`` and applying each sample's own task's tensors in one batched pass.

Each site follows the computation of the single-task layer it stands for (``vpeft.layers``) step for
step, dtype casts included, so a sample's output matches its single-task model's: with one task in the
batch the site runs exactly that layer's arithmetic on that task's tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.layers.prefix import prefix_mask
from vpeft.serve.bank import Bank
from vpeft.serve.routing import Route, Router, per_sample_linear, per_sample_view, single_view


class Site(nn.Module):
    """Base: a bank of per-task tensors and the shared router (a plain reference, not a submodule)."""

    def __init__(self, router: Router) -> None:
        super().__init__()
        self.bank = Bank()
        self.__dict__["router"] = router

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.bank._buffers.items())


def output_hook(site: nn.Module):
    """A forward hook that hands the host's input and output to ``site`` (as ``OutputDelta`` does)."""

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return site(args[0], out)

    return hook


class LoRASite(Site):
    """Low-rank updates of one linear layer's output segments: ``out[:, seg] += x A_seg^T B_seg^T``.

    Bank: ``A_<seg>`` ``[T, r, in]``, the A factor the single-task layer applies before ``seg``'s B (see
    ``servers.lora_pairing``), and ``B_<seg>`` ``[T, width, r]`` with ``alpha / r`` already in it (as
    ``LoRA._b``). The A of every present segment is applied in one matmul; each segment's B then adds in
    place into its columns of the host's output (k's columns are never touched for LoRA on q and v).
    """

    def __init__(self, router: Router, segments: dict[str, tuple[int, int]]) -> None:
        super().__init__(router)
        self.segments = dict(sorted(segments.items(), key=lambda kv: kv[1][0]))
        self.present: list[tuple[str, int, int]] = []

    def refresh(self) -> None:
        """Recompute which segments some resident task adapts (called after the bank changes)."""
        self.present = [(s, a, b) for s, (a, b) in self.segments.items() if self.bank.has(f"A_{s}")]

    def _a(self, index) -> torch.Tensor:
        parts = [self.bank[f"A_{s}"][index] for s, _, _ in self.present]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def _one(self, x: torch.Tensor, out: torch.Tensor, t: int) -> None:
        h = F.linear(x, self._a(t))
        h2, o2 = h.reshape(-1, h.shape[-1]), out.view(-1, out.shape[-1])
        offset = 0
        for s, start, end in self.present:
            b = self.bank[f"B_{s}"][t]
            r = b.shape[1]
            o2[:, start:end].addmm_(h2[:, offset : offset + r], b.t().to(o2.dtype))
            offset += r

    def forward(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        route = self.router.current()
        if route is None or not self.present:
            return out
        if route.single is not None:
            self._one(inp, out, route.single)
        elif route.segments is not None:
            for t, s, e in route.segments:
                self._one(inp[s:e], out[s:e], t)
        else:
            batch = inp.shape[0]
            h = torch.bmm(inp.reshape(batch, -1, inp.shape[-1]), self._a(route.index).transpose(1, 2))
            o3 = out.view(batch, -1, out.shape[-1])
            offset = 0
            for s, start, end in self.present:
                b = self.bank[f"B_{s}"][route.index]
                r = b.shape[2]
                o3[:, :, start:end].baddbmm_(h[:, :, offset : offset + r], b.transpose(1, 2).to(o3.dtype))
                offset += r
        return out


class VectorSite(Site):
    """Per-channel vectors on one layer's output: SSF's scale and shift (``affine``), IA3's rescaling
    (``scale``) or BitFit's change of the layer's bias (``shift``: trained bias minus the backbone's)."""

    def __init__(self, router: Router, kind: str, channel_axis: int = -1) -> None:
        super().__init__(router)
        if kind not in ("affine", "scale", "shift"):
            raise ValueError(f"kind must be affine, scale or shift, got {kind!r}")
        self.kind, self.channel_axis = kind, channel_axis

    def _vec(self, key: str, route: Route, ndim: int) -> torch.Tensor:
        if route.single is not None:
            return single_view(self.bank[key][route.single], ndim, self.channel_axis)
        return per_sample_view(self.bank[key][route.index], ndim, self.channel_axis)

    def forward(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        route = self.router.current()
        if route is None:
            return out
        if self.kind == "affine":
            scale, shift = self._vec("scale", route, out.ndim), self._vec("shift", route, out.ndim)
            return torch.addcmul(shift.to(out.dtype), out, scale.to(out.dtype))
        if self.kind == "scale":  # in place: the host's output is fresh and used nowhere else
            return out.mul_(self._vec("scale", route, out.ndim).to(out.dtype))
        return out.add_(self._vec("shift", route, out.ndim).to(out.dtype))


class BottleneckSite(Site):
    """``up(act(down(x)))`` with each sample's task's weights; bank ``dw, db, uw, ub`` (and ``scale``).

    Serial adapters (Houlsby, Pfeiffer) add it to a sub-layer's output; AdaptFormer multiplies it by a
    per-task scale and adds it beside the MLP. Different bottleneck widths pad with zero rows and
    columns: ``act(0) = 0`` for ReLU, GELU and SiLU, so padding adds nothing.
    """

    def __init__(self, router: Router, act: nn.Module, scaled: bool = False) -> None:
        super().__init__(router)
        self.act, self.scaled = act, scaled

    def delta(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        b = self.bank
        y = per_sample_linear(self.act(per_sample_linear(x, b["dw"], b["db"], route)), b["uw"], b["ub"], route)
        if not self.scaled:
            return y
        if route.single is not None:
            return y * b["scale"][route.single].to(y.dtype)
        return y * per_sample_view(b["scale"][route.index], y.ndim, -1).to(y.dtype)

    def forward(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """As a serial adapter on a sub-layer's output ``out``."""
        route = self.router.current()
        if route is None:
            return out
        return out + self.delta(out, route)


class LayerNormSite(Site):
    """A LayerNorm with each sample's task's affine parameters: bank ``weight``, ``bias`` ``[T, C]``.

    Hooked on the backbone's LayerNorm, it recomputes the output from the input: with one task (or one
    task per segment) as ``F.layer_norm`` with that task's weight and bias, the single-task layer's
    arithmetic; mixed, as the LayerNorm without affine followed by each sample's scale and shift, which is
    the same function. Slots not in ``trained`` hold the backbone's own parameters (their tasks did not
    train the LayerNorms); a batch of only such tasks keeps the backbone's output as it is.
    """

    def __init__(self, router: Router, normalized_shape: tuple[int, ...], eps: float) -> None:
        super().__init__(router)
        self.normalized_shape, self.eps = tuple(normalized_shape), float(eps)
        self.trained: set[int] = set()

    def _norm(self, x: torch.Tensor, t: int | None) -> torch.Tensor:
        if t is None:
            return F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        w, b = self.bank["weight"][t], self.bank["bias"][t]
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)

    def forward(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        route = self.router.current()
        if route is None or not self.trained.intersection(route.slots):
            return out
        if route.single is not None:
            return self._norm(inp, route.single)
        if route.segments is not None:
            return torch.cat([self._norm(inp[s:e], t) if t in self.trained else out[s:e] for t, s, e in route.segments])
        y = self._norm(inp, None)
        w = per_sample_view(self.bank["weight"][route.index], y.ndim, -1).to(y.dtype)
        b = per_sample_view(self.bank["bias"][route.index], y.ndim, -1).to(y.dtype)
        return torch.addcmul(b, y, w)


class AdaptFormerBlock(nn.Module):
    """A timm ``Block`` (children kept under their names) plus a per-task scaled bottleneck beside the MLP,
    reading the hidden state after the attention residual, as ``vpeft.methods.adaptformer``'s block."""

    def __init__(self, block: nn.Module, site: BottleneckSite) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.__dict__["site"] = site

    def forward(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), **attn_kwargs)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) + self.site.delta(x, self.site.router.current())


class PromptSite(Site):
    """VPT prompts: bank ``prompts`` ``[T, sets, n, D]`` (sets: 1 shallow, depth deep); lengths on the host."""

    def __init__(self, router: Router) -> None:
        super().__init__(router)
        self.ntok: dict[int, int] = {}


class PromptBlocks(nn.Sequential):
    """A ViT's block stack with each sample's own prompts after its prefix tokens (``PromptedBlocks``).

    Tasks with different prompt lengths are padded to the longest in the batch and the padding is
    masked out of every attention as keys (its own outputs are dropped), so one pass serves them all; a
    batch whose tasks share one length runs without a mask.
    """

    def __init__(self, blocks: nn.Sequential, site: PromptSite, num_prefix_tokens: int, deep: bool) -> None:
        super().__init__()
        for name, block in blocks.named_children():
            self.add_module(name, block)
        self.__dict__["site"] = site
        self.num_prefix_tokens, self.deep = num_prefix_tokens, deep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        site = self.site
        route = site.router.current()
        p, prompts = self.num_prefix_tokens, site.bank["prompts"]
        batch = x.shape[0]
        lengths = {site.ntok[s] for s in route.slots}
        n = max(lengths)

        def prompt(i: int) -> torch.Tensor:
            if route.single is not None:
                return prompts[route.single, i, :n].to(x.dtype).expand(batch, -1, -1)
            return prompts[route.index, i, :n].to(x.dtype)

        mask = None
        for i, block in enumerate(self):
            if i == 0:
                x = torch.cat([x[:, :p], prompt(0), x[:, p:]], dim=1)
                if len(lengths) > 1:
                    pos = torch.arange(x.shape[1], device=x.device)
                    ntok = torch.tensor([site.ntok[s] for s in route.slots], device=x.device)[route.inverse]
                    padded = (pos >= p + ntok[:, None]) & (pos < p + n)
                    mask = (~padded)[:, None, None, :]
            elif self.deep:
                x = torch.cat([x[:, :p], prompt(i), x[:, p + n :]], dim=1)
            x = block(x) if mask is None else block(x, attn_mask=mask)
        return torch.cat([x[:, :p], x[:, p + n :]], dim=1)


class PrefixSite(Site):
    """Prefix tuning in one block: bank ``k``, ``v`` ``[T, P, attn_dim]``; prefix lengths on the host."""

    def __init__(self, router: Router) -> None:
        super().__init__(router)
        self.ntok: dict[int, int] = {}


class PrefixAttention(nn.Module):
    """timm's ``Attention`` with each sample's own prefix keys and values (``vpeft.layers.PrefixAttention``).

    Prefixes of different lengths are padded to the longest in the batch and masked out as keys.
    """

    def __init__(self, attn: nn.Module, site: PrefixSite) -> None:
        super().__init__()
        for name, child in attn.named_children():
            self.add_module(name, child)
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.fused_attn = attn.fused_attn
        if "norm" not in self._modules:
            self.norm = nn.Identity()
        if "gate" not in self._modules:
            self.gate = None
        self.__dict__["site"] = site

    def _prefix(self, key: str, route: Route, n: int, like: torch.Tensor) -> torch.Tensor:
        bank = self.site.bank[key]
        if route.single is not None:
            t = bank[route.single, :n].to(like.dtype).view(n, self.num_heads, self.head_dim).transpose(0, 1)
            return t.unsqueeze(0).expand(like.shape[0], -1, -1, -1)
        t = bank[route.index, :n].to(like.dtype)
        return t.view(like.shape[0], n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        route, site = self.site.router.current(), self.site
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        lengths = {site.ntok[s] for s in route.slots}
        n = max(lengths)
        k = torch.cat([self._prefix("k", route, n, k), k], dim=2)
        v = torch.cat([self._prefix("v", route, n, v), v], dim=2)
        mask = prefix_mask(attn_mask, is_causal, N, n, q.device)
        if len(lengths) > 1:
            ntok = torch.tensor([site.ntok[s] for s in route.slots], device=q.device)[route.inverse]
            keep = torch.arange(n, device=q.device) < ntok[:, None]
            keep = torch.cat([keep, keep.new_ones(B, N)], dim=1)[:, None, None, :]
            if mask is None:
                mask = keep
            elif mask.dtype == torch.bool:
                mask = mask & keep
            else:
                mask = mask.masked_fill(~keep, float("-inf"))
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if mask is not None:
                attn = attn.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else attn + mask
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


# the head's per-task classifiers are applied to all distinct tasks of the batch at once (one matmul over
# their stacked rows) while that is at most this many rows; beyond it, one matmul per task on grouped rows
DENSE_HEAD_ROWS = 16384


class HeadSite(Site):
    """Per-task classifiers: bank ``weight`` ``[T, C, F]`` and ``bias`` ``[T, C]``; class counts on the host.

    Returns logits padded to the widest task in the batch; a sample's columns beyond its task's classes
    hold ``pad_value`` (-inf by default, so argmax and softmax need no mask).
    """

    def __init__(self, router: Router, pad_value: float = float("-inf")) -> None:
        super().__init__(router)
        self.pad_value = pad_value
        self.ncls: dict[int, int] = {}

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        route = self.router.route
        w, b = self.bank["weight"], self.bank["bias"]
        if route.single is not None:
            c = self.ncls[route.single]
            return F.linear(feats, w[route.single, :c], b[route.single, :c])
        widths = [self.ncls[s] for s in route.slots]
        c, u, batch = max(widths), len(route.slots), feats.shape[0]
        if u * c <= DENSE_HEAD_ROWS:
            every = F.linear(feats, w[route.uniq, :c].reshape(u * c, -1), b[route.uniq, :c].reshape(-1))
            logits = every.view(batch, u, c).gather(1, route.inverse.view(batch, 1, 1).expand(batch, 1, c))[:, 0]
        elif route.segments is not None:  # the batch is grouped by task already
            logits = torch.cat([F.linear(feats[s:e], w[t, :c], b[t, :c]) for t, s, e in route.segments])
        else:
            rows = feats.index_select(0, route.group)
            parts = [F.linear(rows[s:e], w[t, :c], b[t, :c]) for t, s, e in route.group_segments]
            logits = torch.cat(parts)
            logits = torch.empty_like(logits).index_copy_(0, route.group, logits)
        if len(set(widths)) > 1:
            cols = torch.arange(c, device=logits.device)
            ncls = torch.tensor(widths, device=logits.device)[route.inverse]
            logits = logits.masked_fill(cols >= ncls[:, None], self.pad_value)
        return logits
