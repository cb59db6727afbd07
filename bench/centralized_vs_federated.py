"""Federated vs centralized training of the same MLP on Fashion-MNIST: accuracy and wall-clock, side by side.

    python bench/centralized_vs_federated.py [--rounds 5] [--sites 4]

Both start from the same initial weights of the MLP 784-512-512-10 (seed 42) and use the same
optimizer (SGD, lr 0.01, momentum 0.9, batch 32) and the same input normalization.

- Federated: a real federation on loopback (provisioned kits, server and site daemons started with
  start.sh, mutual TLS) runs the example training script `fedgrid/examples/fashion_mnist_train.py`, built with the
  recipe API as `jobs/fedavg_fashion_mnist/job.py` builds it: --sites sites with an IID split of the
  60,000 training images (prepared with `prepare-data`, seed 42), --rounds FedAvg rounds of one local
  epoch each. After each round the sites evaluate the new global model on their shares of the test
  set; the shares are disjoint and cover it, so the sample-weighted mean is the test-set accuracy.
  The final model is downloaded and scored again here on the whole test set.
- Centralized: the same model trained in this process on all 60,000 images for --rounds epochs (the
  same total number of passes over the data), scored on the test set after each epoch.

Wall-clock: the federated column counts from submit to FINISHED (the start-up of the federation is
printed apart); the centralized one counts the training and evaluation loop. Torch threads: each
federated worker gets cores / sites threads (the site daemons size it), the centralized run uses
every core. The machine load is printed before and after (load averages lag, and include this
benchmark's own processes: compare runs, and re-run when other work was on the machine).
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LR, MOMENTUM, BATCH, SEED = 0.01, 0.9, 32, 42


@dataclass
class Curve:
    """Test accuracy and loss after each round (federated) or epoch (centralized), and the timings."""

    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    """Wall-clock seconds of each round / epoch."""
    total: float = 0.0
    final_accuracy: float = 0.0
    final_loss: float = 0.0
    notes: list[str] = field(default_factory=list)


def initial_model() -> object:
    import torch

    from fedgrid.models import build_model

    torch.manual_seed(SEED)
    return build_model("mlp")


def test_loader() -> object:
    from fedgrid.data import load_dataset
    from fedgrid.training import make_loader

    _, _, x_test, y_test = load_dataset("fashion-mnist")
    return make_loader(x_test, y_test, 1000, shuffle=False)


def federated(args: argparse.Namespace, model: object, tmp: Path) -> Curve:
    """Run the example job on a real federation; the curve comes from the server's per-round metrics."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import provision_project
    from federation import Federation

    from fedgrid import tensors
    from fedgrid.examples import FASHION_MNIST_TRAIN
    from fedgrid.jobcli import ensure_data
    from fedgrid.recipe import FedAvgRecipe
    from fedgrid.serde import JobInfo, RoundInfo
    from fedgrid.training import evaluate

    data_root = ensure_data(argparse.Namespace(alpha=0.0, n_clients=args.sites, data_root=None, seed=SEED))
    recipe = FedAvgRecipe(
        name="centralized_vs_federated",
        model=model,
        train_script=FASHION_MNIST_TRAIN,
        train_args=[
            "--data_root",
            str(data_root),
            "--model",
            "mlp",
            "--epochs",
            "1",
            "--lr",
            str(LR),
            "--momentum",
            str(MOMENTUM),
            "--batch_size",
            str(BATCH),
            "--seed",
            str(SEED),
        ],
        num_rounds=args.rounds,
        min_clients=args.sites,
        seed=SEED,
    )
    folder = recipe.export(tmp / "job")
    project = provision_project(tmp / "project", n_sites=args.sites)
    fed = Federation(project)
    curve = Curve()
    try:
        started = time.perf_counter()
        fed.start_all()
        curve.notes.append(f"federation start-up (start_all) {time.perf_counter() - started:.1f} s")
        with fed.session() as session:
            submitted = time.perf_counter()
            job_id = session.submit_job(folder)
            final: JobInfo | None = None
            for event in session.watch_job(job_id):
                if isinstance(event, RoundInfo):
                    curve.accuracy.append(event.metrics.get("accuracy", float("nan")))
                    curve.loss.append(event.metrics.get("loss", float("nan")))
                    curve.seconds.append(event.seconds)
                    print(
                        f"  federated round {event.round}: test accuracy {curve.accuracy[-1]:.4f} "
                        f"({event.seconds:.1f} s)",
                        flush=True,
                    )
                else:
                    final = event
            curve.total = time.perf_counter() - submitted
            if final is None or final.status != "FINISHED:COMPLETED":
                raise RuntimeError(
                    f"federated job ended {final.status if final else '?'}: {final.error if final else ''}"
                )
            detail = session.show_job(job_id)
            result = session.download_job(job_id, tmp / "download")
        ready = [line for line in log_lines(project.server, job_id) if "workers ready" in line]
        if ready:
            curve.notes.append(ready[0].split(" INFO ", 1)[-1])
        curve.notes.append(f"submit -> first round dispatched {first_round_delay(detail, project.server, job_id)}")
    finally:
        fed.close()
    import torch

    trained = copy.deepcopy(model)
    arrays = tensors.load_file(result / "final_model.safetensors")
    trained.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in arrays.items()})  # type: ignore[attr-defined]
    curve.final_loss, curve.final_accuracy = evaluate(trained, test_loader())  # type: ignore[arg-type]
    return curve


def log_lines(server_kit: Path, job_id: str) -> list[str]:
    path = server_kit / "workspace" / "jobs" / job_id / "log.txt"
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def first_round_delay(detail: object, server_kit: Path, job_id: str) -> str:
    """Seconds from the job's submission to the first "model sent" line, from the server's records."""
    from datetime import datetime

    lines = [line for line in log_lines(server_kit, job_id) if "round 1: model sent" in line]
    if not lines:
        return "n/a"
    sent = datetime.strptime(lines[0][:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return f"{sent - detail.info.submit_time:.1f} s"  # type: ignore[attr-defined]


def centralized(args: argparse.Namespace, model: object) -> Curve:
    """Train the same model on all the training data in this process, one epoch per federated round."""
    import torch

    from fedgrid.data import load_dataset
    from fedgrid.training import evaluate, make_loader, train_epoch

    x_train, y_train, _, _ = load_dataset("fashion-mnist")
    loader = make_loader(x_train, y_train, BATCH, shuffle=True, seed=SEED)
    tests = test_loader()
    net = copy.deepcopy(model)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)  # type: ignore[attr-defined]
    curve = Curve(notes=[f"{len(y_train)} training images, {torch.get_num_threads()} torch threads"])
    started = time.perf_counter()
    for epoch in range(1, args.rounds + 1):
        epoch_start = time.perf_counter()
        train_epoch(net, loader, optimizer)  # type: ignore[arg-type]
        loss, accuracy = evaluate(net, tests)  # type: ignore[arg-type]
        curve.accuracy.append(accuracy)
        curve.loss.append(loss)
        curve.seconds.append(time.perf_counter() - epoch_start)
        print(f"  centralized epoch {epoch}: test accuracy {accuracy:.4f} ({curve.seconds[-1]:.1f} s)", flush=True)
    curve.total = time.perf_counter() - started
    curve.final_loss, curve.final_accuracy = curve.loss[-1], curve.accuracy[-1]
    return curve


def report(args: argparse.Namespace, fed: Curve, cen: Curve) -> None:
    print()
    print(f"Fashion-MNIST, MLP 784-512-512-10, SGD lr {LR} momentum {MOMENTUM} batch {BATCH}, same initial weights")
    print(
        f"federated: {args.sites} sites (IID), {args.rounds} rounds x 1 local epoch; "
        f"centralized: all data, {args.rounds} epochs"
    )
    print()
    print(" round/epoch   federated acc   loss     s   |  centralized acc   loss     s")
    for i in range(args.rounds):
        print(
            f"  {i + 1:>9}   {fed.accuracy[i]:>13.4f} {fed.loss[i]:>6.4f} {fed.seconds[i]:>5.1f}   |"
            f"  {cen.accuracy[i]:>15.4f} {cen.loss[i]:>6.4f} {cen.seconds[i]:>5.1f}"
        )
    print()
    print(
        f"  final test accuracy        federated {fed.final_accuracy:.4f}   centralized {cen.final_accuracy:.4f}   "
        f"gap {100 * (cen.final_accuracy - fed.final_accuracy):+.2f} points"
    )
    print(f"  final test loss            federated {fed.final_loss:.4f}   centralized {cen.final_loss:.4f}")
    print(
        f"  wall-clock                 federated {fed.total:.1f} s (submit -> FINISHED)   "
        f"centralized {cen.total:.1f} s (training + evaluation)   ratio {fed.total / cen.total:.2f}"
    )
    print(f"  federated: {'; '.join(fed.notes)}")
    print(f"  centralized: {'; '.join(cen.notes)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds = centralized epochs (default 5)")
    parser.add_argument("--sites", type=int, default=4, help="federated sites, IID split (default 4)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project and downloaded result")
    args = parser.parse_args()
    one, five, _ = os.getloadavg()
    print(f"machine load before: {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="fedgrid-centralized-vs-federated-"))
    try:
        model = initial_model()
        print("federated:", flush=True)
        fed = federated(args, model, tmp)
        print("centralized:", flush=True)
        cen = centralized(args, model)
        one, five, _ = os.getloadavg()
        print(f"machine load after: {one:.2f} (1 min), {five:.2f} (5 min)")
        report(args, fed, cen)
        if args.keep:
            print(f"kept: {tmp}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
