"""CIFAR-10 "python version" batches, read with a restricted unpickler.

The official batches (`data_batch_1` .. `data_batch_5`, `test_batch`) are pickles, and a pickle can
name any importable callable and have it called while loading: a file dropped in a data folder must
not be able to run code. So `BatchUnpickler.find_class` resolves only the handful of names a numpy
array inside a dict needs, each through a wrapper that checks its arguments, and refuses every other
global before it is imported. What comes out is then validated: a dict with `data`, a uint8 array
(N, 3072), and `labels`, N integers in 0..9. Anything else is refused with the file's name.

Which names the batches use depends on the numpy that wrote them: the official files (numpy 1.x)
say `numpy.core.multiarray._reconstruct`, numpy 2.x writes `numpy._core.multiarray._reconstruct`,
and pickle protocol 5 uses `numpy._core.numeric._frombuffer`; protocol 2 writes bytes through
`_codecs.encode(text, "latin1")`. Each is mapped to the current numpy function, without importing
the deprecated `numpy.core` alias.
"""

from __future__ import annotations

import codecs
import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy._core import multiarray as _multiarray
from numpy._core import numeric as _numeric

from fedgrid.data.errors import DataError

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
FOLDER_NAME = "cifar-10-batches-py"  # what the official archive unpacks to
MAX_BATCH_BYTES = 256 * 1024 * 1024  # an official batch is about 31 MB
IMAGE_VALUES = 32 * 32 * 3


class RefusedPickle(pickle.UnpicklingError):
    """The pickle names something a data batch does not need."""


def _plain_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise RefusedPickle("object dtype is not allowed in a data batch")
    return dtype


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    # numpy pickles an array as _reconstruct(ndarray, (0,), b"b") followed by __setstate__ with the data.
    if subtype is not np.ndarray:
        raise RefusedPickle(f"array reconstruction of {subtype!r} is not allowed")
    if not isinstance(shape, tuple) or any(not isinstance(d, int) or d < 0 for d in shape) or sum(shape) > 1:
        raise RefusedPickle(f"unexpected array placeholder shape {shape!r}")
    return _multiarray._reconstruct(np.ndarray, shape, typecode)


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if not isinstance(buffer, bytes | bytearray) or not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise RefusedPickle("unexpected arguments to numpy's _frombuffer")
    return _numeric._frombuffer(buffer, dtype, shape, order)


def _scalar(dtype: Any, *args: Any) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise RefusedPickle("numpy scalar of a non-plain dtype is not allowed")
    return _multiarray.scalar(dtype, *args)


def _latin1_encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    # Protocol 2 stores Python 3 bytes as _codecs.encode(str, "latin1"); other codecs (zlib, ...) are refused.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise RefusedPickle(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1_encode,
}


class BatchUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of `ALLOWED_GLOBALS`, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedPickle(f"refused global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle("persistent ids are not allowed")


def _field(batch: dict, name: str) -> Any:
    for key in (name.encode(), name):
        if key in batch:
            return batch[key]
    return None


def load_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8, HWC, and labels (N,) uint8 of one CIFAR-10 python batch.

    The file is unpickled with `BatchUnpickler` (no code runs; unknown globals are refused) and its
    content validated; any problem raises DataError naming the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BATCH_BYTES:
            raise DataError(f"{path}: {size} bytes is far larger than a CIFAR-10 batch; refused")
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    try:
        batch = BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except RefusedPickle as exc:
        raise DataError(f"{path}: refused, not a plain CIFAR-10 batch: {exc}") from None
    except Exception as exc:  # any malformed pickle: EOFError, UnpicklingError, ValueError, TypeError, ...
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({type(exc).__name__}: {exc})") from None

    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict, found {type(batch).__name__}")
    data = _field(batch, "data")
    labels = _field(batch, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_VALUES:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, {IMAGE_VALUES}), found {what}")
    if isinstance(labels, list):
        if not all(type(v) is int for v in labels):
            raise DataError(f"{path}: 'labels' must hold integers")
        labels = np.array(labels, dtype=np.int64)
    elif not (isinstance(labels, np.ndarray) and labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"{path}: 'labels' must be a list or 1-D integer array, found {type(labels).__name__}")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(labels)} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels outside 0..9")
    # Each row is 1024 red, then 1024 green, then 1024 blue values: CHW, turned into HWC.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels.astype(np.uint8)


def batch_folder(source: str | Path) -> Path:
    """The folder holding the batches: `source` itself or its `cifar-10-batches-py` subfolder."""
    source = Path(source)
    if not (source / TEST_BATCH).is_file() and (source / FOLDER_NAME / TEST_BATCH).is_file():
        return source / FOLDER_NAME
    return source


def load_cifar10(source: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) from the six python batches in `source`."""
    folder = batch_folder(source)
    missing = [name for name in (*TRAIN_BATCHES, TEST_BATCH) if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder}: missing CIFAR-10 batch files {', '.join(missing)}")
    parts = [load_batch(folder / name) for name in TRAIN_BATCHES]
    x_test, y_test = load_batch(folder / TEST_BATCH)
    x_train = np.concatenate([x for x, _ in parts])
    y_train = np.concatenate([y for _, y in parts])
    return x_train, y_train, x_test, y_test
