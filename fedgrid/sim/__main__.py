"""`fedgrid-sim <job folder> -n 100` (also `fedgrid simulate ...`): simulate an exported job folder.

The job runs as it would on a federation of N sites named site-1..site-N (the names `fedgrid data` gives
its site folders): the same server code, the same training script, the same result folder, printed at the
end. One line per round while it runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fedgrid.errors import FedgridError
from fedgrid.exit_codes import ExitCode, describe


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedgrid-sim",
        description="Run a job folder on N virtual sites (site-1..site-N) on this machine or a Ray cluster: the "
        "same round loop, strategies, training script and result folder as on a federation.",
        epilog=describe(),
    )
    p.add_argument("job", type=Path, help="the job folder (from a recipe's export(), or job.py --export_only)")
    p.add_argument("-n", "--num_clients", type=int, required=True, help="virtual sites: site-1 .. site-N")
    p.add_argument("--workers", type=int, default=0, help="worker processes hosting the sites (default: one per core)")
    p.add_argument(
        "--stragglers",
        type=float,
        default=0.0,
        help="chance that a site chosen to train does not answer its round (the job needs a round_timeout)",
    )
    p.add_argument(
        "--ray",
        default="",
        metavar="ADDRESS",
        help='place the workers as Ray actors on the cluster at ADDRESS (ray://head:10001, or "auto"); '
        '"local" starts a Ray instance here',
    )
    p.add_argument(
        "--data_root",
        type=Path,
        default=None,
        help="folder with one data folder per site (default: the job's own --data_root argument)",
    )
    p.add_argument("--results", type=Path, default=Path("sim_results"), help="where the result folder goes")
    p.add_argument(
        "--he",
        type=Path,
        default=None,
        metavar="FILE",
        help="CKKS parameters for an encrypted job: a project.yml "
        "or a YAML file of its he: section (a context is generated from them)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from fedgrid.jobcli import follow
    from fedgrid.sim import SimEnv

    args = parser().parse_args(argv)
    started = time.monotonic()
    try:
        env = SimEnv(
            num_clients=args.num_clients,
            workers=args.workers,
            stragglers=args.stragglers,
            ray_address=args.ray,
            data_root=args.data_root,
            results=args.results,
            he_params=args.he,
        )
        run = env.submit(args.job)
    except FedgridError as exc:
        print(f"fedgrid-sim: error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    plan = run.simulation.plan
    where = f"Ray at {args.ray}" if args.ray else "this machine"
    print(
        f"simulating job {run.job_id} ({plan.spec.name}) on {len(plan.sites)} virtual sites in {plan.workers} "
        f"worker processes on {where}",
        flush=True,
    )
    try:
        return follow(run, plan.spec.server.num_rounds, started)
    except FedgridError as exc:
        print(f"fedgrid-sim: error: {exc}", file=sys.stderr)
        return ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())
