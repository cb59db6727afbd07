"""Short jobs back to back on a running federation, with what each daemon holds sampled after every job:
resident memory, threads and open file descriptors (from /proc). Used by tests/test_campaign_soak.py (18
jobs in CI) and bench/soak.py (100 jobs, printed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from federation import Federation

from fedgrid.recipe import FedAvgRecipe

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


@dataclass(frozen=True)
class Usage:
    rss_mb: float
    threads: int
    fds: int


def usage(pid: int) -> Usage:
    """What process `pid` holds now."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return Usage(
        rss_mb=int(fields["VmRSS"][0]) / 1024,
        threads=int(fields["Threads"][0]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
    )


def slope(values: Sequence[float]) -> float:
    """The least-squares slope of `values` per step (per job)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    den = sum((x - mean_x) ** 2 for x in range(n))
    return num / den


Samples = list[dict[str, Usage]]
"""One entry per job: daemon name ("server", "site-1", ...) -> what it held after that job."""


def run_jobs(
    federation: Federation,
    count: int,
    folder: Path,
    rounds: int = 1,
    on_job: Callable[[int, dict[str, Usage]], None] | None = None,
) -> Samples:
    """Run `count` short FedAvg jobs one after the other on every site; sample every daemon after each."""
    project = federation.project
    daemons = {"server": project.server, **{site.name: site for site in project.sites}}
    recipe = FedAvgRecipe(
        name="soak",
        model=torch.nn.Linear(8, 1),
        train_script=SCRIPT,
        num_rounds=rounds,
        min_clients=len(project.sites),
    )
    job_dir = recipe.export(folder / "soak")
    samples: Samples = []
    with federation.session() as session:
        for number in range(1, count + 1):
            info = session.wait(session.submit_job(job_dir))
            if info.status != "FINISHED:COMPLETED":
                raise AssertionError(f"soak job {number} ended {info.status}: {info.error}")
            sample = {name: usage(federation.pid(kit)) for name, kit in daemons.items()}
            samples.append(sample)
            if on_job is not None:
                on_job(number, sample)
    return samples


def series(samples: Samples, daemon: str, field: str) -> list[float]:
    return [getattr(sample[daemon], field) for sample in samples]
