"""Which strategy reaches a target accuracy in fewer rounds on non-IID data: FedAvg, FedProx, FedOpt, SCAFFOLD.

    python bench/strategies.py [--rounds 20] [--sites 4] [--alpha 0.1] [--target 0.75] [--only fedavg,scaffold]
    python bench/strategies.py --he_scaffold        # SCAFFOLD plain and encrypted, same split and seed

Provisions a throw-away project on loopback, starts a real federation (server and --sites site daemons over
mutual TLS, from the kits' start.sh), splits Fashion-MNIST across the sites by Dirichlet(--alpha) label skew
(`fedgrid data prepare -p dirichlet`, seed 42, in data/ of the current folder), and runs one job per
strategy one after the other on that same split, with the same initial model (the MLP 784-512-512-10, torch
seed 42), the same local training (--epochs of SGD, --lr, --momentum, --batch_size, seed 42) and the same
number of rounds. FedProx and SCAFFOLD use their example scripts (jobs/fedprox_fashion_mnist/train.py,
jobs/scaffold_fashion_mnist/train.py), the others the packaged FedAvg script; only the strategy differs.

Printed: one line per strategy as it runs, then a table: the strategy and its parameters, the accuracy of
the global model after each round (the sites' validation sets, sample-weighted), the best accuracy, the
first round whose accuracy reaches --target ("-" if none does), and the mean seconds per round (rounds
2..N; round 1 carries warm-up). Lower "rounds to target" is better. Non-IID runs are noisy from round to
round: read the best and the rounds to target together with the curve.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SEED = 42


@dataclass(frozen=True)
class Entry:
    label: str
    recipe: str
    """fedavg, fedprox, fedopt or scaffold: the recipe and training script."""
    params: dict[str, Any]
    encrypted: bool = False


ENTRIES = [
    Entry("fedavg", "fedavg", {}),
    Entry("fedprox mu=0.01", "fedprox", {"mu": 0.01}),
    Entry("fedprox mu=0.1", "fedprox", {"mu": 0.1}),
    Entry("fedavgm lr=1 m=0.9", "fedopt", {"optimizer": "avgm", "server_lr": 1.0, "momentum": 0.9}),
    Entry("fedadam lr=0.01", "fedopt", {"optimizer": "adam", "server_lr": 0.01}),
    Entry("fedyogi lr=0.01", "fedopt", {"optimizer": "yogi", "server_lr": 0.01}),
    Entry("fedadagrad lr=0.01", "fedopt", {"optimizer": "adagrad", "server_lr": 0.01}),
    Entry("scaffold", "scaffold", {}),
]
HE_ENTRIES = [Entry("scaffold", "scaffold", {}), Entry("scaffold + HE", "scaffold", {}, encrypted=True)]


@dataclass
class Outcome:
    entry: Entry
    status: str
    accuracy: list[float]
    seconds: list[float]


def recipe_for(entry: Entry, args: argparse.Namespace, data_root: Path) -> Any:
    from fedgrid.examples import FASHION_MNIST_TRAIN
    from fedgrid.jobcli import fashion_mnist_recipe
    from fedgrid.recipe import FedAvgRecipe, FedOptRecipe, FedProxRecipe, ScaffoldRecipe

    classes = {"fedavg": FedAvgRecipe, "fedprox": FedProxRecipe, "fedopt": FedOptRecipe, "scaffold": ScaffoldRecipe}
    scripts = {
        "fedprox": ROOT / "jobs" / "fedprox_fashion_mnist" / "train.py",
        "scaffold": ROOT / "jobs" / "scaffold_fashion_mnist" / "train.py",
    }
    job_args = argparse.Namespace(**{**vars(args), "data_root": data_root, "n_clients": args.sites, "seed": SEED})
    job_args.num_rounds, job_args.round_timeout = args.rounds, 0.0
    name = "bench_" + entry.label.split()[0].replace("+", "") + ("_he" if entry.encrypted else "")
    return fashion_mnist_recipe(
        name,
        job_args,
        classes[entry.recipe],
        scripts.get(entry.recipe, FASHION_MNIST_TRAIN),
        encryption=entry.encrypted,
        **entry.params,
    )


def run_entry(session: Any, entry: Entry, args: argparse.Namespace, data_root: Path, tmp: Path) -> Outcome:
    import torch

    from fedgrid.serde import RoundInfo

    torch.manual_seed(SEED)  # the same initial model for every strategy
    recipe = recipe_for(entry, args, data_root)
    job_id = session.submit_job(recipe.export(tmp / recipe.name))
    accuracy, seconds, status = [], [], ""
    for event in session.watch_job(job_id):
        if isinstance(event, RoundInfo):
            accuracy.append(event.metrics.get("accuracy", float("nan")))
            seconds.append(event.seconds)
            print(
                f"  {entry.label:<22} round {event.round:>2}  accuracy {accuracy[-1]:.4f}  {event.seconds:6.2f} s",
                flush=True,
            )
        else:
            status = f"{event.status}{': ' + event.error if event.error else ''}"
    return Outcome(entry, status, accuracy, seconds)


def rounds_to(target: float, accuracy: list[float]) -> str:
    for round_no, value in enumerate(accuracy, start=1):
        if value >= target:
            return str(round_no)
    return "-"


def table(outcomes: list[Outcome], target: float) -> str:
    width = max(len(o.entry.label) for o in outcomes)
    lines = [
        f"{'strategy':<{width}}  {'best':>6}  {'to ' + format(target, '.2f'):>7}  {'s/round':>7}  accuracy per round",
    ]
    for o in outcomes:
        per_round = statistics.mean(o.seconds[1:] or o.seconds or [float("nan")])
        curve = " ".join(f"{a:.3f}" for a in o.accuracy)
        best = max(o.accuracy, default=float("nan"))
        lines.append(
            f"{o.entry.label:<{width}}  {best:6.4f}  {rounds_to(target, o.accuracy):>7}  {per_round:7.2f}  {curve}"
        )
        if not o.status.startswith("FINISHED:COMPLETED"):
            lines.append(f"{'':<{width}}  ({o.status})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet label skew (default 0.1)")
    parser.add_argument("--target", type=float, default=0.75, help="accuracy whose first round is reported")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_samples", type=int, default=0, help="samples per site (0: all of its share)")
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--only", default="", help="comma-separated labels' first words, e.g. fedavg,scaffold")
    parser.add_argument("--he_scaffold", action="store_true", help="SCAFFOLD plaintext and encrypted instead")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import provision_project
    from federation import running

    from fedgrid.jobcli import ensure_data

    data_root = ensure_data(argparse.Namespace(alpha=args.alpha, n_clients=args.sites, data_root=None, seed=SEED))
    entries = HE_ENTRIES if args.he_scaffold else ENTRIES
    if args.only:
        wanted = set(args.only.split(","))
        entries = [e for e in entries if e.label.split()[0] in wanted]
    print(
        f"{len(entries)} strategies, {args.sites} sites, Dirichlet({args.alpha}) split in {data_root}, "
        f"{args.rounds} rounds of {args.epochs} epoch(s) SGD lr {args.lr} momentum {args.momentum}, {args.model}",
        flush=True,
    )
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="fedgrid-strategies-") as folder:
        tmp = Path(folder)
        project = provision_project(tmp / "project", n_sites=args.sites, he=args.he_scaffold)
        started = time.monotonic()
        with running(project) as federation, federation.session() as session:
            for entry in entries:
                outcomes.append(run_entry(session, entry, args, data_root, tmp))
    print(f"\n{len(entries)} jobs in {time.monotonic() - started:.0f} s\n")
    print(table(outcomes, args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
