"""AdaLoRA: SVD-form updates whose ranks are allocated by importance over a shrinking budget.

Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023
(arXiv:2303.10512), its reference code (github.com/QingruZhang/AdaLoRA, ``loralib/loralib/adalora.py``)
and Hugging Face peft's port (``peft.tuners.adalora``), which this follows where the paper is silent.

* Each adapted matrix gets ``W0 + P diag(lambda) Q * alpha / (r + 1e-5)`` (eq. 1 with the reference
  code's scale: loralib's ``SVDLinear`` and peft's ``AdaLoraLayer`` multiply by ``lora_alpha`` and divide
  by ``ranknum + 1e-5``, ``ranknum`` the initial rank, fixed), ``P`` ``[out, r]`` and ``Q`` ``[r, in]``
  Gaussian (std 0.02), ``lambda`` zero, so the model is the backbone at init; ``r`` is ``init_r``. The
  targets are LoRA's (``vpeft.methods.lora``); the paper adapts every weight matrix (q, k, v, o, fc1,
  fc2), the default here.
* Orthogonality regulariser added to the loss: ``orth_reg_weight`` times the mean over all ``P`` and
  ``Q`` of ``||P^T P - I||_F`` and ``||Q Q^T - I||_F``, as the reference code and peft compute it
  (eq. 4 writes the squared norms, summed).
* After each optimizer step: the sensitivity ``I = |w * grad|`` of every entry of ``P``, ``lambda``,
  ``Q`` is smoothed, ``I_bar = beta1 I_bar + (1 - beta1) I``, its uncertainty
  ``U_bar = beta2 U_bar + (1 - beta2) |I - I_bar|`` (eqs. 8-9), the score ``s = I_bar * U_bar``; a
  triplet's importance is ``s(lambda_i) + mean_j s(Q_ij) + mean_k s(P_ki)`` (eq. 10). The budget (the
  total rank) stays at ``init_r`` per matrix for ``tinit`` steps, falls cubically to ``target_r`` per
  matrix, and stays there for the last ``tfinal`` steps (eq. 11); every ``deltaT`` steps the
  ``lambda``s of the least important triplets beyond the budget are set to zero. At step
  ``total - tfinal`` the pattern is fixed and re-applied after every later step (peft).

Pruned triplets are masked, not removed, so shapes (and parameter counts) stay those of ``init_r``;
the final update ``P diag(lambda) Q * alpha / (r + 1e-5)`` merges into the weights like LoRA's.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.errors import ConfigError
from vpeft.layers import LoRA, attach, attached, detach
from vpeft.layers.delta import OutputDelta
from vpeft.methods._base import Method, MethodConfig, check, register
from vpeft.methods.lora import LoRAConfig, LoRAMethod

RANKNUM_EPS = 1e-5  # loralib's and peft's ``scaling / (ranknum + 1e-5)``


@dataclasses.dataclass
class AdaLoRAConfig(MethodConfig):
    init_r: int = 12  # rank of every matrix at the start (peft's default; 1.5 x target_r as the paper)
    target_r: int = 8  # average rank per matrix the budget ends at
    alpha: float | None = None  # the reference code's lora_alpha (its scripts: 16, 32); None: init_r (scale ~1)
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "proj", "fc1", "fc2")
    tinit: int = 0  # steps at the full budget before pruning starts
    tfinal: int = 0  # last steps at the final budget, the rank pattern fixed
    deltaT: int = 1  # steps between two allocations
    beta1: float = 0.85  # smoothing of the sensitivity
    beta2: float = 0.85  # smoothing of its uncertainty
    orth_reg_weight: float = 0.1  # the reference code's reg_orth_coef (peft's default: 0.5)

    def __post_init__(self):
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if self.alpha is not None:
            a = self.alpha
            ok = isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and a > 0
            check(ok, f"adalora alpha must be a positive number (or null for init_r), got {a!r}")
        self.alpha = float(self.init_r if self.alpha is None else self.alpha)
        for name in ("init_r", "target_r", "deltaT"):
            v = getattr(self, name)
            check(
                isinstance(v, int) and not isinstance(v, bool) and v > 0,
                f"adalora {name} must be a positive integer, got {v!r}",
            )
        for name in ("tinit", "tfinal"):
            v = getattr(self, name)
            check(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                f"adalora {name} must be an integer >= 0, got {v!r}",
            )
        check(
            self.target_r <= self.init_r, f"adalora target_r ({self.target_r}) must not exceed init_r ({self.init_r})"
        )
        check(
            0 < self.beta1 < 1 and 0 < self.beta2 < 1,
            f"adalora beta1, beta2 must be in (0, 1), got {self.beta1}, {self.beta2}",
        )
        check(
            math.isfinite(self.orth_reg_weight) and self.orth_reg_weight >= 0,
            f"adalora orth_reg_weight must be a finite number >= 0, got {self.orth_reg_weight!r}",
        )
        check(0 <= self.dropout < 1, f"adalora dropout must be in [0, 1), got {self.dropout!r}")
        LoRAConfig(r=self.init_r, targets=self.targets)  # LoRA's checks of the targets


class SVDUpdate(OutputDelta):
    """``out[:, seg] += (x Q_seg^T diag(lambda_seg)) P_seg^T * alpha / (r + 1e-5)`` for each segment of one layer.

    The scale is the reference code's ``lora_alpha / (ranknum + 1e-5)``, ``ranknum`` the initial rank.

    Parameters: ``P.<seg>`` ``[rows, r]``, ``E.<seg>`` ``[r]`` (the singular values lambda), ``Q.<seg>`` ``[r, in]``.
    """

    def __init__(self, lora: LoRA, alpha: float, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.r = lora.in_features, lora.out_features, lora.r
        self.scaling = alpha / (lora.r + RANKNUM_EPS)
        self.segments = dict(lora.segments)
        self.dropout = lora.dropout
        segs = self.segments.items()
        self.P = nn.ParameterDict({s: nn.Parameter(torch.empty(b - a, self.r, **dd)) for s, (a, b) in segs})
        self.E = nn.ParameterDict({s: nn.Parameter(torch.zeros(self.r, **dd)) for s in self.segments})
        self.Q = nn.ParameterDict({s: nn.Parameter(torch.empty(self.r, self.in_features, **dd)) for s in self.segments})
        for p in [*self.P.values(), *self.Q.values()]:
            nn.init.normal_(p, mean=0.0, std=0.02)

    def delta_weight(self) -> torch.Tensor:
        """The full-size update ``P diag(lambda) Q * scaling`` placed at each segment's rows (float32)."""
        w = self.P[next(iter(self.segments))].new_zeros(self.out_features, self.in_features, dtype=torch.float32)
        for s, (a, b) in self.segments.items():
            w[a:b] = (self.P[s].float() * self.E[s].float()) @ self.Q[s].float() * self.scaling
        return w

    def forward(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        x = self.dropout(inp)
        pieces, pos = [], 0
        for s, (a, b) in self.segments.items():
            if a > pos:
                pieces.append(out[..., pos:a])
            h = F.linear(x, self.Q[s] * self.E[s].unsqueeze(1))
            pieces.append(out[..., a:b] + (F.linear(h, self.P[s]) * self.scaling).to(out.dtype))
            pos = b
        if pos < self.out_features:
            pieces.append(out[..., pos:])
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, segments={self.segments}"


def triplets(model: nn.Module) -> list[tuple[str, SVDUpdate, str]]:
    """(key, layer, segment) of every adapted matrix, in module order; key ``<layer path>.<segment>``."""
    return [
        (f"{path}.{s}", module, s)
        for path, module in model.named_modules()
        if isinstance(module, SVDUpdate)
        for s in module.segments
    ]


@register("adalora")
class AdaLoRA(Method):
    Config = AdaLoRAConfig
    mergeable = True
    merge_atol = 1e-5
    runs_alone = "AdaLoRA prunes each run's ranks every step from that run's own importance scores"

    def __init__(self, config: AdaLoRAConfig):
        super().__init__(config)
        self.reset_importance()
        self.rank_pattern: dict[str, torch.Tensor] | None = None  # the final keep-masks, fixed at total - tfinal

    def reset_importance(self) -> None:
        self.exp_avg_ipt: dict[int, torch.Tensor] = {}
        self.exp_avg_unc: dict[int, torch.Tensor] = {}

    def inject(self, model: nn.Module) -> None:
        cfg: AdaLoRAConfig = self.config
        LoRAMethod(LoRAConfig(r=cfg.init_r, dropout=cfg.dropout, targets=cfg.targets)).inject(model)
        for host, name, lora in list(attached(model, LoRA)):  # LoRA's targets; its factors are replaced
            detach(host, name)
            w = host.weight
            attach(host, "adalora", SVDUpdate(lora, cfg.alpha, device=w.device, dtype=w.dtype))

    # -- the orthogonality regulariser ----------------------------------------------------------
    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        if self.config.orth_reg_weight == 0:
            return None
        terms = []
        for _, layer, s in triplets(model):
            p, q = layer.P[s].float(), layer.Q[s].float()
            for cov in (q @ q.t(), p.t() @ p):
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device), "fro"))
        if not terms:
            return None
        return self.config.orth_reg_weight * torch.stack(terms).mean()

    # -- rank allocation --------------------------------------------------------------------------
    def budgets(self, model: nn.Module) -> tuple[int, int]:
        """The initial and the target budget: the total rank over all adapted matrices."""
        n = len(triplets(model))
        return self.config.init_r * n, self.config.target_r * n

    def budget_schedule(self, step: int, total_steps: int, init_bgt: int, target_bgt: int) -> tuple[int, bool]:
        """(budget, whether to mask at this step): eq. (11) with peft's step conventions."""
        cfg = self.config
        if step <= cfg.tinit:
            return init_bgt, False
        if step > total_steps - cfg.tfinal:
            return target_bgt, True
        mul = 1 - (step - cfg.tinit) / (total_steps - cfg.tfinal - cfg.tinit)
        return int((init_bgt - target_bgt) * mul**3 + target_bgt), step % cfg.deltaT == 0

    @torch.no_grad()
    def update_importance(self, model: nn.Module) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for _, layer, s in triplets(model):
            for p in (layer.P[s], layer.E[s], layer.Q[s]):
                if p.grad is None:
                    continue
                ipt = (p * p.grad).abs().float()
                avg = self.exp_avg_ipt.get(id(p), torch.zeros_like(ipt))
                unc = self.exp_avg_unc.get(id(p), torch.zeros_like(ipt))
                avg = b1 * avg + (1 - b1) * ipt
                self.exp_avg_ipt[id(p)] = avg
                self.exp_avg_unc[id(p)] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def triplet_scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Eq. (10): ``s(lambda_i) + mean_j s(Q_ij) + mean_k s(P_ki)`` per triplet of every matrix."""

        def score(p: nn.Parameter) -> torch.Tensor:
            if id(p) not in self.exp_avg_ipt:
                return torch.zeros(p.shape, device=p.device)
            return self.exp_avg_ipt[id(p)] * self.exp_avg_unc[id(p)]

        return {
            key: score(layer.E[s]) + score(layer.Q[s]).mean(dim=1) + score(layer.P[s]).mean(dim=0)
            for key, layer, s in triplets(model)
        }

    @torch.no_grad()
    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, torch.Tensor]:
        """Zero the lambdas of all but the ``budget`` most important triplets; return the keep-masks."""
        init_bgt, _ = self.budgets(model)
        scores = self.triplet_scores(model)
        k = init_bgt - budget
        if k <= 0:
            return {key: torch.ones_like(v, dtype=torch.bool) for key, v in scores.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values
        keep = {key: v > threshold for key, v in scores.items()}
        for key, layer, s in triplets(model):
            layer.E[s].masked_fill_(~keep[key], 0.0)
        return keep

    @torch.no_grad()
    def apply_pattern(self, model: nn.Module) -> None:
        for key, layer, s in triplets(model):
            layer.E[s].masked_fill_(~self.rank_pattern[key].to(layer.E[s].device), 0.0)

    def on_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        cfg = self.config
        if total_steps - cfg.tfinal - cfg.tinit <= 0:
            raise ConfigError(
                f"adalora needs tinit + tfinal ({cfg.tinit} + {cfg.tfinal}) below the run's {total_steps} steps"
            )
        init_bgt, target_bgt = self.budgets(model)
        final = total_steps - cfg.tfinal
        if step < final:
            self.update_importance(model)
            budget, mask = self.budget_schedule(step, total_steps, init_bgt, target_bgt)
            if mask:
                self.mask_to_budget(model, budget)
        elif step == final:
            self.rank_pattern = self.mask_to_budget(model, target_bgt)
            self.reset_importance()
        elif self.rank_pattern is not None:
            self.apply_pattern(model)

    def ranks(self, model: nn.Module) -> dict[str, int]:
        """The rank of every adapted matrix now: its number of non-zero lambdas."""
        return {key: int((layer.E[s] != 0).sum()) for key, layer, s in triplets(model)}

    def merge(self, model: nn.Module) -> None:
        for host, name, update in list(attached(model, SVDUpdate)):
            with torch.no_grad():
                host.weight.add_(update.delta_weight().to(host.weight.dtype))
            detach(host, name)
