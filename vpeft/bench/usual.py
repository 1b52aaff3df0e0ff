"""The usual recipe of today's vision-PEFT code bases, as a baseline to measure against.

A torch DataLoader over the image files that opens, converts and resizes every image with PIL each
time it is drawn (``transforms.Resize((224, 224))``, ``ToTensor``, ``Normalize``), batch 64, fp32,
a host sync per step to log the loss. Same model, optimizer, schedule, seed and even sample order
as vpeft's engine, so the two differ only in how they feed and run the device.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2 as T

from vpeft.bench._common import autocast, synchronize
from vpeft.data.decode import resampling
from vpeft.data.folder import read_list
from vpeft.errors import DataError


class ImageFiles(Dataset):
    """One split of a task folder (``<split>.txt`` of ``<path> <label>``), decoded on every access."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
    ):
        self.entries = read_list(Path(root) / f"{split}.txt")
        self.size, self.resample = tuple(size), resampling(interpolation)
        self.normalize = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.entries)

    def pil(self, i: int) -> Image.Image:
        """The resized RGB image, before tensor conversion (what Resize((H, W)) on a PIL image gives)."""
        entry = self.entries[i]
        try:
            with Image.open(entry.path) as img:
                return img.convert("RGB").resize(self.size[::-1], self.resample)
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for missing, truncated, corrupt files
            raise DataError(f"cannot read image {entry.path} ({entry.where()}): {e}") from e

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.normalize(self.pil(i)), self.entries[i].label


class EngineOrder(Sampler[int]):
    """The engine's sample order: one permutation per epoch from a generator seeded once."""

    def __init__(self, n: int, seed: int):
        self.n, self.generator = n, torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


@dataclasses.dataclass(frozen=True)
class UsualResult:
    top1: float
    train_seconds: float  # of the epochs actually run
    eval_seconds: float
    epochs_run: int
    epochs: int  # of the recipe; train_seconds_full extrapolates to it when fewer were run
    train_seconds_full: float
    train_images_per_s: float
    dtype: str
    batch_size: int
    num_workers: int


def usual_run(
    model: nn.Module,
    root: str | os.PathLike,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    train_split: str = "train800val200",
    eval_split: str = "test",
    epochs: int = 100,
    run_epochs: int | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup_epochs: int = 10,
    dtype: str = "fp32",
    num_workers: int = 8,
    interpolation: str = "bicubic",
    seed: int = 0,
) -> UsualResult:
    """Train the trainable parameters of ``model`` the usual way and evaluate on ``eval_split``.

    ``run_epochs`` < ``epochs`` times only that many epochs of the schedule and extrapolates the
    training time (its accuracy is then that of a cut-short run, and says so via ``epochs_run``).
    """
    run_epochs = epochs if run_epochs is None else min(run_epochs, epochs)
    train_set = ImageFiles(root, train_split, size, mean, std, interpolation)
    eval_set = ImageFiles(root, eval_split, size, mean, std, interpolation)
    loader_args = dict(num_workers=num_workers, pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)
    train_loader = DataLoader(train_set, batch_size, sampler=EngineOrder(len(train_set), seed), **loader_args)
    eval_loader = DataLoader(eval_set, batch_size, shuffle=False, **loader_args)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = len(train_loader)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=epochs * steps,
        lr_min=1e-5,
        warmup_t=warmup_epochs * steps,
        warmup_lr_init=1e-7,
        t_in_epochs=False,
    )
    synchronize(device)
    start = time.perf_counter()
    step = 0
    for _ in range(run_epochs):
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(dtype, device):
                loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            loss.item()  # the per-step logging these recipes do
    synchronize(device)
    train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    model.eval()
    correct = 0
    with torch.inference_mode():
        for x, y in eval_loader:
            with autocast(dtype, device):
                logits = model(x.to(device, non_blocking=True))
            correct += int((logits.argmax(-1).cpu() == y).sum())
    synchronize(device)
    eval_seconds = time.perf_counter() - start
    model.train()
    return UsualResult(
        top1=100.0 * correct / len(eval_set),
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        epochs_run=run_epochs,
        epochs=epochs,
        train_seconds_full=train_seconds * epochs / max(run_epochs, 1),
        train_images_per_s=run_epochs * len(train_set) / train_seconds,
        dtype=dtype,
        batch_size=batch_size,
        num_workers=num_workers,
    )
