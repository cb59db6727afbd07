"""Data for fedgrid's examples and training scripts: read raw data sets, split them per site, load a site.

    load_dataset(name, source)  whole data set (Fashion-MNIST, MNIST IDX, CIFAR-10 batches), for a
                                centralized baseline or for partitioning
    partition / iid / dirichlet / label_skew / shards
                                pure splitting functions (fedgrid.data.partition)
    prepare(...)                what the `prepare-data` command does: one folder per site
    load_site(folder)           a site's train.npz and val.npz, checked (what a training script calls)

Nothing here downloads and nothing unpickles untrusted code: IDX files are parsed by hand, CIFAR-10
batches go through a restricted unpickler, and npz files are read with allow_pickle=False.
"""

from fedgrid.data.datasets import DATASETS, load_dataset
from fedgrid.data.errors import DataError
from fedgrid.data.partition import dirichlet, iid, label_skew, partition, shards
from fedgrid.data.prepare import prepare
from fedgrid.data.site import SiteData, load_site

__all__ = [
    "DATASETS",
    "DataError",
    "SiteData",
    "dirichlet",
    "iid",
    "label_skew",
    "load_dataset",
    "load_site",
    "partition",
    "prepare",
    "shards",
]
