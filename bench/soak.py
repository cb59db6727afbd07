"""Soak: many short jobs back to back on one running federation; does any daemon grow with the jobs it ran?

    python bench/soak.py [--jobs 100] [--sites 2] [--rounds 1] [--warmup 5]

Provisions a throw-away project on loopback, starts the server and the sites from their kits, runs
--jobs one-round FedAvg jobs of a tiny model one after the other (tests/scripts/train_tiny.py), and after
each job samples every daemon's resident memory, threads and open file descriptors from /proc. Prints
one line per job, then per daemon the least-squares slope of each over the jobs after --warmup and over
the first 14 jobs (where the server once grew about 2.7 MB per job), and the change from the mean of the
first ten jobs after the warm-up to the mean of the last ten.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=5, help="jobs left out of the trend")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import provision_project
    from federation import running
    from soak import Usage, run_jobs, series, slope

    def show(number: int, sample: dict[str, Usage]) -> None:
        cells = "  ".join(f"{name} {u.rss_mb:6.1f} MB {u.threads:3d} thr {u.fds:3d} fd" for name, u in sample.items())
        print(f"job {number:3d}  {cells}", flush=True)

    with tempfile.TemporaryDirectory(prefix="fedgrid-soak-") as tmp:
        project = provision_project(Path(tmp) / "project", n_sites=args.sites)
        with running(project) as federation:
            samples = run_jobs(federation, args.jobs, Path(tmp), rounds=args.rounds, on_job=show)
    after = samples[args.warmup :]
    print(f"\ntrend over jobs {args.warmup + 1}..{args.jobs} (per job), first 14 jobs, and last 10 minus first 10:")
    for daemon in samples[0]:
        for field, unit in (("rss_mb", "MB"), ("threads", "threads"), ("fds", "fds")):
            values = series(after, daemon, field)
            early = series(samples[:14], daemon, field)
            change = statistics.mean(values[-10:]) - statistics.mean(values[:10]) if len(values) >= 20 else 0.0
            print(
                f"  {daemon:8s} {field:8s} slope {slope(values):+8.4f} {unit}/job   "
                f"first 14: {slope(early):+8.4f} {unit}/job   last10-first10: {change:+7.2f} {unit}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
