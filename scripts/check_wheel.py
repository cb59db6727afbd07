"""Build fedgrid's wheel, install it into a fresh environment outside the checkout, and run a job with it.

    .venv/bin/python scripts/check_wheel.py [--keep]

What a user who only has the wheel does, from a temporary folder where no file of the checkout is on
the Python path:
 1. build an sdist of the checkout and the wheel from that sdist (`python -m build`);
 2. make a virtual environment, install torch==2.13.0 (CPU) and then the wheel with constraints.txt,
    without extras (what a site or an admin installs);
 3. check that fedgrid, fedserver, fedclient and provision are imported from that environment;
 4. `fedgrid provision` a project on free loopback ports (a server, 2 sites, an admin) into ./workspaces,
    and `fedgrid data` a 2-site Fashion-MNIST split into ./data;
 5. start the server and the sites with their kits' startup/start.sh, FEDGRID_PYTHON set to that environment;
 6. run the example FedAvg job (the packaged training script, 1 round on a few batches) with the
    kits and data found in the current folder: it must end FINISHED:COMPLETED;
 7. submit, with `fedgrid admin`, a job that asks for TensorBoard tracking: the server, installed
    without the tensorboard extra, must refuse it and name `fedgrid[tensorboard]`;
 8. stop the daemons with their kits' startup/stop.sh and remove the temporary folder (--keep keeps it).

Each step is printed with its duration; a failing step prints the command, its output and the daemons'
logs, and the script exits 1. It uses only the standard library, so any Python 3.11 can run it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
PROJECT = "wheel_check"
SITES = ("site-1", "site-2")
ADMIN = "admin@wheel.example"

# Run by the environment's python with -c from the run folder: sys.path[0] is that folder, nothing else
# of ours is on the path but what the wheel installed.
WHERE_FROM = """
import sys
from pathlib import Path
import fedclient, fedgrid, fedserver, provision
prefix = Path(sys.prefix).resolve()
for module in (fedgrid, fedserver, fedclient, provision):
    where = Path(module.__file__).resolve()
    assert where.is_relative_to(prefix), f"{module.__name__} is imported from {where}, not from {prefix}"
    print(f"{module.__name__}: {where.parent}")
outside = [p for p in sys.path if p and Path(p).resolve().is_relative_to(Path(sys.argv[1]))]
assert not outside, f"the checkout is on sys.path: {outside}"
"""

JOB = """
import argparse, sys
from fedgrid.jobcli import add_common_args, fashion_mnist_recipe, main_guard, run_recipe
parser = argparse.ArgumentParser()
parser.add_argument("--tensorboard", action="store_true")
add_common_args(parser)
args = parser.parse_args(sys.argv[1:])
recipe = fashion_mnist_recipe("wheel_check", args)
if args.tensorboard:
    recipe.add_experiment_tracking("tensorboard")
main_guard(lambda: run_recipe(recipe, args))
"""

JOB_ARGS = ["--n_clients", "2", "--num_rounds", "1", "--max_samples", "512", "--batch_size", "64"]


class CheckFailed(Exception):
    pass


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 a moment ago, for the project file of the check's
    federation: the sockets are bound to port 0 and closed at once, nothing is sent over them (the daemons
    talk gRPC)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def clean_env(venv: Path) -> dict[str, str]:
    """The user's environment with the fresh venv first on PATH, and nothing pointing at the checkout."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSAFEPATH")
    }
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not Path(p).resolve().is_relative_to(ROOT)]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    env["VIRTUAL_ENV"] = str(venv)
    env["FEDGRID_PYTHON"] = str(venv / "bin" / "python")
    env["FEDGRID_START_TIMEOUT"] = "60"
    return env


class Check:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.venv = tmp / "venv"
        self.run_dir = tmp / "run"
        self.env = clean_env(self.venv)
        self.started: list[Path] = []
        self.began = time.monotonic()

    def step(self, what: str) -> None:
        print(f"== [{time.monotonic() - self.began:5.1f} s] {what}", flush=True)

    def sh(self, args: Sequence[str | Path], *, cwd: Path | None = None, timeout: float = 600, expect: int = 0) -> str:
        """Run a command; its output is shown only when it does not exit with `expect`."""
        args = [str(a) for a in args]
        try:
            result = subprocess.run(
                args,
                cwd=cwd or self.run_dir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise CheckFailed(f"{' '.join(args)} did not finish within {timeout:.0f} s") from exc
        if result.returncode != expect:
            raise CheckFailed(
                f"{' '.join(args)} exited with {result.returncode}, expected {expect}\n"
                f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
            )
        return result.stdout

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def fedgrid(self) -> Path:
        return self.venv / "bin" / "fedgrid"

    def kit(self, name: str) -> Path:
        return self.run_dir / "workspaces" / PROJECT / "prod_00" / name

    def build(self) -> Path:
        self.step("building the sdist and, from it, the wheel (python -m build)")
        dist = self.tmp / "dist"
        self.sh([sys.executable, "-m", "build", "--outdir", dist, ROOT], cwd=self.tmp)
        wheels = sorted(dist.glob("fedgrid-*.whl"))
        if len(wheels) != 1:
            raise CheckFailed(f"expected one fedgrid wheel in {dist}, found {[w.name for w in wheels]}")
        print(f"   {wheels[0].name}")
        return wheels[0]

    def install(self, wheel: Path) -> None:
        self.step(f"installing {TORCH} (CPU), then the wheel with constraints.txt, into a fresh {self.venv}")
        self.sh([sys.executable, "-m", "venv", self.venv], cwd=self.tmp)
        pip = [self.python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        self.sh([*pip, TORCH], cwd=self.tmp)
        self.sh([*pip, "-c", ROOT / "constraints.txt", wheel], cwd=self.tmp)
        print("   " + self.sh([self.fedgrid, "version"], cwd=self.tmp).strip())

    def check_imports(self) -> None:
        self.step(f"checking that fedgrid comes from the environment, run from {self.run_dir}")
        for line in self.sh([self.python, "-c", WHERE_FROM, ROOT]).splitlines():
            print(f"   {line}")

    def provision(self) -> None:
        self.step("fedgrid provision: a server, 2 sites and an admin on free loopback ports")
        fed_port, admin_port, data_port = free_ports(3)
        server = {
            "name": "server",
            "type": "server",
            "org": "wheel",
            "host": "127.0.0.1",
            "fed_port": fed_port,
            "admin_port": admin_port,
            "data_port": data_port,
        }
        project = {
            "api_version": 1,
            "name": PROJECT,
            "description": "the project of scripts/check_wheel.py",
            "participants": [
                server,
                *({"name": site, "type": "client", "org": "wheel"} for site in SITES),
                {"name": ADMIN, "type": "admin", "org": "wheel", "role": "project_admin"},
            ],
        }
        (self.run_dir / "workspaces").mkdir()
        (self.run_dir / "workspaces" / "project.yml").write_text(json.dumps(project, indent=2))  # JSON is YAML
        self.sh([self.fedgrid, "provision", "-p", "workspaces/project.yml"])
        self.step("fedgrid data: Fashion-MNIST split over the 2 sites")
        self.sh([self.fedgrid, "data", "-n", "2", "--out", "data/fashion-mnist-iid-2"])

    def start(self) -> None:
        for name in ("server", *SITES):
            self.step(f"starting {name} with its kit's startup/start.sh")
            self.started.append(self.kit(name))
            print(f"   {self.sh([self.kit(name) / 'startup' / 'start.sh'], timeout=120).strip()}")

    def run_job(self) -> None:
        self.step("running the example job from the installed package: 1 round, 2 sites")
        out = self.sh([self.python, "-c", JOB, *JOB_ARGS], timeout=600)
        for line in out.splitlines():
            print(f"   {line}")
        if "job FINISHED:COMPLETED" not in out:
            raise CheckFailed(f"the job did not end FINISHED:COMPLETED:\n{out}")

    def tensorboard_refused(self) -> None:
        self.step("fedgrid admin submit_job of a TensorBoard job: refused, the server has no tensorboard extra")
        self.sh([self.python, "-c", JOB, "--tensorboard", "--export_only", "tb_job", *JOB_ARGS])
        out = self.sh([self.fedgrid, "admin", "--kit", self.kit(ADMIN), "-c", "submit_job tb_job"], expect=1)
        if "pip install 'fedgrid[tensorboard]'" not in out:
            raise CheckFailed(f"the refusal does not name fedgrid[tensorboard]:\n{out}")
        print(f"   {out.strip().splitlines()[-1]}")

    def stop(self) -> None:
        for kit in reversed(self.started):
            self.step(f"stopping {kit.name} with its kit's startup/stop.sh")
            print(f"   {self.sh([kit / 'startup' / 'stop.sh'], timeout=60).strip()}")
            self.started.remove(kit)

    def stop_quietly(self) -> None:
        for kit in reversed(self.started):
            subprocess.run([str(kit / "startup" / "stop.sh")], env=self.env, capture_output=True, timeout=60)

    def logs(self) -> str:
        parts = []
        for name in ("server", *SITES):
            log = self.kit(name) / "log.txt"
            if log.exists():
                parts.append(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)
    if not FASHION_MNIST.exists():
        print(f"check_wheel: {FASHION_MNIST} is missing: run scripts/setup.sh as root first", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="fedgrid-wheel-"))
    if tmp.resolve().is_relative_to(ROOT):
        print(f"check_wheel: the temporary folder {tmp} is inside the checkout; set TMPDIR elsewhere", file=sys.stderr)
        return 1
    check = Check(tmp)
    check.run_dir.mkdir()
    print(f"check_wheel: working in {tmp}")
    try:
        check.install(check.build())
        check.check_imports()
        check.provision()
        check.start()
        check.run_job()
        check.tensorboard_refused()
        check.stop()
    except CheckFailed as exc:
        print(f"check_wheel: FAILED: {exc}", file=sys.stderr)
        print(check.logs(), file=sys.stderr)
        return 1
    finally:
        check.stop_quietly()
        if args.keep:
            print(f"check_wheel: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    check.step("passed: the wheel installs and runs a job outside the checkout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
