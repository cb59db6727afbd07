"""What a FedAvg round costs when the training is nearly free: the framework's own overhead per round.

    python bench/round_overhead.py [--rounds 20] [--sites 4] [--val_samples 500]

Provisions a throw-away project on loopback, starts a real federation from the kits' start.sh (server
and site daemons, gRPC over mutual TLS) and runs one FedAvg job of the 669,706-parameter MLP
784-512-512-10 on the prepared Fashion-MNIST split. Each site does ONE optimizer step per round (one
batch of --batch_size, SGD lr 0.01 momentum 0.9) and evaluates the new global model on its first
--val_samples validation images, so a round is almost all framework: dispatch of the global model,
upload of the updates, folding, the evaluation task, checkpointing and bookkeeping.

Printed: start-up of the federation (start_all), time from submit to round 1 (the job log's
"workers ready" line), per-round seconds over rounds 2..N (round 1 carries one-off warm-up), the time
from the last round to FINISHED, the reference figures of NVIDIA FLARE and Flower on this machine
(from our issue, not measured here) with ratios, and a breakdown of a round from the server's job log
timestamps and the sites' own timing lines. The machine load (1-minute load average) is printed
before and after: other work on the two cores shows up in every figure.

This same file is the job's training script: the worker runs it with --site.
"""

from __future__ import annotations

import argparse
import atexit
import cProfile
import io
import json
import math
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_SECONDS = 0.1
REFERENCE = (
    ("NVIDIA FLARE 2.9", 2.5),
    ("Flower 1.42 (deployment mode, TLS)", 13.0),
)
"""Seconds per one-batch round of the other frameworks on this machine: figures from our issue, not re-measured."""
TIMING_MARK = "BENCH-TIMING "


# ---------------------------------------------------------------------------------------------- site side


def site_main(args: argparse.Namespace) -> None:
    """The training script: one SGD step per train task, evaluation on a small validation slice.

    Prints one timing line per task (wall clock, same machine as the server) so that the driver can
    split a round into dispatch, site compute and upload.
    """
    import torch

    from fedclient import api
    from fedgrid.data import load_site
    from fedgrid.models import build_model
    from fedgrid.training import evaluate, make_loader

    api.init()
    site = api.get_site_name()
    data = load_site(Path(args.data_root) / site)
    torch.manual_seed(args.seed)
    model = build_model("mlp")
    batch = next(iter(make_loader(data.x_train, data.y_train, args.batch_size, shuffle=True, seed=args.seed)))
    val_loader = make_loader(data.x_val[: args.val_samples], data.y_val[: args.val_samples], 1000, shuffle=False)
    loss_fn = torch.nn.CrossEntropyLoss()
    loss_fn(model(batch[0]), batch[1]).backward()  # warm autograd up before round 1, like any real script would
    atexit.register(lambda: print(TIMING_MARK + json.dumps({"site": site, "kind": "exit", "t": time.time()}),
                                  flush=True))
    profile = cProfile.Profile() if args.profile else None
    while api.is_running():
        asked = time.time()
        if profile is not None:
            profile.enable()
        task = api.receive()
        if task is None:
            break
        got = time.time()
        if profile is not None:
            profile.disable()
        compute_cpu = time.thread_time()
        model.load_state_dict(task.params)
        if task.is_evaluate:
            loss, accuracy = evaluate(model, val_loader)
            computed, compute_cpu = time.time(), time.thread_time() - compute_cpu
            if profile is not None:
                profile.enable()
            api.send(metrics={"accuracy": accuracy, "loss": loss}, num_samples=len(val_loader.y))
        else:
            model.train()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(batch[0]), batch[1])
            loss.backward()
            optimizer.step()
            train_loss = loss.item()
            computed, compute_cpu = time.time(), time.thread_time() - compute_cpu
            if profile is not None:
                profile.enable()
            api.send(model.state_dict(), num_samples=len(data.y_train), metrics={"train_loss": train_loss})
        if profile is not None:
            profile.disable()
        sent = time.time()
        timing = {"site": site, "round": task.current_round, "kind": task.kind, "asked": asked, "got": got,
                  "computed": computed, "sent": sent, "compute_cpu": compute_cpu, "process_cpu": time.process_time()}
        print(TIMING_MARK + json.dumps(timing), flush=True)
    if profile is not None:
        profile.disable()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue(), flush=True)
    print(TIMING_MARK + json.dumps({"site": site, "kind": "loop-end", "t": time.time()}), flush=True)


# ---------------------------------------------------------------------------------------------- log parsing


@dataclass
class RoundLog:
    """Timestamps (epoch seconds) of one round, from the server's job log."""

    sent: float = math.nan
    folded: list[float] = field(default_factory=list)
    evaluated: float = math.nan
    done: float = math.nan
    seconds: float = math.nan


@dataclass
class JobLog:
    starting: float = math.nan
    ready: float = math.nan
    ended: float = math.nan
    rounds: dict[int, RoundLog] = field(default_factory=lambda: defaultdict(RoundLog))


def log_time(line: str) -> float:
    """Epoch seconds of a logging line that starts with "YYYY-mm-dd HH:MM:SS,mmm" (local time)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def parse_job_log(text: str) -> JobLog:
    job = JobLog()
    for line in text.splitlines():
        if len(line) < 24 or not line[:4].isdigit():
            continue
        t, message = log_time(line), line[24:].split(" ", 1)[-1]
        if message.startswith("job ") and " starting on " in message:
            job.starting = t
        elif message.startswith("workers ready"):
            job.ready = t
        elif message.startswith("job ended"):
            job.ended = t
        elif message.startswith("round "):
            head, _, rest = message.partition(" ")[2].partition(" ")
            number = int(head.rstrip(":").split("/")[0])
            r = job.rounds[number]
            if rest.startswith("model sent"):
                r.sent = t
            elif "folded in" in rest:
                r.folded.append(t)
            elif rest.startswith("global model evaluated"):
                r.evaluated = t
            elif rest.startswith("done in"):
                r.done = t
                r.seconds = float(rest.split()[2])
    return job


def site_timings(kits: list[Path], job_id: str) -> dict[tuple[int, str], list[dict[str, float]]]:
    """(round, kind) -> the sites' timing lines, read from each site's job log on this machine.

    Lines without a round (loop end, interpreter exit) are filed under round 0.
    """
    out: dict[tuple[int, str], list[dict[str, float]]] = defaultdict(list)
    for kit in kits:
        path = kit / "workspace" / "jobs" / job_id / "log.txt"
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(TIMING_MARK):
                item = json.loads(line[len(TIMING_MARK):])
                out[(item.get("round", 0), item["kind"])].append(item)
    return out


def site_profile(kit: Path, job_id: str) -> str:
    """The cProfile table a site printed into its job log (with --profile)."""
    path = kit / "workspace" / "jobs" / job_id / "log.txt"
    text = path.read_text(errors="replace") if path.exists() else ""
    start = text.find("function calls")
    return text[start:].split(TIMING_MARK)[0].rstrip() if start >= 0 else "(no profile found)"


def daemon_times(kit: Path, job_id: str, what: str) -> list[float]:
    """Timestamps of a site daemon's log lines about `job_id` that contain `what`."""
    path = kit / "log.txt"
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return [log_time(line) for line in lines if job_id in line and what in line and line[:4].isdigit()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (from /proc, clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------- figures


def p90(values: list[float]) -> float:
    """Nearest-rank 90th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (f"median {statistics.median(values) * 1000:7.1f} ms   min {min(values) * 1000:7.1f} ms   "
            f"p90 {p90(values) * 1000:7.1f} ms")


def load_line(when: str) -> str:
    one, five, _ = os.getloadavg()
    return f"machine load {when}: {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def breakdown(job: JobLog, sites: dict[tuple[int, str], list[dict[str, float]]], rounds: list[int]) -> list[str]:
    """Median over `rounds` of each phase of a round, in the order they happen."""
    phases: dict[str, list[float]] = defaultdict(list)
    for n in rounds:
        r, nxt = job.rounds[n], job.rounds.get(n + 1)
        train, evaluation = sites.get((n, "train"), []), sites.get((n, "evaluate"), [])
        if not r.folded or not train:
            continue
        folded = sorted(r.folded)
        got = sorted(s["got"] for s in train)
        phases["train task: dispatched -> first site holds the model"].append(got[0] - r.sent)
        phases["train task: dispatched -> last site holds the model"].append(got[-1] - r.sent)
        phases["site: load_state_dict + one SGD step (median site)"].append(
            statistics.median(s["computed"] - s["got"] for s in train))
        phases["site: api.send of the update (median site)"].append(
            statistics.median(s["sent"] - s["computed"] for s in train))
        phases["server: dispatched -> first update folded"].append(folded[0] - r.sent)
        phases["server: first -> last update folded"].append(folded[-1] - folded[0])
        if evaluation:
            eval_got = sorted(s["got"] for s in evaluation)
            phases["last fold -> eval task (new model) at first site"].append(eval_got[0] - folded[-1])
            phases["last fold -> eval task (new model) at last site"].append(eval_got[-1] - folded[-1])
            phases["site: load_state_dict + evaluate (median site)"].append(
                statistics.median(s["computed"] - s["got"] for s in evaluation))
            phases["site: api.send of the metrics (median site)"].append(
                statistics.median(s["sent"] - s["computed"] for s in evaluation))
        phases["server: last fold -> evaluation metrics in (log line)"].append(r.evaluated - folded[-1])
        phases["server: metrics in -> round recorded (checkpoint, store)"].append(r.done - r.evaluated)
        if nxt is not None and not math.isnan(nxt.sent):
            phases["server: round recorded -> next round dispatched"].append(nxt.sent - r.done)
    return [f"  {name:<58} {statistics.median(v) * 1000:8.1f} ms" for name, v in phases.items()]


def cpu_lines(
    sites: dict[tuple[int, str], list[dict[str, float]]], server_cpu: dict[int, float], first: int, last: int
) -> list[str]:
    """CPU seconds per round, by process, between the end of round `first` and the end of round `last`."""
    n = last - first
    if n <= 0:
        return []
    lines = []
    if first in server_cpu and last in server_cpu:
        lines.append(f"  server daemon{'':<40} {(server_cpu[last] - server_cpu[first]) / n * 1000:8.1f} ms")
    at = {(s["site"], r): s for (r, kind), items in sites.items() if kind == "evaluate" for s in items}
    workers, compute = [], []
    for name in sorted({site for site, _ in at}):
        if (name, first) in at and (name, last) in at:
            workers.append((at[(name, last)]["process_cpu"] - at[(name, first)]["process_cpu"]) / n)
            compute.append(sum(s["compute_cpu"] for (r, _), items in sites.items() if first < r <= last
                               for s in items if s["site"] == name and "compute_cpu" in s) / n)
    if workers:
        total, model = sum(workers), sum(compute)
        lines.append(f"  {len(workers)} job workers, all threads{'':<27} {total * 1000:8.1f} ms")
        lines.append(f"    of which training + evaluation (torch){'':<14} {model * 1000:8.1f} ms")
        lines.append(f"    of which framework (receive, decode, encode, send){'':<2} {(total - model) * 1000:8.1f} ms")
        if first in server_cpu and last in server_cpu:
            everything = total + (server_cpu[last] - server_cpu[first]) / n
            lines.append(f"  sum / {os.cpu_count()} cores = lower bound on a round's wall time here"
                         f"{'':<5} {everything / (os.cpu_count() or 1) * 1000:8.1f} ms")
    return lines


# ---------------------------------------------------------------------------------------------- driver


def start_server_profiled(fed: object, kit: Path, out: Path) -> None:
    """Start the server daemon under cProfile (instead of start.sh), in the way stop.sh can still stop it."""
    from federation import ENV

    ready = kit / "daemon.ready"
    ready.unlink(missing_ok=True)
    with open(kit / "log.txt", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "fedserver", "--kit", str(kit)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=ENV,
        )
    (kit / "daemon.pid").write_text(str(process.pid))
    fed.running.append(kit)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"profiled server did not start; see {kit / 'log.txt'}")
        time.sleep(0.05)


def run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import provision_project
    from federation import Federation

    from fedgrid.jobcli import ensure_data
    from fedgrid.models import build_model, count_parameters
    from fedgrid.recipe import FedAvgRecipe
    from fedgrid.serde import JobInfo, RoundInfo

    data_root = ensure_data(argparse.Namespace(alpha=0.0, n_clients=args.sites, data_root=None, seed=42))
    model = build_model("mlp")
    print(load_line("before"), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="fedgrid-round-overhead-"))
    server_profile = tmp / "server.prof"
    try:
        project = provision_project(tmp / "project", n_sites=args.sites)
        fed = Federation(project)
        server_cpu: dict[int, float] = {}
        try:
            t0 = time.perf_counter()
            if args.profile:
                start_server_profiled(fed, project.server, server_profile)
            else:
                fed.start(project.server)
            t_server = time.perf_counter() - t0
            for site in project.sites:
                fed.start(site)
            t_sites = time.perf_counter() - t0 - t_server
            fed.wait_alive([s.name for s in project.sites])
            t_startup = time.perf_counter() - t0
            server_pid = fed.pid(project.server)

            recipe = FedAvgRecipe(
                name="round_overhead",
                model=model,
                train_script=Path(__file__),
                train_args=["--site", "--data_root", str(data_root), "--batch_size", str(args.batch_size),
                            "--val_samples", str(args.val_samples), *(["--profile"] if args.profile else [])],
                num_rounds=args.rounds,
                min_clients=args.sites,
            )
            folder = recipe.export(tmp / "job")
            rounds: list[RoundInfo] = []
            final: JobInfo | None = None
            with fed.session() as session:
                submitted = time.time()
                job_id = session.submit_job(folder)
                accepted = time.time()
                for event in session.watch_job(job_id):
                    if isinstance(event, RoundInfo):
                        server_cpu[event.round] = cpu_seconds(server_pid)
                        rounds.append(event)
                    else:
                        final = event
                finished_seen = time.time()
            job_log_path = project.server / "workspace" / "jobs" / job_id / "log.txt"
            job = parse_job_log(job_log_path.read_text(errors="replace"))
            sites = site_timings(list(project.sites), job_id)
            worker_ended = [t for kit in project.sites for t in daemon_times(kit, job_id, "worker ended")]
        finally:
            fed.close()
        print(load_line("after"), flush=True)
        assert final is not None
        if final.status != "FINISHED:COMPLETED" or len(rounds) < 2:
            print(f"job {job_id} ended {final.status}: {final.error}\n{job_log_path.read_text()[-3000:]}")
            return 1
        report(args, count_parameters(model), rounds, job, sites,
               startup=(t_startup, t_server, t_sites), submit=(submitted, accepted), finished_seen=finished_seen,
               end_time=final.end_time, worker_ended=worker_ended, server_cpu=server_cpu)
        if args.profile:
            print_profiles(project.sites[0], job_id, server_profile)
        if args.keep:
            print(f"kept: {tmp} (server job log: {job_log_path})")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def print_profiles(site_kit: Path, job_id: str, server_profile: Path) -> None:
    print(f"\nprofile of {site_kit.name}'s worker inside api.receive / api.send (all rounds; tottime):")
    print(site_profile(site_kit, job_id))
    deadline = time.monotonic() + 15
    while not server_profile.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if server_profile.exists():
        print("\nprofile of the server's main thread (event loop), whole run (tottime):")
        stats = pstats.Stats(str(server_profile))
        stats.sort_stats("tottime").print_stats(30)
        print("\n(cumulative):")
        stats.sort_stats("cumulative").print_stats(40)


def report(
    args: argparse.Namespace,
    params: int,
    rounds: list,
    job: JobLog,
    sites: dict[tuple[int, str], list[dict[str, float]]],
    *,
    startup: tuple[float, float, float],
    submit: tuple[float, float],
    finished_seen: float,
    end_time: float,
    worker_ended: list[float],
    server_cpu: dict[int, float],
) -> None:
    later = [r for r in rounds if r.round >= 2]
    reported = [r.seconds for r in later]
    cadence = [job.rounds[r.round + 1].sent - job.rounds[r.round].sent for r in later if r.round + 1 in job.rounds]
    last_round = max(job.rounds)
    last = job.rounds[last_round]
    median = statistics.median(reported)
    print()
    print(f"round overhead: {args.sites} sites, MLP {params:,} parameters, one step of batch {args.batch_size} "
          f"per round, evaluation on {args.val_samples} images per site, {len(rounds)} rounds"
          f"{' (PROFILED: figures inflated)' if args.profile else ''}")
    print(f"federation start-up (start_all): {startup[0]:6.2f} s   (server {startup[1]:.2f} s, "
          f"{args.sites} sites {startup[2]:.2f} s, until all alive {startup[0] - startup[1] - startup[2]:.2f} s)")
    print(f"submit -> round 1 dispatched:    {job.rounds[1].sent - submit[0]:6.2f} s   (upload + checks "
          f"{submit[1] - submit[0]:.2f} s, queued -> job started {job.starting - submit[1]:.2f} s, "
          f"deploy + workers up {job.ready - job.starting:.2f} s)")
    print(f"round 1:                         {rounds[0].seconds:6.3f} s   (warm-up; not in the figures below)")
    print(f"per round, rounds 2..{len(rounds)} (server's round time: dispatch -> evaluation metrics in)")
    print(f"  {summary(reported)}")
    print(f"per round, rounds 2..{len(rounds) - 1} (wall cadence: dispatch -> next round's dispatch, everything)")
    print(f"  {summary(cadence)}")
    end_task = [s["t"] for s in sites.get((0, "loop-end"), [])]
    at_exit = [s["t"] for s in sites.get((0, "exit"), [])]
    print(f"last round done -> FINISHED:     {end_time - last.done:6.2f} s   (as the admin saw it: "
          f"{finished_seen - last.done:.2f} s)")
    if end_task and at_exit and worker_ended:
        print(f"  last round done -> every worker left its loop  {max(end_task) - last.done:6.2f} s")
        print(f"  -> api shutdown done (atexit), slowest worker  {max(at_exit) - max(end_task):6.2f} s")
        print(f"  -> last worker process gone (daemon log)       {max(worker_ended) - max(at_exit):6.2f} s")
        print(f"  -> job recorded FINISHED (results, plots)      {end_time - max(worker_ended):6.2f} s")
    print()
    print(f"target: under {TARGET_SECONDS:.1f} s per round -> {'met' if median < TARGET_SECONDS else 'NOT met'} "
          f"(median {median:.3f} s)")
    print("reference figures (from our issue, measured on this kind of machine; not re-measured here):")
    for name, seconds in REFERENCE:
        print(f"  {name:<36} {seconds:5.1f} s per round   fedgrid is {seconds / median:6.1f}x faster")
    print()
    print(f"breakdown of a round (median over rounds 2..{len(rounds)}; server log has ms resolution):")
    for line in breakdown(job, sites, [r.round for r in later]):
        print(line)
    print(f"CPU per round (rounds 2..{last_round}, from /proc and the workers' process_time):")
    for line in cpu_lines(sites, server_cpu, 1, last_round):
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="FedAvg rounds (default 20)")
    parser.add_argument("--sites", type=int, default=4, help="sites (default 4)")
    parser.add_argument("--batch_size", type=int, default=32, help="the one training batch per round (default 32)")
    parser.add_argument("--val_samples", type=int, default=500, help="validation images per site (default 500)")
    parser.add_argument("--profile", action="store_true",
                        help="also run the server under cProfile and profile site-1's api calls; prints both")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project and logs")
    parser.add_argument("--site", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data_root", default="", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.site:
        site_main(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
