"""One site's prepared data: a folder with `train.npz` and `val.npz`, each holding `x` and `y`.

`x` is uint8 images, (N, H, W) for grey images or (N, H, W, C) channel-last for colour; `y` is uint8
labels. The files are plain `np.savez` archives and are read with `allow_pickle=False`, so a data
folder can never carry code.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedgrid.data.errors import DataError

TRAIN_FILE = "train.npz"
VAL_FILE = "val.npz"


@dataclass(frozen=True)
class SiteData:
    """A site's training and validation arrays, checked for shape and dtype when loaded."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_val(self) -> int:
        return len(self.y_val)


def save_split(path: str | Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write one split as `x`, `y` (uncompressed npz: loading is then a plain read)."""
    x, y = _check_split(Path(path), np.asarray(x), np.asarray(y))
    with open(path, "wb") as out:
        np.savez(out, x=x, y=y)


def _check_split(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3)):
        raise DataError(f"{path}: 'x' must be uint8 images (N, H, W) or (N, H, W, C), found {x.dtype} {x.shape}")
    if y.dtype != np.uint8 or y.ndim != 1:
        raise DataError(f"{path}: 'y' must be uint8 labels (N,), found {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{path}: {len(y)} labels for {len(x)} images")
    return x, y


def load_split(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one split file; DataError naming the file when it is missing or malformed."""
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: expected an .npz archive with 'x' and 'y', found a single array")
        with loaded as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(sorted(missing))}")
            x, y = archive["x"], archive["y"]
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run prepare-data or check the site's data folder") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable npz archive ({exc})") from None
    return _check_split(path, x, y)


def load_site(folder: str | Path) -> SiteData:
    """Load `train.npz` and `val.npz` of a prepared site folder; the site's name is the folder's."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: site data folder not found; run prepare-data or check the path")
    x_train, y_train = load_split(folder / TRAIN_FILE)
    x_val, y_val = load_split(folder / VAL_FILE)
    if x_train.shape[1:] != x_val.shape[1:]:
        raise DataError(f"{folder}: train images {x_train.shape[1:]} and val images {x_val.shape[1:]} differ")
    return SiteData(folder.name, x_train, y_train, x_val, y_val)
