"""Example models and the training helpers: sizes, shapes, batching, and that training learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedgrid.models import MLP, Cifar10CNN, McMahanCNN, build_model, count_parameters
from fedgrid.training import NORMALIZATION, evaluate, make_loader, train_epoch

FASHION = Path("/usr/share/datasets/fashion-mnist")


def random_images(n: int, shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, *shape), dtype=np.uint8), g.integers(0, 10, n).astype(np.uint8)


@pytest.mark.parametrize(
    ("name", "cls", "params"),
    [("mlp", MLP, 669_706), ("cnn", McMahanCNN, 1_663_370), ("cifar10-cnn", Cifar10CNN, 545_098)],
)
def test_parameter_counts(name: str, cls: type, params: int) -> None:
    model = build_model(name)
    assert isinstance(model, cls)
    assert count_parameters(model) == params


@pytest.mark.parametrize(("name", "shape"), [("mlp", (28, 28)), ("cnn", (28, 28)), ("cifar10-cnn", (32, 32, 3))])
def test_forward_shapes_from_loader_batches(name: str, shape: tuple[int, ...]) -> None:
    x, y = random_images(5, shape)
    xb, yb = next(iter(make_loader(x, y, batch_size=4, shuffle=False)))
    assert xb.shape == ((4, 1, 28, 28) if len(shape) == 2 else (4, 3, 32, 32))
    assert build_model(name)(xb).shape == (4, 10)
    assert yb.dtype == torch.int64


def test_unknown_model_name_lists_the_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet'.*mlp, cnn, cifar10-cnn"):
        build_model("resnet")


def test_loader_normalizes_and_puts_channels_first() -> None:
    x = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    x[:, :, :, 0] = 255  # red channel saturated, others black
    xb, _ = next(iter(make_loader(x, np.array([1, 2], np.uint8), 2, shuffle=False)))
    assert xb.dtype == torch.float32
    assert torch.all(xb[:, 0] == 1.0) and torch.all(xb[:, 1:] == -1.0)  # (x/255 - 0.5) / 0.5
    mean, std = NORMALIZATION["cifar10"]
    xb, _ = next(iter(make_loader(x, np.array([1, 2], np.uint8), 2, shuffle=False, mean=mean, std=std)))
    assert xb[0, 0, 0, 0].item() == pytest.approx((1 - mean[0]) / std[0])
    assert xb[0, 2, 0, 0].item() == pytest.approx(-mean[2] / std[2])


def test_loader_covers_every_sample_once_per_epoch_and_is_seeded() -> None:
    x = np.arange(103, dtype=np.uint8).reshape(103, 1, 1).repeat(28, axis=1).repeat(28, axis=2)
    y = (np.arange(103) % 10).astype(np.uint8)
    loader = make_loader(x, y, batch_size=10, shuffle=True, seed=3)
    assert len(loader) == 11 and loader.num_samples == 103

    def epoch_order(ld) -> list[int]:
        return [int(round((v * 0.5 + 0.5) * 255)) for xb, _ in ld for v in xb[:, 0, 0, 0].tolist()]

    first, second = epoch_order(loader), epoch_order(loader)
    assert sorted(first) == list(range(103)) and sorted(second) == list(range(103))
    assert first != second, "each epoch should draw a new order"
    assert epoch_order(make_loader(x, y, 10, True, seed=3)) == first
    assert epoch_order(make_loader(x, y, 10, shuffle=False)) == list(range(103))
    labels = [int(v) for _, yb in make_loader(x, y, 10, shuffle=False) for v in yb]
    assert labels == y.tolist()


def test_loader_rejects_bad_arrays() -> None:
    x, y = random_images(4, (28, 28))
    with pytest.raises(ValueError, match="uint8"):
        make_loader(x.astype(np.float32), y, 2, False)
    with pytest.raises(ValueError, match="labels"):
        make_loader(x, y[:3], 2, False)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(x, y, 0, False)


def test_evaluate_matches_a_direct_computation() -> None:
    torch.manual_seed(0)
    x, y = random_images(50, (28, 28), seed=1)
    model = build_model("mlp")
    loss, acc = evaluate(model, make_loader(x, y, 16, shuffle=False))
    xb, yb = next(iter(make_loader(x, y, 50, shuffle=False)))
    with torch.no_grad():
        logits = model(xb)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, yb).item(), rel=1e-5)
    assert acc == pytest.approx((logits.argmax(1) == yb).float().mean().item())
    assert not model.training


def tiny_slice() -> tuple[np.ndarray, np.ndarray]:
    """256 real Fashion-MNIST training images when installed, else learnable synthetic ones."""
    if (FASHION / "train-images-idx3-ubyte.gz").is_file():
        from fedgrid.data import load_dataset

        x, y, _, _ = load_dataset("fashion-mnist")
        return x[:256], y[:256]
    y = np.arange(256) % 10
    x = np.zeros((256, 28, 28), np.uint8)
    for i, label in enumerate(y):
        x[i, label * 2 : label * 2 + 3, :] = 255  # a bar whose position is the label
    return x, y.astype(np.uint8)


def test_a_few_mlp_epochs_on_a_tiny_slice_lower_the_loss() -> None:
    torch.manual_seed(0)
    x, y = tiny_slice()
    model = build_model("mlp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = make_loader(x, y, batch_size=32, shuffle=True, seed=0)
    eval_loader = make_loader(x, y, batch_size=256, shuffle=False)
    loss_before, acc_before = evaluate(model, eval_loader)
    train_losses = [train_epoch(model, loader, optimizer) for _ in range(3)]
    loss_after, acc_after = evaluate(model, eval_loader)
    assert loss_after < 0.7 * loss_before
    assert acc_after > acc_before + 0.3
    assert train_losses[-1] < train_losses[0]
    assert model.training is False  # evaluate leaves the model in eval mode


def test_train_epoch_uses_the_given_loss_and_refuses_an_empty_loader() -> None:
    x, y = random_images(8, (28, 28))
    model = build_model("mlp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    calls = []

    class CountingLoss(torch.nn.CrossEntropyLoss):
        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            calls.append(len(target))
            return super().forward(logits, target)

    mean_loss = train_epoch(model, make_loader(x, y, 3, False), optimizer, CountingLoss())
    assert calls == [3, 3, 2]
    assert mean_loss == pytest.approx(evaluate(model, make_loader(x, y, 8, False))[0], rel=1e-5)
    with pytest.raises(ValueError, match="no samples"):
        train_epoch(model, [], optimizer)
