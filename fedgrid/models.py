"""Example models for fedgrid's jobs, picked by name with `build_model`.

Every model takes float32 images channel-first, as `fedgrid.training.make_loader` yields them:
(N, 1, 28, 28) for MNIST / Fashion-MNIST, (N, 3, 32, 32) for CIFAR-10; each returns (N, 10) logits.
Parameter names are stable (they are the keys of the tensors that travel), so renaming a layer is a
wire change between sites running different versions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class MLP(nn.Module):
    """The two-hidden-layer perceptron of the Manta MNIST example: 784-512-512-10, 669,706 parameters.

    Small enough that a round is dominated by the framework, not the training, which is what the
    design's timing comparisons use.
    """

    def __init__(self, in_features: int = 28 * 28, hidden: int = 512, num_classes: int = 10) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.flatten(x))


class McMahanCNN(nn.Module):
    """The CNN of McMahan et al. 2017 ("FedAvg"), for 1x28x28 input: 1,663,370 parameters.

    5x5 conv 32 -> ReLU -> 2x2 max-pool -> 5x5 conv 64 -> ReLU -> 2x2 max-pool -> FC 512 -> ReLU ->
    FC 10. The convolutions are padded by 2 ("same"), so the maps go 28 -> 14 -> 7 and the first FC
    layer sees 64*7*7 inputs; the count equals the paper's 1,663,370 (the Flower baseline reaches the
    same shapes with padding 1 and padded pooling).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Cifar10CNN(nn.Module):
    """A small CIFAR-10 CNN for 3x32x32 input: 545,098 parameters, trainable on a CPU.

    3x3 conv 32 -> ReLU -> pool -> 3x3 conv 64 -> ReLU -> pool -> FC 128 -> ReLU -> FC 10. Close to the
    MLP in size, so plain and encrypted runs of the CIFAR-10 job cost about what the MNIST ones do.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP,
    "cnn": McMahanCNN,
    "cifar10-cnn": Cifar10CNN,
}


def build_model(name: str, hidden: int = 0) -> nn.Module:
    """A freshly initialised model by name ("mlp", "cnn", "cifar10-cnn"), as a job config names it; `hidden`
    is the MLP's width (0: 512), e.g. 32 for a 26K-parameter MLP (the simulator's 1000-site benchmark)."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
    if hidden:
        if name != "mlp":
            raise ValueError(f"hidden sets the MLP's width; model {name!r} has none")
        return MLP(hidden=hidden)
    return factory()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
