"""The data sets prepare-data knows, where they are found by default, and how to load them whole.

Nothing is downloaded: the files must already be on disk. Fashion-MNIST comes from the Debian package
`dataset-fashion-mnist`; MNIST (IDX files) and CIFAR-10 (python batches) from a folder the user names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedgrid.data.cifar import batch_folder, load_cifar10
from fedgrid.data.errors import DataError
from fedgrid.data.idx import load_idx_split

Arrays4 = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    image_shape: tuple[int, ...]
    default_source: Path | None
    how_to_get: str
    """Appended to "not found": what to install or pass."""


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        "fashion-mnist",
        (28, 28),
        Path("/usr/share/datasets/fashion-mnist"),
        "install it with `apt-get install dataset-fashion-mnist`, or pass --source DIR holding the four IDX files",
    ),
    "mnist": DatasetInfo(
        "mnist",
        (28, 28),
        None,
        "pass --source DIR holding train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
        "and t10k-labels-idx1-ubyte (.gz or not)",
    ),
    "cifar10": DatasetInfo(
        "cifar10",
        (32, 32, 3),
        None,
        "pass --source DIR holding the python batches data_batch_1..5 and test_batch (cifar-10-batches-py)",
    ),
}


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}") from None


def resolve_source(name: str, source: str | Path | None = None) -> Path:
    """The folder to read `name` from; DataError with what to install or pass when it is missing."""
    info = dataset_info(name)
    folder = Path(source) if source is not None else info.default_source
    if folder is None:
        raise DataError(f"{name}: no default location; {info.how_to_get}")
    if not folder.is_dir():
        raise DataError(f"{name}: {folder} not found; {info.how_to_get}")
    return folder


def load_dataset(name: str, source: str | Path | None = None) -> Arrays4:
    """(x_train, y_train, x_test, y_test) of a whole data set, for partitioning or a centralized baseline.

    Images are uint8, (N, 28, 28) or (N, 32, 32, 3) HWC; labels uint8 in 0..9. `source` defaults to the
    data set's installed location (Fashion-MNIST only).
    """
    folder = resolve_source(name, source)
    if name == "cifar10":
        x_train, y_train, x_test, y_test = load_cifar10(batch_folder(folder))
    else:
        x_train, y_train = load_idx_split(folder, "train")
        x_test, y_test = load_idx_split(folder, "test")
    expected = DATASETS[name].image_shape
    for split, x in (("train", x_train), ("test", x_test)):
        if x.shape[1:] != expected:
            raise DataError(f"{folder}: {name} {split} images are {x.shape[1:]}, expected {expected}")
    return x_train, y_train, x_test, y_test
