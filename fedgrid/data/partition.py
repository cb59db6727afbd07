"""How a data set is split among sites: pure functions of the labels and a seeded generator.

Every function takes the label array (one int per sample) and a `numpy.random.Generator`, and
returns one sorted int64 index array per site. The arrays are disjoint, so no sample is given to two
sites; the same generator state gives the same split.

    iid          shuffle, then cut into n near-equal parts; every sample is used.
    dirichlet    per class, proportions ~ Dirichlet(alpha) over the sites (Hsu et al. 2019): small
                 alpha gives each site a few dominant classes, large alpha approaches iid. Redrawn
                 until every site has `min_samples`; every sample is used.
    non-iid-K    every site holds exactly K classes; the classes are dealt round a shuffled cycle so
                 that all are used once n*K >= number of classes; a class's samples are split evenly
                 among the sites holding it. Classes no site holds are left out.
    shards       McMahan et al. 2017: sort by label, cut into 2n shards, give each site 2 shards at
                 random; most sites see two classes. Every sample is used.
"""

from __future__ import annotations

import re

import numpy as np

from fedgrid.data.errors import DataError

SCHEMES = ("iid", "dirichlet", "non-iid-K", "shards")
_NON_IID = re.compile(r"non-iid-(\d+)")


def _check_sites(labels: np.ndarray, n: int, per_site: int = 1) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be a 1-D array, got shape {labels.shape}")
    if not isinstance(n, int | np.integer) or n < 1:
        raise DataError(f"number of sites must be at least 1, got {n}")
    if n * per_site > len(labels):
        raise DataError(f"cannot give {n} sites {per_site} sample(s) each from {len(labels)} samples")
    return labels


def _sorted(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(labels: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle all samples and cut them into `n` parts whose sizes differ by at most one."""
    labels = _check_sites(labels, n)
    return _sorted(np.array_split(rng.permutation(len(labels)), n))


def dirichlet(
    labels: np.ndarray,
    n: int,
    rng: np.random.Generator,
    alpha: float = 0.5,
    *,
    min_samples: int = 10,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """Per class, split its samples over the sites in proportions drawn from Dirichlet(alpha).

    The whole draw is repeated until every site holds at least `min_samples` samples, at most
    `max_attempts` times; then DataError says to raise alpha or lower the number of sites.
    """
    labels = _check_sites(labels, n, per_site=max(min_samples, 1))
    if not alpha > 0:
        raise DataError(f"alpha must be > 0, got {alpha}")
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for _ in range(max_attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(n)]
        for indices in by_class:
            shares = rng.dirichlet(np.full(n, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(np.int64)
            for site, chunk in enumerate(np.split(indices, cuts)):
                parts[site].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) >= min_samples:
            return _sorted(merged)
    raise DataError(
        f"dirichlet split with alpha={alpha} left a site with fewer than {min_samples} samples "
        f"in {max_attempts} draws; use a larger alpha or fewer sites"
    )


def label_skew(labels: np.ndarray, n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Give each site exactly `k` classes ("non-iid-K") and split each class among its holders.

    Classes are dealt from a shuffled cycle: site i gets cycle positions i*k .. i*k+k-1 (mod the
    number of classes), so every class is used once n*k reaches the number of classes, and no class
    is held by more than one site more than any other.
    """
    labels = _check_sites(labels, n)
    classes = np.unique(labels)
    if not isinstance(k, int | np.integer) or not 1 <= k <= len(classes):
        raise DataError(f"K must be between 1 and {len(classes)} (the number of classes), got {k}")
    cycle = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    site_classes = []
    for site in range(n):
        mine = [int(cycle[(site * k + j) % len(classes)]) for j in range(k)]
        site_classes.append(mine)
        for c in mine:
            holders[c].append(site)
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c, sites in holders.items():
        if not sites:
            continue
        indices = rng.permutation(np.flatnonzero(labels == c))
        for site, chunk in zip(sites, np.array_split(indices, len(sites)), strict=True):
            parts[site].append(chunk)
    merged = [np.concatenate(p) for p in parts]
    empty = [i for i, p in enumerate(merged) if len(p) == 0]
    if empty:
        raise DataError(f"non-iid-{k}: too few samples for {n} sites (site {empty[0] + 1} would be empty)")
    return _sorted(merged)


def shards(labels: np.ndarray, n: int, rng: np.random.Generator, shards_per_site: int = 2) -> list[np.ndarray]:
    """McMahan et al.'s pathological non-IID split: sort by label, cut 2n shards, 2 per site."""
    labels = _check_sites(labels, n, per_site=shards_per_site)
    # Shuffle first, then sort stably, so that the order within one label is random.
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(by_label, n * shards_per_site)
    order = rng.permutation(len(pieces)).reshape(n, shards_per_site)
    return _sorted([np.concatenate([pieces[i] for i in row]) for row in order])


def parse_scheme(scheme: str) -> tuple[str, int | None]:
    """("non-iid", K) for "non-iid-K"; (scheme, None) for the others; DataError when unknown."""
    match = _NON_IID.fullmatch(scheme)
    if match:
        return "non-iid", int(match.group(1))
    if scheme in ("iid", "dirichlet", "shards"):
        return scheme, None
    raise DataError(f"unknown partition {scheme!r}; choose one of iid, dirichlet, non-iid-K (e.g. non-iid-2), shards")


def partition(
    labels: np.ndarray, n: int, scheme: str, rng: np.random.Generator, *, alpha: float = 0.5
) -> list[np.ndarray]:
    """Dispatch on a scheme name as `prepare-data -p` spells it (iid, dirichlet, non-iid-K, shards)."""
    kind, k = parse_scheme(scheme)
    if kind == "iid":
        return iid(labels, n, rng)
    if kind == "dirichlet":
        return dirichlet(labels, n, rng, alpha)
    if kind == "shards":
        return shards(labels, n, rng)
    assert k is not None
    return label_skew(labels, n, k, rng)
