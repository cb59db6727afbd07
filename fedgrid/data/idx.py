"""IDX files (the MNIST / Fashion-MNIST format), plain or gzip-compressed.

An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of dimensions), one
big-endian uint32 per dimension, then the values, big-endian, row-major. We read the header first and
then exactly the number of bytes it announces, so a truncated file, a file with trailing bytes, or a
gzip bomb is refused with the file's name before anything is trusted.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fedgrid.data.errors import DataError

# dtype code (third magic byte) -> numpy dtype, big-endian as the format stores it.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# The file names of the MNIST distribution; some mirrors write "train-images.idx3-ubyte" instead.
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

MAX_IDX_BYTES = 2**31  # refuse headers announcing more than 2 GiB: no IDX data set we read is that big


def _open(path: Path) -> BinaryIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    chunks = []
    remaining = size
    while remaining > 0:
        chunk = stream.read(min(remaining, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (".gz" is decompressed) into a native-endian numpy array.

    Raises DataError naming the file when the magic number, the dtype code, or the size announced by
    the header does not match the file.
    """
    path = Path(path)
    try:
        with _open(path) as stream:
            magic = _read_exact(stream, 4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
                hint = "; it is gzip-compressed: name it *.gz" if magic[:2] == b"\x1f\x8b" else ""
                raise DataError(f"{path}: not an IDX file (bad magic number {magic.hex() or 'empty'}){hint}")
            code, ndim = magic[2], magic[3]
            if code not in IDX_DTYPES:
                raise DataError(f"{path}: unknown IDX dtype code 0x{code:02x}")
            if ndim == 0:
                raise DataError(f"{path}: IDX header declares zero dimensions")
            dims_raw = _read_exact(stream, 4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise DataError(f"{path}: truncated IDX header")
            shape = struct.unpack(f">{ndim}I", dims_raw)
            dtype = IDX_DTYPES[code]
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if expected > MAX_IDX_BYTES:
                raise DataError(f"{path}: IDX header announces {expected} bytes, more than this reader accepts")
            payload = _read_exact(stream, expected + 1)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if len(payload) != expected:
        what = "truncated" if len(payload) < expected else "longer than its header says"
        raise DataError(
            f"{path}: {what}: header {shape} of {dtype.name} needs {expected} data bytes, "
            f"found {len(payload) if len(payload) <= expected else 'more'}"
        )
    # A writable native-endian copy: callers index and slice it freely.
    return np.frombuffer(payload, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write an array as an IDX file (gzip when the name ends in ".gz"); used to make test fixtures."""
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("=").str.lstrip("<>|="): code for code, dt in IDX_DTYPES.items()}
    key = array.dtype.str.lstrip("<>|=")
    if key not in codes:
        raise DataError(f"{path}: dtype {array.dtype} cannot be stored in an IDX file")
    code = codes[key]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as out:
        out.write(header + body)


def find_idx_file(folder: Path, stem: str) -> Path:
    """The file for `stem` in `folder`: plain or .gz, with "-idx" or ".idx" in the name."""
    candidates = [stem, stem.replace("-idx", ".idx")]
    for name in candidates:
        for suffix in ("", ".gz"):
            path = folder / (name + suffix)
            if path.is_file():
                return path
    raise DataError(f"{folder}: missing {stem} (or {stem}.gz)")


def load_idx_split(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) uint8 and labels (N,) uint8 of the "train" or "test" split in `folder`.

    Checks what a classifier needs: uint8 images of three dimensions, uint8 labels of one, as many
    labels as images, labels in 0..9.
    """
    folder = Path(folder)
    image_stem, label_stem = SPLIT_FILES[split]
    image_path = find_idx_file(folder, image_stem)
    label_path = find_idx_file(folder, label_stem)
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(f"{image_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{label_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise DataError(f"{label_path}: {len(labels)} labels for {len(images)} images in {image_path.name}")
    if len(labels) and labels.max() > 9:
        raise DataError(f"{label_path}: label {int(labels.max())} is outside 0..9")
    return images, labels
