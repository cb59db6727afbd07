"""The `fedgrid` command, run as a user runs it: the installed console script, in subprocesses."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import provision_project
from federation import ENV, wait_until

import fedgrid
from fedgrid.cli import COMMANDS

FEDGRID = Path(sys.executable).with_name("fedgrid")
BIN = Path(sys.executable).parent

# Each command of `fedgrid` and the tool it stands for, under the tool's own name.
SAME_AS = {
    "provision": "provision",
    "admin": "fedadmin",
    "data": "prepare-data",
    "server": "fedserver",
    "site": "fedclient",
}


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(FEDGRID), *args], env=ENV, capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_lists_every_command_on_one_line() -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in ("provision", "admin", "data", "server", "site", "simulate", "version"):
        assert sum(line.split()[:1] == [name] for line in lines) == 1, f"{name} not on one line of:\n{result.stdout}"
    assert set(COMMANDS) == {"provision", "admin", "data", "server", "site", "simulate", "version"}


@pytest.mark.parametrize("command", sorted(SAME_AS))
def test_command_help_is_the_tools_own(command: str) -> None:
    ours = run(command, "--help")
    theirs = subprocess.run([str(BIN / SAME_AS[command]), "--help"], env=ENV, capture_output=True, text=True)
    assert ours.returncode == theirs.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout and "--help" in ours.stdout


def test_version_names_fedgrid_torch_and_where_it_is_installed() -> None:
    import torch

    for result in (
        run("version"),
        subprocess.run([sys.executable, "-m", "fedgrid", "version"], capture_output=True, text=True),
    ):
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"fedgrid {fedgrid.__version__} (torch {torch.__version__}, python ")
        assert str(Path(fedgrid.__file__).parent) in result.stdout


def test_unknown_or_missing_command_is_a_usage_error() -> None:
    unknown = run("frobnicate", "--kit", "x")
    assert unknown.returncode == 2
    assert "unknown command 'frobnicate'; choose from provision, server, site, admin, data" in unknown.stderr
    bare = run()
    assert bare.returncode == 2 and "usage: fedgrid <command>" in bare.stderr
    assert run("version", "--verbose").returncode == 2


def test_simulate_is_the_simulator(tmp_path: Path) -> None:
    result = run("simulate", str(tmp_path / "no-such-job"), "-n", "2")
    assert result.returncode == 2
    assert result.stderr == f"fedgrid-sim: error: {tmp_path / 'no-such-job'}: not a folder\n"


def test_data_errors_come_from_the_tool(tmp_path: Path) -> None:
    result = run("data", "-n", "2", "-p", "non-iid-11", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr == "prepare-data: error: K must be between 1 and 10 (the number of classes), got 11\n"
    assert not (tmp_path / "out").exists()


def test_provision_server_site_and_admin_through_fedgrid(tmp_path: Path) -> None:
    """Kits from `fedgrid provision`, daemons from `fedgrid server`/`fedgrid site`, a status from `fedgrid admin`."""
    template = provision_project(tmp_path / "template", n_sites=1)
    result = run("provision", "-p", str(template.project_file), "-w", str(tmp_path / "ws"))
    assert result.returncode == 0, result.stderr
    prod = tmp_path / "ws" / template.name / "prod_00"
    server, site, admin = (prod / kit.name for kit in (template.server, template.sites[0], template.admins[0]))
    assert (server / "startup" / "start.sh").is_file() and (admin / "startup" / "fl_admin.sh").is_file()

    daemons: list[subprocess.Popen[bytes]] = []
    try:
        for kind, kit in (("server", server), ("site", site)):
            with open(tmp_path / f"{kind}.log", "wb") as log:
                daemons.append(
                    subprocess.Popen([str(FEDGRID), kind, "--kit", str(kit)], env=ENV, stdout=log, stderr=log)
                )
            wait_until(lambda kit=kit: (kit / "daemon.ready").exists(), 60, f"{kind} daemon ready")

        def status() -> subprocess.CompletedProcess[str] | None:
            result = run("admin", "--kit", str(admin), "-c", "check_status client")
            return result if "site-1" in result.stdout and "alive" in result.stdout else None

        status = wait_until(status, 60, "site-1 alive in `fedgrid admin -c 'check_status client'`")
        assert status.returncode == 0, status.stderr
    finally:
        for daemon in reversed(daemons):
            daemon.send_signal(signal.SIGTERM)
        codes = [daemon.wait(timeout=60) for daemon in reversed(daemons)]
    assert codes == [0, 0], [(tmp_path / f"{kind}.log").read_text()[-2000:] for kind in ("site", "server")]
