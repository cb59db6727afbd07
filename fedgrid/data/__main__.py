"""`prepare-data`: split a data set on disk into one folder per site.

Exit codes: 0 done; 2 bad option, missing or malformed source data, impossible split, or an output
folder that must not be replaced; 1 the output could not be written (disk, permissions).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from fedgrid.data.datasets import DATASETS
from fedgrid.data.errors import DataError
from fedgrid.data.partition import parse_scheme
from fedgrid.data.prepare import NUM_CLASSES, prepare

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

SCHEME_HELP = """\
partition schemes (-p):
  iid          shuffle the training set and cut it into n equal parts
  dirichlet    for each class, split its samples over the sites in proportions drawn from
               Dirichlet(alpha); small alpha (0.1) = each site dominated by few classes,
               large alpha (100) = close to iid. Redrawn until every site has >= 10 samples.
  non-iid-K    every site holds exactly K classes (1..10), e.g. non-iid-2; all classes are used
               when n*K >= 10; a class's samples are split evenly among the sites holding it
  shards       McMahan et al. 2017: sort by label, cut into 2n shards, 2 random shards per site

validation data:
  each site's val.npz is an IID 1/n share of the TEST set, independent of the training split, so
  the sample-weighted mean of the sites' validation accuracies equals the whole test-set accuracy.

output (--out, default data/<dataset>):
  <out>/<site>/train.npz, <out>/<site>/val.npz  arrays x (uint8 images) and y (uint8 labels)
  <out>/summary.json                            options and per-site sample counts and label histograms
  written to a temporary folder first; the previous output is replaced only on success.

exit codes: 0 done, 2 bad option or input data, 1 output could not be written
"""


def _scheme(value: str) -> str:
    try:
        parse_scheme(value)
    except DataError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _sites(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare-data",
        description="Split a data set on disk into one data folder per site (nothing is downloaded).",
        epilog=SCHEME_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dataset",
        default="fashion-mnist",
        choices=sorted(DATASETS),
        help="fashion-mnist (default; from the Debian package dataset-fashion-mnist), "
        "mnist (IDX files from --source) or cifar10 (python batches from --source)",
    )
    parser.add_argument("-n", "--num-sites", type=int, required=True, help="number of sites to split for")
    parser.add_argument(
        "-p",
        "--partition",
        type=_scheme,
        default="iid",
        help="iid (default), dirichlet, non-iid-K (K classes per site, e.g. non-iid-2) or shards; see below",
    )
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet concentration for -p dirichlet (default 0.5)"
    )
    parser.add_argument(
        "--seed", type=int, default=42, help="random seed; the same seed gives the same split (default 42)"
    )
    parser.add_argument(
        "--source",
        default=None,
        help="folder with the raw data set (default for fashion-mnist: /usr/share/datasets/fashion-mnist)",
    )
    parser.add_argument("--out", default=None, help="output folder (default data/<dataset> in the current folder)")
    parser.add_argument(
        "--sites",
        type=_sites,
        default=None,
        help="comma-separated site folder names, as many as -n (default site-1,...,site-n)",
    )
    return parser


def format_table(summary: dict[str, Any]) -> str:
    """One row per site: its name, train and val sample counts, and its training label histogram."""
    sites = summary["sites"]
    name_width = max(4, *(len(s["name"]) for s in sites))
    header = f"{'site':<{name_width}}  {'train':>6}  {'val':>6}   " + " ".join(f"{c:>5}" for c in range(NUM_CLASSES))
    lines = [header + "   (train samples per label)", "-" * len(header)]
    for s in sites:
        hist = " ".join(f"{v:>5}" for v in s["train_label_histogram"])
        lines.append(f"{s['name']:<{name_width}}  {s['train_samples']:>6}  {s['val_samples']:>6}   {hist}")
    totals = [sum(s["train_label_histogram"][c] for s in sites) for c in range(NUM_CLASSES)]
    lines.append("-" * len(header))
    lines.append(
        f"{'all':<{name_width}}  {summary['train_samples']:>6}  {summary['val_samples']:>6}   "
        + " ".join(f"{v:>5}" for v in totals)
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = prepare(
            args.dataset,
            args.num_sites,
            args.partition,
            alpha=args.alpha,
            seed=args.seed,
            source=args.source,
            out=args.out,
            sites=args.sites,
        )
    except DataError as exc:
        print(f"prepare-data: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"prepare-data: error: could not write the output: {exc}", file=sys.stderr)
        return EXIT_FAILED
    out = args.out if args.out is not None else f"data/{args.dataset}"
    alpha = f", alpha {summary['alpha']}" if summary["alpha"] is not None else ""
    print(
        f"{summary['dataset']}: {summary['num_sites']} sites, "
        f"partition {summary['partition']}{alpha}, seed {summary['seed']}"
    )
    print(format_table(summary))
    print("validation: each site's val.npz is an IID share of the test set; the sample-weighted mean of the")
    print("            sites' validation accuracies equals the accuracy on the whole test set.")
    print(f"written to {out}/ (one folder per site, summary.json)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
