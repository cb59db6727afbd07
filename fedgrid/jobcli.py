"""What the example `jobs/*/job.py` scripts share: finding the admin kit, preparing data, progress lines, and
`--simulate`, which runs the same job on virtual sites (fedgrid.sim) instead of submitting it.

Kept in the package so each job.py stays a short, readable recipe. Nothing here depends on where fedgrid
is installed: the training script ships in the package (`fedgrid.examples`), and the kits and the data
are found in the current folder unless options name them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedgrid.errors import FedgridError
from fedgrid.examples import FASHION_MNIST_TRAIN
from fedgrid.exit_codes import ExitCode
from fedgrid.recipe import FedAvgRecipe, ProdEnv, Run
from fedgrid.serde import RoundInfo
from fedgrid.sim import SimEnv, SimRun

DEFAULT_WORKSPACES = Path("workspaces")
DEFAULT_DATA = Path("data")


def newest_admin_kit(workspaces: Path) -> Path:
    """The first admin kit of the most recently provisioned project (what start_fl.sh started)."""
    prods = sorted((p for p in workspaces.glob("*/prod_*") if p.is_dir()), key=lambda p: (p.stat().st_mtime, p.name))
    for prod in reversed(prods):
        for config in sorted(prod.glob("*/startup/config.json")):
            if json.loads(config.read_text()).get("type") == "admin":
                return config.parent.parent
    raise FedgridError(
        f"no admin kit under {workspaces}: provision a project there first "
        f"(fedgrid provision -p project.yml -w {workspaces}), or name the kit with --startup_kit"
    )


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n_clients", type=int, default=4, help="sites to train on (default 4)")
    parser.add_argument("--num_rounds", type=int, default=5, help="FedAvg rounds (default 5)")
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.0,
        help="data split: 0 = IID (default); >0 = Dirichlet(alpha) label skew per site",
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the data split and of training")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9, help="local SGD momentum (default 0.9)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument(
        "--max_samples", type=int, default=0, help="train on at most this many samples per site (default 0: all)"
    )
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"), help="MLP 784-512-512-10 or McMahan's CNN")
    parser.add_argument(
        "--data_root",
        type=Path,
        default=None,
        help="folder with one sub-folder per site (default: data/fashion-mnist-<split>-<n_clients> in the "
        "current folder, made if missing)",
    )
    parser.add_argument(
        "--startup_kit",
        type=Path,
        default=None,
        help="admin kit to submit with (default: the first admin kit of the newest project under --workspaces)",
    )
    parser.add_argument(
        "--workspaces",
        type=Path,
        default=DEFAULT_WORKSPACES,
        help="where provision wrote the kits (default: workspaces/ in the current folder)",
    )
    parser.add_argument(
        "--export_only",
        type=Path,
        default=None,
        metavar="FOLDER",
        help="only write the job folder there (for submit_job in the console)",
    )
    parser.add_argument(
        "--round_timeout",
        type=float,
        default=0.0,
        help="seconds to wait for updates per round before aggregating what came (0: wait for all)",
    )
    parser.add_argument(
        "--client_fraction", type=float, default=1.0, help="share of the sites that train each round (default 1)"
    )
    parser.add_argument("--hidden", type=int, default=0, help="the MLP's width (default 0: 512)")
    sim = parser.add_argument_group("simulation: the same job on virtual sites on this machine (or a Ray cluster)")
    sim.add_argument("--simulate", action="store_true", help="simulate --n_clients sites instead of submitting")
    sim.add_argument("--workers", type=int, default=0, help="worker processes hosting the sites (default: cores)")
    sim.add_argument(
        "--stragglers",
        type=float,
        default=0.0,
        help="chance a site chosen to train does not answer (needs --round_timeout)",
    )
    sim.add_argument(
        "--ray", default="", metavar="ADDRESS", help='run the workers as Ray actors there ("local": start Ray)'
    )
    sim.add_argument("--results", type=Path, default=Path("sim_results"), help="where result folders go")
    sim.add_argument(
        "--he",
        type=Path,
        default=None,
        metavar="FILE",
        help="CKKS parameters of an encrypted job (a project.yml or its he: section)",
    )


def ensure_data(args: argparse.Namespace) -> Path:
    """The data folder of this split; runs prepare-data for it when it does not exist yet."""
    split = "iid" if args.alpha <= 0 else f"dirichlet-{args.alpha:g}"
    root = args.data_root or DEFAULT_DATA / f"fashion-mnist-{split}-{args.n_clients}"
    if (root / "summary.json").exists():
        return root.resolve()
    from fedgrid.data import prepare

    print(f"preparing Fashion-MNIST for {args.n_clients} sites ({split}, seed {args.seed}) in {root}")
    prepare(
        "fashion-mnist",
        args.n_clients,
        "iid" if args.alpha <= 0 else "dirichlet",
        alpha=args.alpha or 0.5,
        seed=args.seed,
        out=root,
    )
    return root.resolve()


def fashion_mnist_recipe(
    name: str,
    args: argparse.Namespace,
    recipe: type[FedAvgRecipe] = FedAvgRecipe,
    train_script: Path = FASHION_MNIST_TRAIN,
    **options: object,
) -> FedAvgRecipe:
    """The recipe of the example jobs (FedAvg unless `recipe` is another strategy's, with its parameters in
    `options`): `train_script` (the packaged one by default) on this split, with `args`' settings."""
    from fedgrid.models import build_model

    data_root = ensure_data(args)
    train_args = [
        "--data_root",
        str(data_root),
        "--model",
        args.model,
        "--epochs",
        str(args.epochs),
        "--lr",
        str(args.lr),
        "--momentum",
        str(args.momentum),
        "--batch_size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
    ]
    if args.max_samples:
        train_args += ["--max_samples", str(args.max_samples)]
    if args.hidden:
        train_args += ["--hidden", str(args.hidden)]
    fraction = args.client_fraction
    stragglers = getattr(args, "stragglers", 0.0)
    if stragglers and not args.round_timeout:
        raise FedgridError("--stragglers needs --round_timeout SECONDS: a straggler would hold its round forever")
    return recipe(
        name=name,
        model=build_model(args.model, args.hidden),
        train_script=train_script,
        train_args=train_args,
        num_rounds=args.num_rounds,
        # With a fraction C, a round samples max(min_clients, C·n) sites: min_clients is then C·n.
        min_clients=args.n_clients if fraction >= 1 else max(1, round(fraction * args.n_clients)),
        client_fraction=fraction,
        # Stragglers: a round closes on the updates that came by its timeout.
        min_responses=1 if stragglers else 0,
        round_timeout=args.round_timeout,
        seed=args.seed,
        **options,  # type: ignore[arg-type]
    )


def format_round(r: RoundInfo, total: int) -> str:
    acc = r.metrics.get("accuracy")
    loss = r.metrics.get("loss")
    acc_s = f"accuracy {acc:.4f}" if acc is not None else "accuracy -"
    loss_s = f"loss {loss:.4f}" if loss is not None else "loss -"
    eps = r.metrics.get("epsilon")
    eps_s = f"  ε {eps:.4g}" if eps is not None else ""
    sites = f"sites {r.sites_answered}/{r.sites_asked}"
    return f"round {r.round}/{total}  {sites}  {acc_s}  {loss_s}{eps_s}  {r.seconds:.2f} s"


def sim_env(args: argparse.Namespace, data_root: Path | None = None) -> SimEnv:
    """The simulation the job.py options ask for (--simulate and its group)."""
    return SimEnv(
        num_clients=args.n_clients,
        workers=args.workers,
        stragglers=args.stragglers,
        ray_address=args.ray,
        data_root=data_root,
        results=args.results,
        he_params=args.he,
    )


def run_recipe(recipe: FedAvgRecipe, args: argparse.Namespace) -> int:
    """Export, submit or simulate; follow the job with one line per round; show the result and where it is."""
    if args.export_only:
        print(f"job folder written to {recipe.export(args.export_only)}")
        return ExitCode.OK
    started = time.monotonic()
    if getattr(args, "simulate", False):
        run = recipe.execute(sim_env(args))
        plan = run.simulation.plan
        where = f"Ray at {args.ray}" if args.ray else "this machine"
        print(
            f"simulating job {run.job_id} ({recipe.name}) on {len(plan.sites)} virtual sites in {plan.workers} "
            f"worker processes on {where}"
        )
    else:
        kit = args.startup_kit or newest_admin_kit(args.workspaces)
        env = ProdEnv(startup_kit_location=kit)
        run = recipe.execute(env)
        session = env.session()
        print(f"submitted job {run.job_id} ({recipe.name}) to {session.server_name} as {session.name}")
    return follow(run, recipe.num_rounds, started)


def follow(run: Run | SimRun, num_rounds: int, started: float) -> int:
    """Print each round as it ends, then the table of rounds and where the result is."""
    rounds: list[RoundInfo] = []

    def progress(r: RoundInfo) -> None:
        rounds.append(r)
        print(format_round(r, num_rounds), flush=True)

    try:
        info = run.wait(progress=progress)
    except KeyboardInterrupt:
        if isinstance(run, SimRun):
            print("\ninterrupted: aborting the simulation")
            run.abort()
            run.wait()
        else:
            print(f"\ninterrupted: the job goes on; abort it with: abort_job {run.job_id}")
        return ExitCode.INTERRUPTED
    print(f"job {info.status} in {time.monotonic() - started:.1f} s{': ' + info.error if info.error else ''}")
    result = run.get_result()
    summary = json.loads((result / "result.json").read_text()) if (result / "result.json").exists() else {}
    if rounds:
        print("\n round  sites  accuracy    loss  seconds")
        for r in rounds:
            accuracy, loss = r.metrics.get("accuracy", float("nan")), r.metrics.get("loss", float("nan"))
            sites = f"{r.sites_answered:>2}/{r.sites_asked:<2}"
            print(f" {r.round:>5}  {sites} {accuracy:>9.4f} {loss:>7.4f} {r.seconds:>8.2f}")
    if summary.get("tracking"):
        print(f"tracking: {summary['tracking']}")
    print(f"Result can be found in: {result}")
    return ExitCode.OK if info.status == "FINISHED:COMPLETED" else ExitCode.FAILED


def main_guard(fn: object) -> None:
    """Run a job.py main with readable errors instead of tracebacks."""
    try:
        sys.exit(fn())  # type: ignore[operator]
    except FedgridError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(ExitCode.FAILED)
