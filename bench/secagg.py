"""What SecAgg+ costs, and that it survives dropouts: plain and SecAgg+ jobs side by side, in one run.

    python bench/secagg.py [--rounds 3] [--max_samples 0] [--skip_dropouts]

1. The quickstart workload: MLP 784-512-512-10 (669,706 parameters) on Fashion-MNIST, 4 IID sites, 1 local
   epoch per round, real daemons over mutual TLS: the same job plain and with `secure_aggregation: secagg+`
   (16-bit quantization over ±1, 32-bit masks, every site a neighbour of every other). Prints seconds per
   round, the bytes of one site's update, the final accuracy, and the time of the protocol's steps.
   Targets: at most 1.1x the plain round and 1.3x its bytes (Flower's SecAgg+ in simulation: 1.04x).
2. 8 sites, 2 of them dropping out after sharing their keys (played by tests/rogue.py with the real site
   code of SecAgg+, leaving before their masked update): the round aggregates the 6 survivors, and the
   unmasked mean is compared with the plain mean of those 6 updates (tests/scripts/train_fixed.py, whose
   updates are known), within one quantization step.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SECAGG = {"bits": 16, "value_range": 1.0, "step_timeout": 10.0}


def _floats(pattern: str, text: str) -> list[float]:
    return [float(m) for m in re.findall(pattern, text)]


def _stamps(pattern: str, text: str) -> list[float]:
    """Seconds of the day of the log lines matching `pattern`."""
    out = []
    for line in text.splitlines():
        if re.search(pattern, line):
            hms = line.split()[1].replace(",", ".")
            h, m, s = hms.split(":")
            out.append(int(h) * 3600 + int(m) * 60 + float(s))
    return out


def quickstart_job(fed: object, name: str, data: Path, args: argparse.Namespace, out: Path, **options: object) -> dict:
    import torch

    from fedgrid.examples import FASHION_MNIST_TRAIN
    from fedgrid.models import build_model
    from fedgrid.recipe import FedAvgRecipe

    torch.manual_seed(0)
    recipe = FedAvgRecipe(
        name=name,
        model=build_model("mlp"),
        train_script=FASHION_MNIST_TRAIN,
        train_args=["--data_root", str(data), "--max_samples", str(args.max_samples)],
        num_rounds=args.rounds,
        min_clients=4,
        **options,  # type: ignore[arg-type]
    )
    with fed.session() as session:  # type: ignore[attr-defined]
        started = time.monotonic()
        job_id = session.submit_job(recipe.export(out / name))
        info = session.wait(job_id)
        total = time.monotonic() - started
        if info.status != "FINISHED:COMPLETED":
            raise SystemExit(f"{name} ended {info.status}: {info.error}")
        detail = session.show_job(job_id)
        result = session.download_job(job_id, out / "results")
    log = (result / "log.txt").read_text()
    aggregated = _stamps(r"round \d+: aggregate of", log)
    if options:  # SecAgg+: from the first step closing (every site done training) to the unmasked aggregate
        ready = _stamps(r"round \d+: secagg: step 1 closed", log)
    else:  # plain: from the last update folded in to the aggregate
        folded = _stamps(r"round \d+: update from \S+ folded in", log)
        ready = [max(t for t in folded if t <= end) for end in aggregated]
    return {
        "rounds": [r.seconds for r in detail.rounds],
        "accuracy": detail.rounds[-1].metrics.get("accuracy", float("nan")),
        "total": total,
        "update_bytes": _floats(r"folded in \(\d+ samples, (\d+) bytes", log),
        "tail": [b - a for a, b in zip(ready, aggregated, strict=False)],
    }


def _list(value: object) -> list:
    return list(value) if isinstance(value, list) else [value]


def quickstart(args: argparse.Namespace, tmp: Path) -> None:
    from conftest import provision_project
    from federation import Federation

    from fedgrid.data import prepare

    data = tmp / "data"
    prepare("fashion-mnist", 4, "iid", seed=42, out=data)
    project = provision_project(tmp / "quickstart", n_sites=4)
    fed = Federation(project)
    runs: dict[str, list[dict]] = {"plain": [], "secagg": []}
    try:
        fed.start_all()
        for repeat in range(args.repeats):  # alternating, so that a change of the machine's load hits both
            runs["plain"].append(quickstart_job(fed, f"plain-{repeat}", data, args, tmp))
            runs["secagg"].append(
                quickstart_job(fed, f"secagg-{repeat}", data, args, tmp, secure_aggregation="secagg+", secagg=SECAGG)
            )
    finally:
        fed.close()
    plain, secure = ({key: [v for run in runs[kind] for v in _list(run[key])] for key in runs[kind][0]}
                     for kind in ("plain", "secagg"))

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    p_round, s_round = med(plain["rounds"]), med(secure["rounds"])
    p_bytes, s_bytes = med(plain["update_bytes"]), med(secure["update_bytes"])
    print(
        f"1. MLP 669,706 parameters, 4 sites, {args.repeats} x {args.rounds} rounds each, 1 local epoch "
        f"({args.max_samples or 'all 15,000'} samples per site)"
    )
    print(f"{'':30}{'plain':>12}{'secagg+':>12}{'ratio':>8}")
    print(f"{'seconds per round (median)':30}{p_round:>12.2f}{s_round:>12.2f}{s_round / p_round:>8.3f}")
    p_total, s_total = sum(plain["total"]), sum(secure["total"])
    print(f"{'jobs seconds (submit to end)':30}{p_total:>12.1f}{s_total:>12.1f}{s_total / p_total:>8.3f}")
    print(f"{'bytes of one site update':30}{p_bytes:>12,.0f}{s_bytes:>12,.0f}{s_bytes / p_bytes:>8.3f}")
    print(f"{'final accuracy (mean)':30}{statistics.mean(plain['accuracy']):>12.4f}"
          f"{statistics.mean(secure['accuracy']):>12.4f}")
    print(f"{'after training, s (median)':30}{med(plain['tail']):>12.3f}{med(secure['tail']):>12.3f}"
          f"{med(secure['tail']) - med(plain['tail']):>+8.3f}")
    print("   (plain: last update in to aggregate; secagg+: every site trained (step 1 closed) to the unmasked "
          "aggregate: shares, masked uploads, unmasking)")
    print(f"   per-round seconds  plain: {', '.join(f'{s:.2f}' for s in plain['rounds'])}")
    print(f"                    secagg+: {', '.join(f'{s:.2f}' for s in secure['rounds'])}")


def dropouts(tmp: Path) -> None:
    from conftest import provision_project
    from federation import Federation
    from replay import SCRIPT, Site, replay, train_args, trained
    from rogue import RogueSite

    from fedclient.secure_aggregation import SecureRound
    from fedgrid import tensors
    from fedgrid.privacy_config import SecAggConfig
    from fedgrid.recipe import FedAvgRecipe
    from fedgrid.v1 import federation_pb2 as fpb

    secagg = {"bits": 16, "value_range": 8.0, "step_timeout": 5.0}
    config = SecAggConfig(**secagg)
    initial = {"w": np.random.default_rng(0).normal(size=(200, 100)).astype(np.float32)}
    sites = [Site(f"site-{i}", 0.05 * i, 20) for i in range(1, 9)]
    project = provision_project(tmp / "dropouts", n_sites=8)

    class Dropped(Exception):
        pass

    def dropping(kit: Path) -> RogueSite:
        def train(stream: object, header: fpb.TaskHeader, payload: bytes) -> bool:
            model = tensors.decode(payload)
            update = {k: v.astype(np.float32) for k, v in trained(model, 0.0, header.round).items()}
            original = stream.privacy  # type: ignore[attr-defined]

            def privacy(request: fpb.PrivacyRequest, what: str) -> fpb.PrivacyReply:
                answer = original(request, what)
                if request.WhichOneof("kind") == "shares":
                    raise Dropped  # its shares are with its neighbours: it leaves before its masked update
                return answer

            stream.privacy = privacy  # type: ignore[attr-defined]
            try:
                SecureRound(stream, rogue.kit, header.job_id, header.task_id, config).masked(update, model, None, {})
            except Dropped:
                return False
            finally:
                stream.privacy = original  # type: ignore[attr-defined]
            return False

        rogue = RogueSite(kit, train=train, samples=20)
        return rogue

    fed = Federation(project)
    rogues = [dropping(kit) for kit in project.sites[6:]]
    try:
        fed.start_all(project.sites[:6])
        for rogue in rogues:
            rogue.start()
        fed.wait_alive([s.name for s in sites])
        recipe = FedAvgRecipe(
            name="secagg-dropouts",
            model=initial,
            train_script=SCRIPT,
            train_args=train_args(sites),
            num_rounds=1,
            min_clients=8,
            min_responses=6,
            secure_aggregation="secagg+",
            secagg=secagg,
        )
        with fed.session() as session:
            job_id = session.submit_job(recipe.export(tmp / "dropouts-job"))
            info = session.wait(job_id)
            if info.status != "FINISHED:COMPLETED":
                raise SystemExit(f"dropouts job ended {info.status}: {info.error}")
            detail = session.show_job(job_id)
            result = session.download_job(job_id, tmp / "dropouts-result")
    finally:
        for rogue in rogues:
            rogue.close()
        fed.close()
    final = tensors.load_file(result / "final_model.safetensors")["w"].astype(np.float64)
    expected = replay([sites[:6]], initial=initial)[-1]["w"]
    error = float(np.abs(final - expected).max())
    step = 2 * config.value_range / (2**config.bits - 1)
    log = (result / "log.txt").read_text()
    line = next((ln for ln in log.splitlines() if "masked updates in the sum" in ln), "")
    record = detail.rounds[0]
    print("2. 8 sites, 2 dropping out after sharing their keys (one round, 20,000 values, 16-bit quantization)")
    print(f"   {line.split('secagg: ', 1)[-1]}")
    print(f"   sites answered {record.sites_answered}/{record.sites_asked}; round {record.seconds:.2f} s "
          f"(including the {config.step_timeout:g} s the server waits for the dropped sites' masked updates)")
    print(f"   largest difference to the plain mean of the 6 survivors: {error:.2e} (one quantization step: "
          f"{step:.2e}) -> {'correct' if error <= step else 'WRONG'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per quickstart job (default 3)")
    parser.add_argument("--max_samples", type=int, default=0, help="samples per site (0: all 15,000)")
    parser.add_argument("--repeats", type=int, default=2, help="plain and SecAgg+ jobs, alternating (default 2)")
    parser.add_argument("--skip_dropouts", action="store_true", help="only the quickstart comparison")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedgrid-secagg-bench-") as tmp:
        quickstart(args, Path(tmp))
        if not args.skip_dropouts:
            dropouts(Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
