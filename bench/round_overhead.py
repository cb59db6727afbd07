"""What a FedAvg round costs when the training is nearly free: the framework's own overhead per round.

    python bench/round_overhead.py [--rounds 20] [--sites 4] [--val_samples 32] [--profile]
    python bench/round_overhead.py --compare DIR [--pairs 3] [options]   # another checkout and this one, alternating
    python bench/round_overhead.py --strategy scaffold [options]   # fedavg (default), fedprox, fedadam, scaffold

Provisions a throw-away project on loopback, starts a real federation from the kits' start.sh (server
and site daemons over mutual TLS; each job worker keeps one gRPC stream to the server) and runs one FedAvg
job of the 669,706-parameter MLP 784-512-512-10 on the prepared Fashion-MNIST split. Each site does ONE
optimizer step per round (one batch of --batch_size, SGD lr 0.01 momentum 0.9) and evaluates the new
global model on its first --val_samples validation images (by default one batch as well), so a round
is almost all framework: dispatch of the global model, upload of the updates, folding, the evaluation
task, checkpointing and bookkeeping. A larger --val_samples adds the sites' torch time (500 images add
about 85 ms of CPU per round on 2 cores, more than the framework's own work).

Printed:
- start-up of the federation (start_all), time from submit to round 1 (the job log's "workers ready"
  line and the first dispatch), per-round seconds over rounds 2..N (round 1 carries one-off warm-up),
  and the time from the last round to FINISHED, split by what happens in it;
- the reference figures of NVIDIA FLARE and Flower on this machine (from our issue, not measured
  here) with ratios;
- a breakdown of a round from the server's job log timestamps and the sites' own timing lines (same
  clock: everything runs on this machine), the CPU each process spent per round (from /proc), and
  the garbage collections in the workers;
- the machine's load: the load average before and after, and the CPU share other processes (not
  this federation) took during the rounds. Other work on the two cores shows up in every figure.

--hidden W shrinks or grows the MLP (784-W-W-10), to separate the fixed cost of a round from its
cost per byte of model. --profile also runs the server under cProfile (and prints its top
functions) and profiles site-1's calls into fedclient.api; the round figures are then inflated.

--strategy runs the same job under another strategy (fedprox mu 0.01, fedadam lr 0.01, scaffold), the
site's one step with that strategy's helpers (the proximal term; SCAFFOLD's correction and update), so
that a strategy's cost per round can be set beside FedAvg's: run it twice and compare the medians.

--compare DIR runs DIR's own copy of this benchmark on DIR's code (a checkout of another release, e.g.
`git worktree add /tmp/base <commit>`), then this checkout's, with the same options, alternating --pairs
times (default 3), and prints the median of each figure over each checkout's runs side by side, with
every run's figures: on a shared VM a run's median varies by 10-20% from one minute to the next.

This same file is the job's training script: the worker runs it with --site.
"""

from __future__ import annotations

import argparse
import atexit
import cProfile
import gc
import io
import json
import math
import os
import pstats
import re
import runpy
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGET_SECONDS = 0.1
REFERENCE = (
    ("NVIDIA FLARE 2.9", 2.5),
    ("Flower 1.42 (deployment mode, TLS)", 13.0),
)
"""Seconds per one-batch round of the other frameworks on this machine: figures from our issue, not re-measured."""
TIMING_MARK = "BENCH-TIMING "
STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {"name": "fedavg"},
    "fedprox": {"name": "fedprox", "mu": 0.01},
    "fedadam": {"name": "fedopt", "optimizer": "adam", "server_lr": 0.01},
    "scaffold": {"name": "scaffold"},
}

Timings = dict[tuple[int, str], list[dict[str, Any]]]
"""(round, task kind) -> one timing record per site; records without a round are filed under round 0."""


# ---------------------------------------------------------------------------------------------- site side


def watch_gc() -> list[tuple[float, int, float]]:
    """Record every garbage collection of this process as (wall-clock start, generation, seconds)."""
    events: list[tuple[float, int, float]] = []
    started = [0.0, 0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[:] = [time.time(), time.perf_counter()]
        else:
            events.append((started[0], info["generation"], time.perf_counter() - started[1]))

    gc.callbacks.append(on_gc)
    return events


def emit(record: dict[str, Any]) -> None:
    print(TIMING_MARK + json.dumps(record), flush=True)


def site_main(args: argparse.Namespace) -> None:
    """The training script: one SGD step per train task, evaluation on a small validation slice.

    Prints one timing line per task (wall clock, same machine as the server) so that the driver can
    split a round into dispatch, site compute and upload.
    """
    import torch

    from fedclient import api
    from fedgrid.data import load_site
    from fedgrid.models import MLP
    from fedgrid.training import evaluate, make_loader

    api.init()
    site = api.get_site_name()
    data = load_site(Path(args.data_root) / site)
    torch.manual_seed(args.seed)
    model = MLP(hidden=args.hidden)
    batch = next(iter(make_loader(data.x_train, data.y_train, args.batch_size, shuffle=True, seed=args.seed)))
    val_loader = make_loader(data.x_val[: args.val_samples], data.y_val[: args.val_samples], 1000, shuffle=False)
    loss_fn = torch.nn.CrossEntropyLoss()
    loss_fn(model(batch[0]), batch[1]).backward()  # warm autograd up before round 1, like any real script would
    atexit.register(lambda: emit({"site": site, "kind": "exit", "t": time.time()}))
    collections = watch_gc()
    profile = cProfile.Profile() if args.profile else None
    while api.is_running():
        asked = time.time()
        if profile is not None:
            profile.enable()
        task = api.receive()
        if profile is not None:
            profile.disable()
        if task is None:
            break
        got, cpu = time.time(), time.thread_time()
        model.load_state_dict(task.params)
        if task.is_evaluate:
            loss, accuracy = evaluate(model, val_loader)
            computed, cpu = time.time(), time.thread_time() - cpu
            if profile is not None:
                profile.enable()
            api.send(metrics={"accuracy": accuracy, "loss": loss}, num_samples=len(val_loader.y))
        else:
            model.train()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(batch[0]), batch[1])
            (loss + api.proximal_term(model, task)).backward()
            api.scaffold_correction(model, task)
            optimizer.step()
            api.scaffold_update(model, task, lr=0.01)
            train_loss = loss.item()
            computed, cpu = time.time(), time.thread_time() - cpu
            if profile is not None:
                profile.enable()
            api.send(model.state_dict(), num_samples=len(data.y_train), metrics={"train_loss": train_loss})
        if profile is not None:
            profile.disable()
        emit(
            {
                "site": site,
                "round": task.current_round,
                "kind": task.kind,
                "asked": asked,
                "got": got,
                "computed": computed,
                "sent": time.time(),
                "compute_cpu": cpu,
            }
        )
    if profile is not None:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue(), flush=True)
    emit({"site": site, "kind": "loop-end", "t": time.time(), "gc": collections})


def serve_profiled(out: str, argv: list[str]) -> None:
    """Run the server daemon under cProfile, recording its garbage collections; both written at exit.

    Started as `round_overhead.py --profiled-server OUT -m fedserver --kit KIT`, so that the kit's
    stop.sh still recognises (and stops) it.
    """
    collections = watch_gc()
    sys.argv = ["fedserver", *argv[argv.index("--kit") :]]
    profile = cProfile.Profile()
    try:
        profile.runcall(runpy.run_module, "fedserver", run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    finally:
        profile.dump_stats(out)
        Path(out + ".gc.json").write_text(json.dumps(collections))


# ---------------------------------------------------------------------------------------------- logs and /proc


@dataclass
class RoundLog:
    """Timestamps (epoch seconds) of one round, from the server's job log."""

    sent: float = math.nan
    folded: list[float] = field(default_factory=list)
    done: float = math.nan


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
            r = job.rounds[int(head.rstrip(":").split("/")[0])]
            if rest.startswith("model sent"):
                r.sent = t
            elif "folded in" in rest:
                r.folded.append(t)
            elif rest.startswith("done in"):
                r.done = t
    return job


def site_timings(kits: list[Path], job_id: str) -> Timings:
    """The sites' timing lines, read from each site's job log on this machine."""
    out: Timings = defaultdict(list)
    for kit in kits:
        path = kit / "workspace" / "jobs" / job_id / "log.txt"
        for line in path.read_text(errors="replace").splitlines() if path.exists() else ():
            if line.startswith(TIMING_MARK):
                item = json.loads(line[len(TIMING_MARK) :])
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


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine spent so far (all cores; idle and iowait excluded)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuSample:
    """CPU seconds so far of each process group of the federation, and of the whole machine."""

    wall: float
    server: float
    daemons: float
    workers: float
    machine: float


def sample_cpu(server: int, daemons: list[int], workers: list[int]) -> CpuSample:
    from _procstat import cpu_seconds  # here, not at the top: this file is also the job's script, shipped alone

    return CpuSample(
        time.time(),
        cpu_seconds(server),
        sum(map(cpu_seconds, daemons)),
        sum(map(cpu_seconds, workers)),
        machine_busy_seconds(),
    )


# ---------------------------------------------------------------------------------------------- figures


def p90(values: list[float]) -> float:
    """Nearest-rank 90th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (
        f"median {statistics.median(values) * 1000:7.1f} ms   min {min(values) * 1000:7.1f} ms   "
        f"p90 {p90(values) * 1000:7.1f} ms"
    )


def load_line(when: str) -> str:
    one, five, _ = os.getloadavg()
    return (
        f"machine load {when}: {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores "
        "(load averages lag and include this benchmark's own processes)"
    )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def breakdown(job: JobLog, sites: Timings, rounds: list[int]) -> dict[str, float]:
    """Median over `rounds` of each phase of a round, in the order they happen.

    A round's task brings the previous round's model: each site first evaluates it (answering with
    `api.send`, which only holds the metrics), then trains on it; the update carries both answers.
    """
    phases: dict[str, list[float]] = defaultdict(list)
    for n in rounds:
        r, nxt = job.rounds[n], job.rounds.get(n + 1)
        train, evaluation = sites.get((n, "train"), []), sites.get((n - 1, "evaluate"), [])
        if not r.folded or not train:
            continue
        folded = sorted(r.folded)
        got = sorted(s["got"] for s in (evaluation or train))
        phases["dispatched -> first site holds the model"].append(got[0] - r.sent)
        phases["dispatched -> last site holds the model"].append(got[-1] - r.sent)
        if evaluation:
            phases["site: load_state_dict + evaluate it (median site)"].append(
                statistics.median(s["computed"] - s["got"] for s in evaluation)
            )
        phases["site: load_state_dict + one SGD step (median site)"].append(
            statistics.median(s["computed"] - s["got"] for s in train)
        )
        phases["site: api.send of the update and metrics (median site)"].append(
            statistics.median(s["sent"] - s["computed"] for s in train)
        )
        phases["server: dispatched -> first update folded"].append(folded[0] - r.sent)
        phases["server: first -> last update folded"].append(folded[-1] - folded[0])
        if nxt is not None and not math.isnan(nxt.sent):
            phases["server: last fold -> next round dispatched (aggregate)"].append(nxt.sent - folded[-1])
    return {name: statistics.median(v) for name, v in phases.items()}


def cpu_lines(first: CpuSample, last: CpuSample, rounds: int, sites: Timings, window: tuple[float, float]) -> list[str]:
    """CPU per round by process group between two samples, the torch share, and other processes' share."""
    server = (last.server - first.server) / rounds
    daemons = (last.daemons - first.daemons) / rounds
    workers = (last.workers - first.workers) / rounds
    torch_cpu = (
        sum(
            s.get("compute_cpu", 0.0)
            for (r, kind), items in sites.items()
            if kind in ("train", "evaluate")
            for s in items
            if window[0] <= s["got"] <= window[1]
        )
        / rounds
    )
    ours = server + daemons + workers
    cores = os.cpu_count() or 1
    others = (last.machine - first.machine) / rounds - ours
    elapsed = (last.wall - first.wall) / rounds
    return [
        f"  server daemon{'':<45} {ms(server)}",
        f"  job workers, all sites{'':<36} {ms(workers)}",
        f"    of which torch (load_state_dict, SGD step, evaluation){'':<2} {ms(torch_cpu)}",
        f"    of which everything else (api, gRPC, TLS, GC, ...){'':<6} {ms(workers - torch_cpu)}",
        f"  site daemons{'':<46} {ms(daemons)}",
        f"  total / {cores} cores = lower bound on the round's wall time{'':<4} {ms(ours / cores)}",
        f"  other processes on this machine meanwhile: {max(0.0, others) / (elapsed * cores):.0%} of its CPU",
    ]


def gc_line(events: list[list[float]], window: tuple[float, float]) -> str:
    """Garbage collections (start, generation, seconds) inside `window`, by generation."""
    parts = []
    for gen in (0, 1, 2):
        times = [e[2] for e in events if e[1] == gen and window[0] <= e[0] <= window[1]]
        longest = max(times, default=0.0)
        parts.append(f"gen {gen}: {len(times)} ({sum(times) * 1000:.0f} ms, longest {longest * 1000:.0f} ms)")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------- driver


def start_server_profiled(fed: Any, kit: Path, out: Path) -> None:
    """Start the server daemon under cProfile (instead of start.sh), such that stop.sh still stops it."""
    from federation import ENV

    ready = kit / "daemon.ready"
    ready.unlink(missing_ok=True)
    with open(kit / "log.txt", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, __file__, "--profiled-server", str(out), "-m", "fedserver", "--kit", str(kit)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=ENV,
        )
    (kit / "daemon.pid").write_text(str(process.pid))
    fed.running.append(kit)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the profiled server did not start; see {kit / 'log.txt'}")
        time.sleep(0.05)


@dataclass
class Measured:
    """Everything one run of the job yields, for `report`."""

    job_id: str
    rounds: list[Any]
    final: Any
    job: JobLog
    sites: Timings
    startup: tuple[float, float, float]
    submitted: float
    accepted: float
    finished_seen: float
    worker_ended: list[float]
    cpu: dict[int, CpuSample]


def run_job(args: argparse.Namespace, tmp: Path, server_profile: Path) -> Measured:
    """Provision, start the federation, run the job, stop everything; return what was measured."""
    from _procstat import children  # here, not at the top: this file is also the job's script, shipped alone
    from conftest import provision_project
    from federation import Federation

    from fedgrid.jobcli import ensure_data
    from fedgrid.models import MLP
    from fedgrid.recipe import FedAvgRecipe
    from fedgrid.serde import RoundInfo

    data_root = ensure_data(argparse.Namespace(alpha=0.0, n_clients=args.sites, data_root=None, seed=42))
    project = provision_project(tmp / "project", n_sites=args.sites)
    fed = Federation(project)
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
        startup = (time.perf_counter() - t0, t_server, t_sites)

        site_args = [
            "--site",
            "--data_root",
            str(data_root),
            "--batch_size",
            str(args.batch_size),
            "--val_samples",
            str(args.val_samples),
            "--hidden",
            str(args.hidden),
        ]
        site_args += ["--profile"] * args.profile
        recipe = FedAvgRecipe(
            strategy=STRATEGIES[args.strategy],
            name="round_overhead",
            model=MLP(hidden=args.hidden),
            train_script=Path(__file__),
            train_args=site_args,
            num_rounds=args.rounds,
            min_clients=args.sites,
        )
        folder = recipe.export(tmp / "job")
        server = fed.pid(project.server)
        daemons = [fed.pid(s) for s in project.sites]
        workers: list[int] = []
        rounds, final, cpu = [], None, {}
        # A federation that has been up a moment: each site's next worker has imported torch already.
        time.sleep(args.settle)
        with fed.session() as session:
            submitted = time.time()
            job_id = session.submit_job(folder)
            accepted = time.time()
            for event in session.watch_job(job_id):
                if isinstance(event, RoundInfo):
                    workers = workers or [w for d in daemons for w in children(d)]
                    cpu[event.round] = sample_cpu(server, daemons, workers)
                    rounds.append(event)
                else:
                    final = event
            finished_seen = time.time()
        job = parse_job_log((project.server / "workspace" / "jobs" / job_id / "log.txt").read_text(errors="replace"))
        sites = site_timings(list(project.sites), job_id)
        worker_ended = [t for kit in project.sites for t in daemon_times(kit, job_id, "worker ended")]
        if args.profile:
            print(f"\nprofile of {project.sites[0].name}'s worker inside api.receive / api.send (all rounds):")
            print(site_profile(project.sites[0], job_id))
    finally:
        fed.close()
    return Measured(job_id, rounds, final, job, sites, startup, submitted, accepted, finished_seen, worker_ended, cpu)


def print_server_profile(server_profile: Path) -> None:
    deadline = time.monotonic() + 15
    while not server_profile.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    gc_file = Path(str(server_profile) + ".gc.json")
    if gc_file.exists():
        events = json.loads(gc_file.read_text())
        print(f"\nserver garbage collections, whole run: {gc_line(events, (0.0, math.inf))}")
    if server_profile.exists():
        print("\nprofile of the server's main thread (the event loop), whole run:")
        stats = pstats.Stats(str(server_profile))
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(35)


def report(args: argparse.Namespace, m: Measured) -> None:
    from fedgrid.models import MLP, count_parameters

    job, rounds = m.job, m.rounds
    later = [r for r in rounds if r.round >= 2]
    reported = [r.seconds for r in later]
    cadence = [job.rounds[r.round + 1].sent - job.rounds[r.round].sent for r in later if r.round + 1 in job.rounds]
    last_round = max(job.rounds)
    last = job.rounds[last_round]
    # Each round's evaluation rides on the next round's task, so a round is best measured from one
    # dispatch to the next (the job's records stop at the aggregate and leave out the dispatch).
    median = statistics.median(cadence) if cadence else statistics.median(reported)
    print()
    print(
        f"round overhead ({args.strategy}): {args.sites} sites, MLP 784-{args.hidden}-{args.hidden}-10 "
        f"({count_parameters(MLP(hidden=args.hidden)):,} parameters), one step of "
        f"batch {args.batch_size} per round, evaluation on {args.val_samples} images per site, {len(rounds)} rounds"
        f"{' (PROFILED: figures inflated)' if args.profile else ''}"
    )
    total, t_server, t_sites = m.startup
    print(
        f"federation start-up (start_all):  {total:6.2f} s   (server {t_server:.2f} s, {args.sites} sites "
        f"{t_sites:.2f} s one after the other, then all alive after {total - t_server - t_sites:.2f} s)"
    )
    print(
        f"submit -> round 1 dispatched:     {job.rounds[1].sent - m.submitted:6.2f} s   (upload + checks "
        f"{m.accepted - m.submitted:.2f} s, queued -> started {job.starting - m.accepted:.2f} s, deploy + "
        f"workers up ('workers ready') {job.ready - job.starting:.2f} s)"
    )
    print(f"round 1:                          {rounds[0].seconds:6.3f} s   (warm-up; not in the figures below)")
    print(f"seconds per round, rounds 2..{len(rounds) - 1} (dispatch -> next dispatch, everything):")
    print(f"  {summary(cadence)}")
    print(f"  (the job's own round records, dispatch -> aggregate: {summary(reported)})")
    print(
        f"last round done -> FINISHED:      {m.final.end_time - last.done:6.2f} s   (as the admin saw it: "
        f"{m.finished_seen - last.done:.2f} s)"
    )
    loop_end = [s["t"] for s in m.sites.get((0, "loop-end"), [])]
    at_exit = [s["t"] for s in m.sites.get((0, "exit"), [])]
    if loop_end and at_exit and m.worker_ended:
        print(f"  -> every worker told the job is over           {max(loop_end) - last.done:6.2f} s")
        print(f"  -> fedclient.api shut down (atexit), slowest   {max(at_exit) - max(loop_end):6.2f} s")
        print(f"  -> last worker process gone (daemon log)       {max(m.worker_ended) - max(at_exit):6.2f} s")
        print(f"  -> job recorded FINISHED (results, plots)      {m.final.end_time - max(m.worker_ended):6.2f} s")
    print()
    print(
        f"target: under {TARGET_SECONDS:.1f} s per round -> {'met' if median < TARGET_SECONDS else 'NOT met'} "
        f"(median {median:.3f} s)"
    )
    print("reference figures (from our issue, measured on this kind of machine; not re-measured here):")
    for name, seconds in REFERENCE:
        print(f"  {name:<36} {seconds:5.1f} s per round   fedgrid's median is {seconds / median:5.1f}x shorter")
    print()
    print(
        f"breakdown of a round (the server log has ms resolution){'':<10}  round 1   rounds 2..{len(rounds)} (median)"
    )
    first, steady = breakdown(job, m.sites, [1]), breakdown(job, m.sites, [r.round for r in later])
    for name, value in steady.items():
        print(f"  {name:<58} {ms(first.get(name, math.nan))} {ms(value)}")
    window = (job.rounds[2].sent, last.done) if 2 in job.rounds else (last.sent, last.done)
    events = [e for s in m.sites.get((0, "loop-end"), []) for e in s.get("gc", [])]
    print(f"garbage collections in the workers, round 1: {gc_line(events, (job.rounds[1].sent, window[0]))}")
    print(f"garbage collections in the workers, rounds 2..{last_round}: {gc_line(events, window)}")
    if 1 in m.cpu and last_round in m.cpu and last_round > 1:
        print(f"CPU per round (rounds 2..{last_round}, from /proc):")
        for line in cpu_lines(m.cpu[1], m.cpu[last_round], last_round - 1, m.sites, window):
            print(line)


def run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    print(load_line("before"), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="fedgrid-round-overhead-"))
    server_profile = tmp / "server.prof"
    try:
        m = run_job(args, tmp, server_profile)
        print(load_line("after"), flush=True)
        if m.final is None or m.final.status != "FINISHED:COMPLETED" or len(m.rounds) < 2:
            error = m.final.error if m.final is not None else "no final status"
            print(f"job {m.job_id} did not complete: {error}")
            return 1
        report(args, m)
        if args.profile:
            print_server_profile(server_profile)
        if args.keep:
            print(f"kept: {tmp}")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def figures(printout: str) -> dict[str, float]:
    """Seconds per round (median, p90) and CPU per round, in ms, from a printout of this benchmark."""
    found: dict[str, float] = {}
    lines = printout.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("seconds per round, rounds 2..") and index + 1 < len(lines):
            numbers = re.findall(r"(median|p90)\s+([\d.]+) ms", lines[index + 1])
            found.update({name: float(value) for name, value in numbers})
        for name in ("server daemon", "job workers, all sites", "site daemons"):
            if line.strip().startswith(name):
                found["cpu"] = found.get("cpu", 0.0) + float(re.findall(r"([\d.]+) ms", line)[-1])
    return found


def _without(argv: list[str], option: str) -> list[str]:
    """`argv` without `option` and its value (either form: `--option V` or `--option=V`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def compare(other: Path, argv: list[str], pairs: int) -> int:
    """Run `other`'s benchmark and this one with the same options, alternating `pairs` times (other, this,
    other, ...) so that a machine getting faster or slower weighs on both; print both side by side."""
    results: dict[str, list[dict[str, float]]] = {"other": [], "this": []}
    for pair in range(1, pairs + 1):
        for name, root in (("other", other.resolve()), ("this", ROOT)):
            print(f"\n==== {name} checkout: {root} (run {pair} of {pairs})", flush=True)
            env = dict(os.environ, PYTHONPATH=str(root))
            run = subprocess.run(
                [sys.executable, str(root / "bench" / "round_overhead.py"), *argv],
                env=env,
                cwd=root,  # python -m puts the working folder first on the path: each run imports its own code
                text=True,
                capture_output=True,
            )
            print(run.stdout[-6000:], run.stderr[-2000:], flush=True)
            if run.returncode != 0:
                print(f"{name} checkout: the benchmark failed (exit {run.returncode})")
                return 1
            results[name].append(figures(run.stdout))
    print(f"\n{'':34} {'this checkout':>14} {'other checkout':>15} {'ratio':>7}   (median of {pairs} runs each)")
    for key, label in (
        ("median", "seconds per round, median (ms)"),
        ("p90", "seconds per round, p90 (ms)"),
        ("cpu", "CPU per round, all processes (ms)"),
    ):
        mine = statistics.median(r.get(key, math.nan) for r in results["this"])
        theirs = statistics.median(r.get(key, math.nan) for r in results["other"])
        runs = ", ".join(
            f"{a.get(key, math.nan):.0f}/{b.get(key, math.nan):.0f}"
            for a, b in zip(results["this"], results["other"], strict=True)
        )
        print(f"{label:34} {mine:14.1f} {theirs:15.1f} {mine / theirs:7.2f}   runs (this/other): {runs}")
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--profiled-server"]:
        serve_profiled(sys.argv[2], sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="FedAvg rounds (default 20)")
    parser.add_argument("--sites", type=int, default=4, help="sites (default 4)")
    parser.add_argument("--batch_size", type=int, default=32, help="the one training batch per round (default 32)")
    parser.add_argument(
        "--val_samples", type=int, default=32, help="validation images per site (default 32: one batch)"
    )
    parser.add_argument(
        "--hidden",
        type=int,
        default=512,
        help="width of the MLP's hidden layers (default 512: 669,706 parameters); smaller separates "
        "the per-round cost from the per-byte cost",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the server under cProfile and profile site-1's api calls; print both",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=15.0,
        help="seconds between start-up and submit (default 15: a running federation, whose sites have a worker "
        "ready; 0: submit the moment the sites are up, as scripts/quickstart.sh does)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary project and logs")
    parser.add_argument("--strategy", default="fedavg", choices=sorted(STRATEGIES), help="the job's strategy")
    parser.add_argument("--compare", type=Path, help="another checkout to run first and compare with (see above)")
    parser.add_argument("--pairs", type=int, default=3, help="with --compare: runs of each checkout, alternating")
    parser.add_argument("--site", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data_root", default="", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.site:
        site_main(args)
        return 0
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (round 1 is warm-up)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that a kill stops the federation it started
    if args.compare is not None:
        argv = _without(_without(sys.argv[1:], "--compare"), "--pairs")
        return compare(args.compare, argv, args.pairs)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
