"""The simulator's figures, measured side by side in one run: its speed against a plain PyTorch loop, its accuracy
against a real federation, its overhead and memory with 100 and 1000 virtual sites.

    python bench/simulation.py [--rounds 4] [--skip_federation] [--skip_thousand]

1. Quickstart workload: 4 sites, the MLP 784-512-512-10, one local epoch (SGD lr 0.01, momentum 0.9, batch
   32), Fashion-MNIST split IID with seed 42, the example training script (fedgrid/examples/):
   - simulated (fedgrid.sim, one worker process per core): seconds per round;
   - the floor: the same steps in one plain PyTorch loop in this process (every core's threads): per round,
     each site scores the global model on its validation share (as the sites do when the evaluation rides
     on the training task) and trains its epoch from it, with its own seeded loader, then the
     sample-weighted mean; the ratio simulated / floor is what the simulator costs (target: <= 1.15);
   - deployed: the same job folder on a real federation (4 site daemons and a server on loopback, mTLS):
     accuracy by round, to be equal to the simulated one (target: within 0.1 points).
   Rounds 2.. are compared (round 1 carries no evaluation); the simulator's and the federation's start-up
   are printed apart.
2. 100 sites, C = 0.1 (10 train each round), the MLP: the simulator's overhead per round, i.e. everything
   but the sites' work: a round's seconds less the busiest worker process's time inside its sites' scripts
   (from a task in hand to its answer sent), median over rounds 2..; target under 50 ms. Memory: the
   largest sum of the resident sizes (VmRSS) of the driver and its worker processes, sampled every 0.2 s
   (shared library pages count once per process: an upper bound); target under 3 GB.
3. 1000 sites with the 26K-parameter MLP (--hidden 32), C = 0.01: it runs, its memory (target under 4 GB),
   and its seconds per round beside 100 sites of the same model with C = 0.1 (10 sites train either way, every
   site evaluates every round: the cost that grows with the number of sites).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LR, MOMENTUM, BATCH, SEED = 0.01, 0.9, 32, 42


@dataclass
class Run:
    seconds: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    overhead: list[float] = field(default_factory=list)
    peak_rss: int = 0
    startup: float = 0.0


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemorySampler:
    """The largest sum of the resident sizes of this process and the simulation's worker processes."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, rss(os.getpid()) + sum(rss(pid) for pid in self.pids))


def recipe(name: str, data: Path, sites: int, rounds: int, fraction: float = 1.0, hidden: int = 0) -> object:
    import torch

    from fedgrid.examples import FASHION_MNIST_TRAIN
    from fedgrid.models import build_model
    from fedgrid.recipe import FedAvgRecipe

    args = ["--data_root", str(data), "--model", "mlp", "--epochs", "1", "--lr", str(LR), "--momentum", str(MOMENTUM)]
    args += ["--batch_size", str(BATCH), "--seed", str(SEED)]
    if hidden:
        args += ["--hidden", str(hidden)]
    torch.manual_seed(SEED)
    return FedAvgRecipe(
        name=name,
        model=build_model("mlp", hidden),
        train_script=FASHION_MNIST_TRAIN,
        train_args=args,
        num_rounds=rounds,
        min_clients=max(1, round(fraction * sites)),
        client_fraction=fraction,
        seed=SEED,
    )


def simulated(job: object, sites: int, results: Path, label: str) -> Run:
    from fedgrid.sim import SimEnv

    run = Run()
    started = time.perf_counter()
    with MemorySampler() as memory:
        sim = job.execute(SimEnv(num_clients=sites, results=results))  # type: ignore[attr-defined]
        simulation = sim.simulation

        def progress(r: object) -> None:
            if not memory.pids:
                memory.pids = list(simulation.stats.host_pids)
            if not run.seconds:
                run.startup = time.perf_counter() - started - r.seconds  # type: ignore[attr-defined]
            run.seconds.append(r.seconds)  # type: ignore[attr-defined]
            run.accuracy.append(r.metrics.get("accuracy", float("nan")))  # type: ignore[attr-defined]
            busy = simulation.stats.busy.get(r.round, {})  # type: ignore[attr-defined]
            run.overhead.append(r.seconds - max(busy.values(), default=0.0))  # type: ignore[attr-defined]
            print(
                f"  {label} round {r.round}: accuracy {run.accuracy[-1]:.4f}, {r.seconds:.3f} s, "  # type: ignore[attr-defined]
                f"overhead {run.overhead[-1] * 1000:.0f} ms",
                flush=True,
            )

        info = sim.wait(progress=progress)
    if info.status != "FINISHED:COMPLETED":
        raise RuntimeError(f"{label}: the simulated job ended {info.status}: {info.error}")
    run.peak_rss = memory.peak
    return run


def floor(data: Path, sites: int, rounds: int) -> Run:
    """The quickstart's steps in one plain PyTorch loop: per round, every site evaluates and trains."""
    import torch

    from fedgrid.data import load_site
    from fedgrid.models import build_model
    from fedgrid.training import evaluate, make_loader, train_epoch

    torch.manual_seed(SEED)
    global_model = build_model("mlp")
    names = [f"site-{i}" for i in range(1, sites + 1)]
    site_data = [load_site(data / name) for name in names]
    train = [make_loader(d.x_train, d.y_train, BATCH, shuffle=True, seed=SEED) for d in site_data]
    val = [make_loader(d.x_val, d.y_val, 1000, shuffle=False) for d in site_data]
    model = copy.deepcopy(global_model)
    weights = {k: v.clone() for k, v in global_model.state_dict().items()}
    run = Run()
    for round_no in range(1, rounds + 1):
        started = time.perf_counter()
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in weights.items()}
        scores = []
        for index, d in enumerate(site_data):
            model.load_state_dict(weights)
            if round_no > 1:
                scores.append((evaluate(model, val[index])[1], d.num_val))
            optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
            train_epoch(model, train[index], optimizer)
            for k, v in model.state_dict().items():
                total[k] += v.double() * d.num_train
        samples = sum(d.num_train for d in site_data)
        weights = {k: (v / samples).to(weights[k].dtype) for k, v in total.items()}
        run.seconds.append(time.perf_counter() - started)
        if scores:
            run.accuracy.append(sum(a * n for a, n in scores) / sum(n for _, n in scores))
        print(f"  floor round {round_no}: {run.seconds[-1]:.3f} s", flush=True)
    return run


def deployed(job: object, sites: int, tmp: Path) -> Run:
    """The same job folder on a real federation on loopback."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import provision_project
    from federation import Federation

    from fedgrid.serde import JobInfo, RoundInfo

    folder = job.export(tmp / "deployed-job")  # type: ignore[attr-defined]
    project = provision_project(tmp / "project", n_sites=sites)
    federation = Federation(project)
    run = Run()
    try:
        started = time.perf_counter()
        federation.start_all()
        run.startup = time.perf_counter() - started
        with federation.session() as session:
            job_id = session.submit_job(folder)
            final = None
            for event in session.watch_job(job_id):
                if isinstance(event, RoundInfo):
                    run.seconds.append(event.seconds)
                    run.accuracy.append(event.metrics.get("accuracy", float("nan")))
                    print(f"  deployed round {event.round}: accuracy {run.accuracy[-1]:.4f}, {event.seconds:.3f} s")
                elif isinstance(event, JobInfo):
                    final = event
        if final is None or final.status != "FINISHED:COMPLETED":
            raise RuntimeError(f"the deployed job ended {final.status if final else '?'}")
    finally:
        federation.close()
    return run


def later(values: list[float]) -> list[float]:
    return values[1:] or values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--skip_federation", action="store_true", help="leave out the deployed run")
    parser.add_argument("--skip_thousand", action="store_true", help="leave out the 1000-site run")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from fedgrid.data import prepare

    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as name:
        tmp = Path(name)
        print("1. quickstart workload: 4 sites, MLP, 1 epoch, Fashion-MNIST IID", flush=True)
        data4 = tmp / "data-4"
        prepare("fashion-mnist", 4, "iid", seed=SEED, out=data4)
        sim = simulated(recipe("quickstart", data4, 4, args.rounds), 4, tmp / "results", "simulated")
        base = floor(data4, 4, args.rounds)
        sim_round, floor_round = statistics.mean(later(sim.seconds)), statistics.mean(later(base.seconds))
        lines.append(
            f"quickstart, seconds per round (rounds 2-{args.rounds}): simulated {sim_round:.2f}, plain PyTorch loop "
            f"{floor_round:.2f}, ratio {sim_round / floor_round:.2f} (target <= 1.15); simulator start-up "
            f"{sim.startup:.1f} s"
        )
        accuracy = ", ".join(f"{a:.4f}" for a in sim.accuracy)
        lines.append(f"quickstart, accuracy by round: simulated {accuracy}")
        lines.append(
            f"quickstart, accuracy by round: plain loop (rounds 1-{args.rounds - 1}) "
            + ", ".join(f"{a:.4f}" for a in base.accuracy)
        )
        if not args.skip_federation:
            real = deployed(recipe("quickstart", data4, 4, args.rounds), 4, tmp)
            gap = max(abs(a - b) for a, b in zip(sim.accuracy, real.accuracy, strict=True))
            per_round = statistics.mean(later(real.seconds))
            lines.append(
                f"quickstart, accuracy by round: deployed {', '.join(f'{a:.4f}' for a in real.accuracy)}; largest "
                f"gap to simulated {gap * 100:.2f} points (target <= 0.1); deployed {per_round:.2f} s per round, "
                f"federation start-up {real.startup:.1f} s"
            )

        print("2. 100 sites, C = 0.1, MLP", flush=True)
        data100 = tmp / "data-100"
        prepare("fashion-mnist", 100, "iid", seed=SEED, out=data100)
        hundred = simulated(recipe("hundred", data100, 100, args.rounds, 0.1), 100, tmp / "results", "100 sites")
        lines.append(
            f"100 sites, C = 0.1, MLP: {statistics.mean(later(hundred.seconds)):.2f} s per round, overhead per round "
            f"{statistics.median(later(hundred.overhead)) * 1000:.0f} ms median (target < 50), memory "
            f"{hundred.peak_rss / 2**30:.2f} GB (target < 3)"
        )

        if not args.skip_thousand:
            print("3. 1000 sites, MLP --hidden 32, C = 0.01 (and 100 sites, C = 0.1, for comparison)", flush=True)
            small = simulated(
                recipe("hundred-32", data100, 100, args.rounds, 0.1, hidden=32), 100, tmp / "results", "100 sites h32"
            )
            data1000 = tmp / "data-1000"
            prepare("fashion-mnist", 1000, "iid", seed=SEED, out=data1000)
            big = simulated(
                recipe("thousand", data1000, 1000, args.rounds, 0.01, hidden=32), 1000, tmp / "results", "1000 sites"
            )
            per100, per1000 = statistics.mean(later(small.seconds)), statistics.mean(later(big.seconds))
            lines.append(
                f"MLP --hidden 32: 100 sites (C = 0.1) {per100:.2f} s per round, overhead "
                f"{statistics.median(later(small.overhead)) * 1000:.0f} ms, memory {small.peak_rss / 2**30:.2f} GB; "
                f"1000 sites (C = 0.01) {per1000:.2f} s per round ({per1000 / per100:.1f}x), overhead "
                f"{statistics.median(later(big.overhead)) * 1000:.0f} ms, memory {big.peak_rss / 2**30:.2f} GB "
                f"(target < 4), start-up {big.startup:.1f} s"
            )
    print()
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
