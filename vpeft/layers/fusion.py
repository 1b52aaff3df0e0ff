"""AdapterFusion: attention over the outputs of N frozen adapters (Pfeiffer et al., 2021).

"AdapterFusion: Non-Destructive Task Composition for Transfer Learning", EACL 2021, eq. 3-5: at a
sub-layer whose output is ``h``, with adapter outputs ``z_n`` (each adapter's bottleneck branch,
without its skip connection),

    s = softmax_n(h^T Q  (z_n^T K)^T),   o = h + sum_n s_n z_n^T V,

so the trained adapters stay untouched and a new task learns only which of them to read. Q and K
start random, V at the identity (ones on the diagonal, 1e-6 elsewhere, as the authors' code), so
at init the block adds a mixture of the adapters' own updates. The authors' code (AdapterHub's
adapter-transformers and adapters, ``get_fusion_regularization_loss``, on by default through the fusion
config's ``regularization``) adds ``0.01 * ||I - V||^2`` (squared Frobenius norm) per fusion layer to
the training loss, keeping V near the identity: ``AdapterFusion.value_penalty``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from vpeft.layers.adapter import ACTIVATIONS
from vpeft.layers.delta import OutputDelta

VALUE_OFF_DIAGONAL = 1e-6  # the authors' code initialises V to this with ones on the diagonal
VALUE_REG_WEIGHT = 0.01  # the authors' code: reg_loss += 0.01 * (I - V).pow(2).sum() per fusion layer


class FrozenAdapter(nn.Module):
    """A trained bottleneck adapter's branch ``up(act(down(h)))``, loaded and never trained.

    Not a ``Delta``: its parameters belong to an earlier task and are never part of this model's delta.
    The computation is ``SerialAdapter``'s without the skip, so one adapter alone reproduces its run.
    """

    def __init__(self, dim: int, bottleneck: int, act: str = "gelu", device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.down = nn.Linear(dim, bottleneck, **dd)
        self.act = ACTIVATIONS[act]()
        self.up = nn.Linear(bottleneck, dim, **dd)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))


class AdapterFusion(OutputDelta):
    """Rewrites a sub-layer's output ``h`` as ``h + sum_n s_n V z_n`` over frozen adapters' outputs ``z_n``.

    The trainable part is ``query`` (Q, with the bias of the authors' code), ``key`` (K) and ``value``
    (V). K has no bias: ``q . b_k`` is the same for every adapter and cancels in the softmax. The scores
    are computed as ``(q K) . z_n`` and the values as ``V (sum_n s_n z_n)``, the same numbers as the
    paper's ``q . (K z_n)`` and ``sum_n s_n (V z_n)`` with the d x d products done once per token
    instead of once per adapter.
    """

    def __init__(self, dim: int, adapters: list[FrozenAdapter], device=None, dtype=None):
        super().__init__()
        if not adapters:
            raise ValueError("AdapterFusion needs at least one adapter")
        dd = {"device": device, "dtype": dtype}
        self.adapters = nn.ModuleList(adapters)
        self.query = nn.Linear(dim, dim, **dd)
        self.key = nn.Linear(dim, dim, bias=False, **dd)
        self.value = nn.Linear(dim, dim, bias=False, **dd)
        with torch.no_grad():  # BERT's init for Q and K, as the authors' code; V near the identity
            nn.init.normal_(self.query.weight, std=0.02)
            nn.init.zeros_(self.query.bias)
            nn.init.normal_(self.key.weight, std=0.02)
            self.value.weight.fill_(VALUE_OFF_DIAGONAL).fill_diagonal_(1.0)

    def delta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name in ("query", "key", "value"):
            for pname, p in getattr(self, name).named_parameters():
                yield f"{name}.{pname}", p

    def value_penalty(self) -> torch.Tensor:
        """``0.01 * ||I - V||_F^2``: AdapterHub's regulariser of the value matrix, float32."""
        v = self.value.weight.float()
        return VALUE_REG_WEIGHT * (torch.eye(v.shape[0], device=v.device) - v).pow(2).sum()

    def attention(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The fusion weights ``s`` ``(..., N)`` given the outputs ``h`` ``(..., d)`` and ``z`` ``(..., N, d)``."""
        u = self.query(h) @ self.key.weight  # q^T K: the query read in the adapters' space
        return torch.softmax((z @ u.unsqueeze(-1)).squeeze(-1), dim=-1)

    def forward(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        z = torch.stack([a(out) for a in self.adapters], dim=-2)
        s = self.attention(out, z)
        mixed = (s.unsqueeze(-2).to(z.dtype) @ z).squeeze(-2)
        return out + self.value(mixed)

    def extra_repr(self) -> str:
        return f"adapters={len(self.adapters)}"
