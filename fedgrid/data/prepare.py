"""Split a data set into one folder per site: what `prepare-data` does, without the printing.

Training data is split by the chosen scheme (see `fedgrid.data.partition`). Validation data is the
test set split IID into n near-equal shares, independently of the training split: the shares are
disjoint and cover the test set, so the sample-weighted mean of the sites' validation accuracies is
exactly the accuracy on the whole test set, whatever the training split.

The output folder is written atomically: everything goes to a hidden temporary folder beside it,
which replaces the previous output only once complete. A folder that is not a previous output of
this tool (it has no summary.json of ours) is never replaced.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedgrid.data.datasets import dataset_info, load_dataset
from fedgrid.data.errors import DataError
from fedgrid.data.partition import iid, parse_scheme, partition
from fedgrid.data.site import TRAIN_FILE, VAL_FILE, save_split

SUMMARY_FILE = "summary.json"
TOOL_MARK = "fedgrid prepare-data"
NUM_CLASSES = 10
VALIDATION_NOTE = (
    "val.npz of each site is an IID share of the test set, drawn independently of the training split; "
    "the shares are disjoint and cover the test set, so the sample-weighted mean of the sites' "
    "validation accuracies equals the accuracy on the whole test set"
)
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def site_names(n: int, names: Sequence[str] | None = None) -> list[str]:
    """`site-1`..`site-n`, or the given names after checking they are n distinct folder-safe names."""
    if n < 1:
        raise DataError(f"number of sites must be at least 1, got {n}")
    if names is None:
        return [f"site-{i}" for i in range(1, n + 1)]
    names = list(names)
    if len(names) != n:
        raise DataError(f"--sites lists {len(names)} name(s) but -n is {n}")
    for name in names:
        if not _SITE_NAME.fullmatch(name):
            raise DataError(f"site name {name!r} must be letters, digits, '.', '_' or '-' (not starting with one)")
    if len(set(names)) != n:
        raise DataError("site names must be distinct")
    return names


def label_histogram(labels: np.ndarray) -> list[int]:
    return np.bincount(labels, minlength=NUM_CLASSES).tolist()


def prepare(
    dataset: str,
    n: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    seed: int = 42,
    source: str | Path | None = None,
    out: str | Path | None = None,
    sites: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Partition `dataset` for `n` sites into `out` (default `data/<dataset>`); return the summary.

    Raises DataError (bad option, missing or malformed source, impossible split, unsafe output folder);
    on any failure the previous output is left as it was and nothing partial remains.
    """
    dataset_info(dataset)
    names = site_names(n, sites)
    kind, _ = parse_scheme(scheme)
    if not alpha > 0:
        raise DataError(f"--alpha must be > 0, got {alpha}")
    if seed < 0:
        raise DataError(f"--seed must be >= 0, got {seed}")
    out = Path(out) if out is not None else Path("data") / dataset
    _check_replaceable(out)

    x_train, y_train, x_test, y_test = load_dataset(dataset, source)
    train_rng, val_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    train_parts = partition(y_train, n, scheme, train_rng, alpha=alpha)
    val_parts = iid(y_test, n, val_rng)

    summary: dict[str, Any] = {
        "tool": TOOL_MARK,
        "dataset": dataset,
        "source": str(source) if source is not None else str(dataset_info(dataset).default_source),
        "partition": scheme,
        "alpha": alpha if kind == "dirichlet" else None,
        "seed": seed,
        "num_sites": n,
        "image_shape": list(x_train.shape[1:]),
        "train_samples": int(sum(len(p) for p in train_parts)),
        "val_samples": int(sum(len(p) for p in val_parts)),
        "validation": VALIDATION_NOTE,
        "sites": [
            {
                "name": name,
                "train_samples": len(tr),
                "val_samples": len(va),
                "train_label_histogram": label_histogram(y_train[tr]),
                "val_label_histogram": label_histogram(y_test[va]),
            }
            for name, tr, va in zip(names, train_parts, val_parts, strict=True)
        ],
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for name, tr, va in zip(names, train_parts, val_parts, strict=True):
            (tmp / name).mkdir()
            save_split(tmp / name / TRAIN_FILE, x_train[tr], y_train[tr])
            save_split(tmp / name / VAL_FILE, x_test[va], y_test[va])
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _is_previous_output(folder: Path) -> bool:
    try:
        return json.loads((folder / SUMMARY_FILE).read_text()).get("tool") == TOOL_MARK
    except (OSError, ValueError, AttributeError):
        return False


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_previous_output(out):
        raise DataError(f"--out {out} is not empty and not a previous prepare-data output; refusing to replace it")


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` with two renames, restoring the old folder if the second one fails."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
