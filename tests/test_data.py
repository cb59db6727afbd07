"""Data preparation: partitions, IDX reader, restricted CIFAR-10 unpickler, prepare-data, load_site."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedgrid.data import DataError, load_dataset, load_site, prepare
from fedgrid.data.cifar import load_batch, load_cifar10
from fedgrid.data.idx import load_idx_split, read_idx, write_idx
from fedgrid.data.partition import dirichlet, iid, label_skew, partition, shards

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


def balanced_labels(per_class: int = 100, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), per_class)).astype(np.uint8)


def rng(seed: int = 42) -> np.random.Generator:
    return np.random.default_rng(seed)


def assert_disjoint(parts: list[np.ndarray]) -> np.ndarray:
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "a sample was given to two sites"
    return joined


def mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    entropies = []
    for p in parts:
        counts = np.bincount(labels[p], minlength=10).astype(float)
        q = counts[counts > 0] / counts.sum()
        entropies.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(entropies))


# --- partitions -------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "non-iid-2", "shards"])
def test_partition_is_deterministic_for_a_seed_and_disjoint(scheme: str) -> None:
    labels = balanced_labels()
    first = partition(labels, 4, scheme, rng(7))
    again = partition(labels, 4, scheme, rng(7))
    other = partition(labels, 4, scheme, rng(8))
    assert len(first) == 4
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert_disjoint(first)
    assert all(p.dtype == np.int64 and len(p) > 0 for p in first)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partition_uses_every_sample(scheme: str) -> None:
    labels = balanced_labels(per_class=97)
    joined = assert_disjoint(partition(labels, 6, scheme, rng()))
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(p) for p in iid(balanced_labels(per_class=101), 7, rng())]
    assert sum(sizes) == 1010 and max(sizes) - min(sizes) <= 1


def test_non_iid_2_gives_exactly_two_labels_per_site_and_uses_all() -> None:
    labels = balanced_labels()
    parts = label_skew(labels, 5, 2, rng())
    assert [len(np.unique(labels[p])) for p in parts] == [2] * 5
    assert set(np.unique(labels[np.concatenate(parts)])) == set(range(10))
    assert_disjoint(parts)


def test_non_iid_k_uses_all_labels_whenever_n_times_k_reaches_ten() -> None:
    labels = balanced_labels(per_class=60)
    for n, k in [(4, 3), (3, 4), (7, 2), (10, 1), (2, 5)]:
        parts = label_skew(labels, n, k, rng(n * k))
        assert [len(np.unique(labels[p])) for p in parts] == [k] * n
        assert set(labels[np.concatenate(parts)]) == set(range(10)), (n, k)


def test_shards_gives_each_site_two_shards() -> None:
    # 10 classes x 30 samples and 5 sites: 10 shards of exactly one class each, so each site
    # must hold exactly two whole classes.
    labels = balanced_labels(per_class=30)
    parts = shards(labels, 5, rng())
    for p in parts:
        classes, counts = np.unique(labels[p], return_counts=True)
        assert len(classes) == 2 and counts.tolist() == [30, 30]
    assert_disjoint(parts)


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha() -> None:
    labels = balanced_labels(per_class=500)
    skewed = mean_label_entropy(labels, dirichlet(labels, 5, rng(), alpha=0.1))
    even = mean_label_entropy(labels, dirichlet(labels, 5, rng(), alpha=100.0))
    assert skewed < even - 0.5
    assert even > 0.95 * np.log(10)


def test_dirichlet_redraws_until_every_site_has_the_minimum() -> None:
    labels = balanced_labels(per_class=20)
    parts = dirichlet(labels, 8, rng(), alpha=0.3, min_samples=10)
    assert min(len(p) for p in parts) >= 10
    with pytest.raises(DataError, match="fewer than 15 samples"):
        dirichlet(labels, 12, rng(), alpha=0.01, min_samples=15, max_attempts=5)


@pytest.mark.parametrize(
    ("n", "scheme", "alpha", "message"),
    [
        (0, "iid", 0.5, "at least 1"),
        (-3, "shards", 0.5, "at least 1"),
        (1001, "iid", 0.5, "from 1000 samples"),
        (501, "shards", 0.5, "from 1000 samples"),
        (4, "non-iid-0", 0.5, "K must be between 1 and 10"),
        (4, "non-iid-11", 0.5, "K must be between 1 and 10"),
        (4, "dirichlet", 0.0, "alpha must be > 0"),
        (4, "dirichlet", -1.0, "alpha must be > 0"),
        (4, "random", 0.5, "unknown partition 'random'"),
    ],
)
def test_impossible_requests_are_rejected(n: int, scheme: str, alpha: float, message: str) -> None:
    with pytest.raises(DataError, match=message):
        partition(balanced_labels(), n, scheme, rng(), alpha=alpha)


# --- IDX ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path: Path, name: str) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    write_idx(tmp_path / name, images)
    back = read_idx(tmp_path / name)
    assert back.dtype == np.uint8 and np.array_equal(back, images)
    floats = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    write_idx(tmp_path / "f.idx", floats)
    assert np.array_equal(read_idx(tmp_path / "f.idx"), floats)


def test_idx_header_is_big_endian(tmp_path: Path) -> None:
    write_idx(tmp_path / "labels", np.array([3, 1, 4], dtype=np.uint8))
    assert (tmp_path / "labels").read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 3, 1, 4])


def test_truncated_idx_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((4, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated"):
        read_idx(path)


def test_truncated_gzip_idx_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    write_idx(path, np.random.default_rng(1).integers(0, 256, (50, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz"):
        read_idx(path)


def test_wrong_magic_trailing_bytes_and_bad_dtype_are_refused(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"\x1f\x8b\x08\x03" + bytes(8))
    with pytest.raises(DataError, match=r"wrong: not an IDX file .*gzip-compressed"):
        read_idx(wrong)
    code = tmp_path / "code"
    code.write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 0]))
    with pytest.raises(DataError, match=r"code: unknown IDX dtype code 0x07"):
        read_idx(code)
    longer = tmp_path / "longer"
    write_idx(longer, np.zeros(3, dtype=np.uint8))
    longer.write_bytes(longer.read_bytes() + b"\x00")
    with pytest.raises(DataError, match=r"longer: longer than its header says"):
        read_idx(longer)


def test_label_count_must_match_image_count(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: 4 labels for 5 images"):
        load_idx_split(tmp_path, "train")


def write_fake_mnist(folder: Path, n_train: int = 400, n_test: int = 100) -> None:
    """An MNIST-format source in `folder`: random images, balanced labels, gz and plain files mixed."""
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(3)
    write_idx(folder / "train-images-idx3-ubyte.gz", g.integers(0, 256, (n_train, 28, 28), dtype=np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte.gz", balanced_labels(n_train // 10))
    write_idx(folder / "t10k-images-idx3-ubyte", g.integers(0, 256, (n_test, 28, 28), dtype=np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte", balanced_labels(n_test // 10, seed=1))


def test_mnist_from_a_source_folder(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "src")
    x_train, y_train, x_test, y_test = load_dataset("mnist", tmp_path / "src")
    assert x_train.shape == (400, 28, 28) and x_test.shape == (100, 28, 28)
    assert y_train.dtype == np.uint8 and np.bincount(y_train).tolist() == [40] * 10


def test_missing_source_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path / "absent")
    with pytest.raises(DataError, match="--source"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", tmp_path)


# --- CIFAR-10 restricted unpickler ----------------------------------------------------------------


def fake_batch(n: int = 6, seed: int = 0) -> tuple[dict, np.ndarray, list[int]]:
    g = np.random.default_rng(seed)
    data = g.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in g.integers(0, 10, size=n)]
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    return batch, data, labels


def test_good_batch_loads_with_hwc_layout(tmp_path: Path) -> None:
    batch, data, labels = fake_batch()
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    x, y = load_batch(path)
    assert x.shape == (6, 32, 32, 3) and x.dtype == np.uint8
    assert y.tolist() == labels and y.dtype == np.uint8
    # Row layout is 1024 red, 1024 green, 1024 blue, each row-major 32x32.
    i, h, w, c = 4, 7, 30, 2
    assert x[i, h, w, c] == data[i, c * 1024 + h * 32 + w]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_batches_written_by_numpy_2_load(tmp_path: Path, protocol: int) -> None:
    batch, data, _ = fake_batch(n=3)
    batch[b"labels"] = np.array(batch[b"labels"], dtype=np.int64)  # an array instead of a list
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    x, y = load_batch(path)
    assert np.array_equal(x.transpose(0, 3, 1, 2).reshape(3, -1), data)
    assert y.tolist() == batch[b"labels"].tolist()


def test_batch_with_the_numpy_1_names_of_the_official_files_loads(tmp_path: Path) -> None:
    batch, data, _ = fake_batch(n=2)
    raw = pickle.dumps(batch, protocol=2)
    assert b"numpy._core.multiarray\n_reconstruct" in raw
    path = tmp_path / "data_batch_2"
    path.write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    x, _ = load_batch(path)
    assert np.array_equal(x.transpose(0, 3, 1, 2).reshape(2, -1), data)


class _RunsCommand:
    """Unpickling an instance would run a shell command (a classic malicious pickle)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


class _CallsEval:
    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self) -> tuple:
        return (eval, (self.source,))


def test_malicious_pickles_are_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    batch, _, _ = fake_batch()
    attacks = {
        "top_level": _RunsCommand(f"touch {marker}"),
        "inside_dict": {**batch, b"labels": _RunsCommand(f"touch {marker}")},
        "eval": {**batch, b"data": _CallsEval(f"open({str(marker)!r}, 'w')")},
    }
    for name, payload in attacks.items():
        path = tmp_path / name
        raw = pickle.dumps(payload, protocol=2)
        assert b"system" in raw or b"eval" in raw  # the attack is really in the file
        path.write_bytes(raw)
        refusal = rf"{name}: refused.*refused global (posix|__builtin__)\.(system|eval)"
        with pytest.raises(DataError, match=refusal):
            load_batch(path)
    assert not marker.exists()


def test_codecs_other_than_latin1_are_refused(tmp_path: Path) -> None:
    # What protocol 2 writes for bytes is _codecs.encode(text, "latin1"); a zlib codec would be a bomb.
    path = tmp_path / "zlib"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x0a\x00\x00\x00zlib_codec\x86R.")
    with pytest.raises(DataError, match="encoding 'zlib_codec' is not allowed"):
        load_batch(path)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b.pop(b"data"), "'data' must be a uint8 array"),
        (lambda b: b.update({b"data": b[b"data"].astype(np.float32)}), "'data' must be a uint8 array"),
        (lambda b: b.update({b"data": b[b"data"][:, :100]}), r"shape \(N, 3072\)"),
        (lambda b: b.update({b"labels": b[b"labels"][:-1]}), "5 labels for 6 images"),
        (lambda b: b.update({b"labels": [12] * 6}), "outside 0..9"),
        (lambda b: b.update({b"labels": ["a"] * 6}), "must hold integers"),
    ],
)
def test_batches_with_wrong_content_are_refused(tmp_path: Path, mutate, message: str) -> None:
    batch, _, _ = fake_batch()
    mutate(batch)
    path = tmp_path / "data_batch_3"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=message):
        load_batch(path)


def test_non_batches_are_refused(tmp_path: Path) -> None:
    (tmp_path / "list").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match="list: expected a dict"):
        load_batch(tmp_path / "list")
    (tmp_path / "garbage").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="garbage: not a readable CIFAR-10 batch"):
        load_batch(tmp_path / "garbage")


def write_fake_cifar(folder: Path, per_batch: int = 20) -> None:
    folder.mkdir(parents=True)
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        batch, _, _ = fake_batch(per_batch, seed=i)
        batch[b"labels"] = [j % 10 for j in range(per_batch)]
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_prepare_cifar10_writes_hwc_site_data(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path / "src" / "cifar-10-batches-py")
    x_train, y_train, x_test, _ = load_cifar10(tmp_path / "src")
    assert x_train.shape == (100, 32, 32, 3) and x_test.shape == (20, 32, 32, 3)
    prepare("cifar10", 2, "iid", source=tmp_path / "src", out=tmp_path / "out")
    site = load_site(tmp_path / "out" / "site-2")
    assert site.x_train.shape == (50, 32, 32, 3) and site.x_val.shape == (10, 32, 32, 3)


# --- prepare / load_site -----------------------------------------------------------------------------


def test_prepare_is_deterministic_and_validation_shares_cover_the_test_set(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "src")
    x_train, y_train, x_test, y_test = load_dataset("mnist", tmp_path / "src")
    first = prepare("mnist", 3, "non-iid-2", seed=5, source=tmp_path / "src", out=tmp_path / "a")
    second = prepare("mnist", 3, "non-iid-2", seed=5, source=tmp_path / "src", out=tmp_path / "b")
    assert first == second
    sites = [load_site(tmp_path / "a" / f"site-{i}") for i in (1, 2, 3)]
    assert all(len(np.unique(s.y_train)) == 2 for s in sites)
    assert np.array_equal(load_site(tmp_path / "b" / "site-2").x_train, sites[1].x_train)

    # Any classifier: the sample-weighted mean of the per-site validation accuracies is its accuracy
    # on the whole test set, because the validation shares partition the test set.
    def predict(x: np.ndarray) -> np.ndarray:
        return (x.reshape(len(x), -1).sum(axis=1) % 10).astype(np.uint8)

    whole = float((predict(x_test) == y_test).mean())
    weighted = sum(float((predict(s.x_val) == s.y_val).sum()) for s in sites) / sum(s.num_val for s in sites)
    assert weighted == pytest.approx(whole, abs=1e-12)
    assert sum(s.num_val for s in sites) == len(y_test)
    assert sum(s.num_train for s in sites) <= len(y_train)


def test_prepare_replaces_its_own_output_only_on_success(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "src")
    out = tmp_path / "out"
    prepare("mnist", 2, "iid", source=tmp_path / "src", out=out, sites=["north", "south"])
    with pytest.raises(DataError):
        prepare("mnist", 500, "iid", source=tmp_path / "src", out=out)  # too many sites: fails late
    assert sorted(p.name for p in out.iterdir()) == ["north", "south", "summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"], "a temporary folder was left behind"
    prepare("mnist", 3, "shards", source=tmp_path / "src", out=out)
    assert sorted(p.name for p in out.iterdir()) == ["site-1", "site-2", "site-3", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["partition"] == "shards"


def test_prepare_refuses_to_replace_a_folder_it_did_not_write(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "src")
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match="not a previous prepare-data output"):
        prepare("mnist", 2, "iid", source=tmp_path / "src", out=precious)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_prepare_rejects_bad_site_names(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "src")
    for names, message in [(["a"], "lists 1 name"), (["a", "a"], "distinct"), (["a", "../b"], "'../b'")]:
        with pytest.raises(DataError, match=message):
            prepare("mnist", 2, "iid", source=tmp_path / "src", out=tmp_path / "o", sites=names)


def test_load_site_refuses_bad_files(tmp_path: Path) -> None:
    site = tmp_path / "site-1"
    site.mkdir()
    with pytest.raises(DataError, match=r"train\.npz: not found"):
        load_site(site)
    np.savez(site / "train.npz", x=np.zeros((3, 28, 28), np.uint8), y=np.zeros(3, np.uint8))
    np.savez(site / "val.npz", x=np.zeros((2, 28, 28), np.float32), y=np.zeros(2, np.uint8))
    with pytest.raises(DataError, match=r"val\.npz: 'x' must be uint8"):
        load_site(site)
    np.savez(site / "val.npz", x=np.array([{"a": 1}, None], dtype=object), y=np.zeros(2, np.uint8))
    with pytest.raises(DataError, match=r"val\.npz: not a readable npz"):
        load_site(site)
    np.save(site / "val.npz", np.zeros(3, np.uint8))
    (site / "val.npz.npy").rename(site / "val.npz")
    with pytest.raises(DataError, match=r"val\.npz: expected an \.npz archive"):
        load_site(site)
    np.savez(site / "val.npz", x=np.zeros((2, 28, 28), np.uint8), y=np.zeros(3, np.uint8))
    with pytest.raises(DataError, match=r"val\.npz: 3 labels for 2 images"):
        load_site(site)
    np.savez(site / "val.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.zeros(2, np.uint8))
    with pytest.raises(DataError, match="differ"):
        load_site(site)
    np.savez(site / "val.npz", x=np.zeros((2, 28, 28), np.uint8), y=np.zeros(2, np.uint8))
    loaded = load_site(site)
    assert (loaded.name, loaded.num_train, loaded.num_val) == ("site-1", 3, 2)


# --- real Fashion-MNIST --------------------------------------------------------------------------------


@needs_fashion
def test_real_fashion_mnist_loads() -> None:
    x_train, y_train, x_test, y_test = load_dataset("fashion-mnist")
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.uint8
    assert np.bincount(y_train).tolist() == [6000] * 10 and np.bincount(y_test).tolist() == [1000] * 10


def run_prepare_data(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedgrid.data", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@needs_fashion
def test_prepare_data_command_on_real_fashion_mnist(tmp_path: Path) -> None:
    result = run_prepare_data("-n", "4", "-p", "iid", "--out", "tmp", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "tmp"
    sites = [load_site(out / f"site-{i}") for i in range(1, 5)]
    assert sum(s.num_train for s in sites) == 60000 and sum(s.num_val for s in sites) == 10000
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["dataset"], summary["partition"], summary["seed"]) == ("fashion-mnist", "iid", 42)
    assert [s["train_samples"] for s in summary["sites"]] == [15000] * 4
    assert sum(sum(s["val_label_histogram"]) for s in summary["sites"]) == 10000
    assert "site-4" in result.stdout and "15000" in result.stdout and "test set" in result.stdout


@needs_fashion
def test_prepare_data_default_out_is_data_slash_dataset(tmp_path: Path) -> None:
    result = run_prepare_data("-n", "2", "-p", "non-iid-5", "--seed", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "fashion-mnist" / "site-2" / "val.npz").is_file()


def test_prepare_data_command_rejects_bad_input_with_exit_2(tmp_path: Path) -> None:
    bad_p = run_prepare_data("-n", "4", "-p", "bogus", cwd=tmp_path)
    assert bad_p.returncode == 2
    assert "unknown partition 'bogus'" in bad_p.stderr.splitlines()[-1]
    missing = run_prepare_data("-n", "4", "--source", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "apt-get install dataset-fashion-mnist" in missing.stderr
    assert not (tmp_path / "data").exists()


def test_prepare_data_help_explains_the_schemes(tmp_path: Path) -> None:
    result = run_prepare_data("--help", cwd=tmp_path)
    assert result.returncode == 0
    for word in ("iid", "dirichlet", "non-iid-K", "shards", "--alpha", "--sites", "TEST set"):
        assert word in result.stdout


def test_gzip_bomb_header_is_refused(tmp_path: Path) -> None:
    # A header announcing 2**32 bytes of images: refused before reading, not allocated.
    path = tmp_path / "bomb.gz"
    with gzip.open(path, "wb") as out:
        out.write(bytes([0, 0, 8, 3]) + (65536).to_bytes(4, "big") * 2 + (1).to_bytes(4, "big"))
    with pytest.raises(DataError, match="more than this reader accepts"):
        read_idx(path)
