"""DINO's weighted k-NN classifier on frozen features, and the retention ratio built on it.

The protocol of Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (ICCV 2021),
``eval_knn.py`` of facebookresearch/dino: features L2-normalised, the k training features of highest cosine
similarity vote for their labels with weight exp(similarity / T), k = 20, T = 0.07; the class with the largest
summed weight is the prediction (ties: the smallest class index).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

KNN_K = 20
KNN_TEMPERATURE = 0.07


def _check(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, k: int, temperature: float) -> None:
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"features must be [N, D] with one D, got {tuple(train.shape)} and {tuple(test.shape)}")
    if len(train_labels) != len(train) or len(train) == 0:
        raise ValueError(f"{len(train)} training features and {len(train_labels)} labels: need as many, at least one")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"the temperature must be a positive number, got {temperature!r}")


@torch.no_grad()
def knn_predict(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> torch.Tensor:
    """The predicted class of every row of ``test`` (features [M, D]) from ``train`` ([N, D], labels [N])."""
    _check(train, train_labels, test, k, temperature)
    train = F.normalize(train.double(), dim=1)
    test = F.normalize(test.double(), dim=1)
    labels = train_labels.to(train.device, torch.long)
    k = min(k, len(train))
    out = []
    for block in test.split(chunk):
        sim, idx = (block @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(block), num_classes, dtype=torch.float64, device=train.device)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        out.append(votes.argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def knn_top1(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> float:
    """Top-1 (%) of the k-NN classifier fit on (``train``, ``train_labels``) over (``test``, ``test_labels``)."""
    pred = knn_predict(train, train_labels, test, num_classes, k, temperature)
    if len(test_labels) == 0:
        raise ValueError("no test features to score")
    return 100.0 * (pred.cpu() == test_labels.cpu().long()).double().mean().item()


def retention(adapted: Mapping[str, float], bare: Mapping[str, float]) -> dict[str, float]:
    """Per probe task, adapted k-NN top-1 / the bare backbone's (1.0 keeps all of it); ``mean`` their plain mean.

    A task where the bare backbone scores 0 has no ratio: it is refused, named."""
    if set(adapted) != set(bare) or not bare:
        raise ValueError(f"retention needs the same probe tasks on both sides: {sorted(adapted)}, {sorted(bare)}")
    zero = [t for t, v in bare.items() if v <= 0]
    if zero:
        raise ValueError(f"the bare backbone scores 0 on {', '.join(zero)}: no retention ratio there")
    out = {t: adapted[t] / bare[t] for t in sorted(bare)}
    out["mean"] = sum(out.values()) / len(bare)
    return out
