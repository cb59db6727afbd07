"""The job worker: one process per job at a site, alive for the whole job, running its training script.

The site daemon starts it with the job's folder; it imports torch once, sizes torch's thread pool so
that the workers sharing this machine do not oversubscribe its cores, and runs the script as
`__main__`. The script talks to the server through `fedclient.api`. A crash in the script ends this
process with the traceback in the job's log and a non-zero exit; the daemon reports it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import runpy
import signal
import sys
import traceback
from pathlib import Path

from fedgrid import allocator
from fedgrid.logs import setup_logging

log = logging.getLogger("fedclient.worker")


def _die_with_parent() -> None:
    """Ask Linux to end this worker if the site daemon that started it dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedclient.worker",
        description="Run one job's training script (started by the site daemon). With --wait, import "
        "torch first and read the job from standard input: the daemon keeps such a warm worker ready.",
    )
    parser.add_argument("--wait", action="store_true", help="start warm, then read the job as one JSON line")
    parser.add_argument("--kit", type=Path)
    parser.add_argument("--job-id")
    parser.add_argument("--job-dir", type=Path)
    parser.add_argument("--app")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nice", type=int, default=0, help="lower this worker's CPU priority by this much")
    parser.add_argument("--log", type=Path, help="with --wait: the job's log file, for stdout and stderr")
    args = parser.parse_args(argv)
    _die_with_parent()
    allocator.tune()
    os.nice(max(0, args.nice))  # first, so that every thread started later inherits it
    setup_logging(os.environ.get("FEDGRID_LOG_LEVEL", "INFO"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import gc

    import torch
    import torch._dynamo  # noqa: F401 - imported by the first optimizer otherwise, ~1.6 s inside round 1

    from fedclient import api
    from fedgrid.jobspec import load_job

    if args.wait:
        line = sys.stdin.readline()
        if not line.strip():
            return 0  # the daemon stopped without giving this worker a job
        for key, value in json.loads(line).items():
            setattr(args, key, Path(value) if key in ("kit", "job_dir", "log") else value)
        _redirect_output(args.log)
        os.chdir(args.job_dir)  # where a worker started for this job would have begun
    if not (args.kit and args.job_id and args.job_dir and args.app):
        parser.error("--kit, --job-id, --job-dir and --app are required (or --wait)")

    torch.set_num_threads(max(1, args.threads))
    spec = load_job(args.job_dir / "job")
    client = spec.clients[args.app]
    custom = args.job_dir / "job" / args.app / "custom"
    os.environ["FEDGRID_KIT"] = str(args.kit)
    os.environ["FEDGRID_JOB_ID"] = args.job_id
    os.environ["FEDGRID_JOB_DIR"] = str(args.job_dir)
    log.info(
        "job %s: running %s %s with %d torch threads", args.job_id, client.script, " ".join(client.args), args.threads
    )
    # Everything imported so far lives as long as the process: keep it out of the collector's way.
    gc.freeze()
    try:
        if client.is_module:
            module = client.script.removeprefix("module:")
            sys.argv = [module, *client.args]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            script = custom / client.script
            sys.path.insert(0, str(custom))
            os.chdir(custom)
            sys.argv = [str(script), *client.args]
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code:
            log.error("the training script exited with status %s", exc.code)
        api._shutdown()
        return code
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    api._shutdown()
    log.info("training script finished")
    return 0


def _redirect_output(path: Path | None) -> None:
    """Send this process's stdout and stderr (Python's and the C libraries') to the job's log."""
    if path is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown of torch (about 2 s of garbage collection): the job is done,
    # its results are sent and its logs flushed.
    os._exit(code)
