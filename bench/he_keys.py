"""What HE keys made at the sites cost: the same encrypted job on a federation with provisioned keys and on
one whose sites make each job's key (`he.keys: sites`), in one run.

    python bench/he_keys.py [--rounds 3] [--sites 4] [--max_samples 2000]

MLP 784-512-512-10 on Fashion-MNIST, IID sites on this machine, 1 local epoch per round, real daemons over
mutual TLS. Prints, for each key mode: the job's start (from the server's "starting" line to round 1's model
going out, which takes in the workers coming up and, with site keys, the key made, wrapped and relayed),
what the key itself took at the key site and at the others (their logs), and the seconds per round.
Target: site keys add at most 2 s to the start and nothing to the rounds.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def _stamp(pattern: str, text: str) -> float:
    for line in text.splitlines():
        if re.search(pattern, line):
            h, m, s = line.split()[1].replace(",", ".").split(":")
            return int(h) * 3600 + int(m) * 60 + float(s)
    return float("nan")


def run(keys: str, data: Path, args: argparse.Namespace, tmp: Path) -> dict:
    import torch
    from conftest import provision_project
    from federation import Federation

    from fedgrid.examples import FASHION_MNIST_TRAIN
    from fedgrid.models import build_model
    from fedgrid.recipe import FedAvgRecipe

    project = provision_project(tmp / keys, n_sites=args.sites, he=True, he_params={"keys": keys})
    fed = Federation(project)
    try:
        fed.start_all()
        starts, rounds, made, received = [], [], [], []
        for attempt in range(args.jobs):
            torch.manual_seed(0)
            recipe = FedAvgRecipe(
                name=f"he-{keys}-{attempt}",
                model=build_model("mlp"),
                train_script=FASHION_MNIST_TRAIN,
                train_args=["--data_root", str(data), "--max_samples", str(args.max_samples)],
                num_rounds=args.rounds,
                min_clients=args.sites,
                encryption=True,
            )
            with fed.session() as session:
                job_id = session.submit_job(recipe.export(tmp / keys / f"job-{attempt}"))
                info = session.wait(job_id)
                if info.status != "FINISHED:COMPLETED":
                    raise SystemExit(f"{keys}: job ended {info.status}: {info.error}")
                detail = session.show_job(job_id)
                result = session.download_job(job_id, tmp / keys / "results")
            log = (result / "log.txt").read_text()
            starts.append(_stamp(r"round 1: model sent", log) - _stamp(r"starting on", log))
            rounds += [r.seconds for r in detail.rounds]
            sites = "\n".join(p.read_text() for p in (result / "sites").glob("*/log.txt"))
            made += [float(m) for m in re.findall(r"HE key and wrapped it for \d+ sites in ([\d.]+) s \(", sites)]
            received += [float(m) for m in re.findall(r"received this job's HE key from \S+ in ([\d.]+) s", sites)]
    finally:
        fed.close()
    return {"starts": starts, "rounds": rounds, "made": made, "received": received}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2, help="jobs per key mode (each starts a new key)")
    parser.add_argument("--max_samples", type=int, default=2000, help="samples per site (0: all 15,000)")
    args = parser.parse_args()
    from fedgrid.data import prepare

    with tempfile.TemporaryDirectory(prefix="fedgrid-he-keys-bench-") as tmp:
        tmp_path = Path(tmp)
        data = tmp_path / "data"
        prepare("fashion-mnist", args.sites, "iid", seed=42, out=data)
        provisioned = run("provisioned", data, args, tmp_path)
        sites = run("sites", data, args, tmp_path)

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    print(
        f"MLP 669,706 parameters, encrypted, {args.sites} sites, {args.jobs} jobs of {args.rounds} rounds per mode "
        f"({args.max_samples or 'all 15,000'} samples per site)"
    )
    print(f"{'':40}{'provisioned':>12}{'site keys':>12}{'difference':>12}")
    p_start, s_start = med(provisioned["starts"]), med(sites["starts"])
    p_round, s_round = med(provisioned["rounds"]), med(sites["rounds"])
    print(f"{'start: job starting to round 1 (median)':40}{p_start:>12.2f}{s_start:>12.2f}{s_start - p_start:>+12.2f}")
    print(f"{'seconds per round (median)':40}{p_round:>12.2f}{s_round:>12.2f}{s_round - p_round:>+12.2f}")
    print(
        f"site keys: made and wrapped at the key site in {med(sites['made']):.3f} s (median); at the others, from "
        f"asking to holding the checked key {med(sites['received']):.3f} s, which includes waiting for the key site"
    )
    print(f"starts   provisioned: {', '.join(f'{s:.2f}' for s in provisioned['starts'])}")
    print(f"           site keys: {', '.join(f'{s:.2f}' for s in sites['starts'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
