"""Small plain-PyTorch helpers a site's training script may use: batches from uint8 arrays, one epoch
of training, evaluation. Nothing here knows about federation; a script calls these between
`fedclient.api.receive()` and `send()`.

Inputs are the uint8 image arrays of a prepared site (`fedgrid.data.load_site`). `make_loader` keeps
them as one uint8 tensor, channel-first, and converts each batch when it is drawn: float32 in [0, 1],
then `(x - mean) / std`. The default mean = std = 0.5 maps [0, 1] to [-1, 1] for every data set, so
that every site normalizes identically without anyone computing statistics over pooled data; the
usual per-data-set statistics are in `NORMALIZATION` for scripts that prefer them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]

# Per-channel (mean, std) of the training sets, on the [0, 1] scale.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


class ArrayLoader:
    """Mini-batches of (float32 images N x C x H x W, int64 labels) over in-memory arrays.

    Batches are cut from one tensor by index, which is many times faster than a DataLoader that
    fetches and collates sample by sample. With `shuffle`, each pass draws a new permutation from a
    `torch.Generator` seeded once, so a run is reproducible and epochs differ.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
    ) -> None:
        x = np.asarray(x)
        y = np.asarray(y)
        if x.dtype != np.uint8 or x.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 (N, H, W) or (N, H, W, C), got {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"labels must be (N,) with N = {len(x)}, got {y.shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        images = torch.from_numpy(np.ascontiguousarray(x))
        self.x = images.unsqueeze(1) if x.ndim == 3 else images.permute(0, 3, 1, 2).contiguous()
        self.y = torch.from_numpy(y.astype(np.int64))
        channels = self.x.shape[1]
        self.mean = _per_channel(mean, channels, "mean")
        self.std = _per_channel(std, channels, "std")
        if bool((self.std <= 0).any()):
            raise ValueError("std must be > 0")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        order = torch.randperm(self.num_samples, generator=self.generator) if self.shuffle else None
        for start in range(0, self.num_samples, self.batch_size):
            if order is None:
                xb, yb = self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]
            else:
                index = order[start : start + self.batch_size]
                xb, yb = self.x[index], self.y[index]
            yield (xb.float().div_(255.0) - self.mean) / self.std, yb


def _per_channel(value: float | Sequence[float], channels: int, what: str) -> torch.Tensor:
    values = [float(value)] if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) == 1:
        values *= channels
    if len(values) != channels:
        raise ValueError(f"{what} has {len(values)} values for {channels} channel(s)")
    return torch.tensor(values, dtype=torch.float32).view(1, channels, 1, 1)


def make_loader(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    *,
    mean: float | Sequence[float] = 0.5,
    std: float | Sequence[float] = 0.5,
) -> ArrayLoader:
    """Batches of normalized float32 channel-first images and int64 labels from uint8 arrays.

    (N, 28, 28) becomes (B, 1, 28, 28) and (N, 32, 32, 3) becomes (B, 3, 32, 32); values are
    (x / 255 - mean) / std, by default mean = std = 0.5 (see the module docstring).
    """
    return ArrayLoader(x, y, batch_size, shuffle, seed, mean, std)


def train_epoch(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module | None = None,
    device: torch.device | str = "cpu",
) -> float:
    """One pass over `loader` on `device` (where the model is); returns the mean training loss per sample
    (cross-entropy by default)."""
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    model.train()
    total, count = 0.0, 0
    for xb, yb in loader:
        xb, yb = xb.to(device), yb.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(yb)
        count += len(yb)
    if count == 0:
        raise ValueError("the loader yielded no samples")
    return total / count


def evaluate(model: nn.Module, loader: Iterable[Batch], device: torch.device | str = "cpu") -> tuple[float, float]:
    """(mean cross-entropy per sample, accuracy in [0, 1]) of `model` over `loader` on `device`, without
    gradients."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            logits = model(xb)
            total_loss += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == yb).sum())
            count += len(yb)
    if count == 0:
        raise ValueError("the loader yielded no samples")
    return total_loss / count, correct / count
