"""The admin console and the one-machine scripts, run as a user runs them (subprocesses)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ProvisionedProject, provision_project
from federation import ENV, Federation, running

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    return provision_project(
        tmp_path_factory.mktemp("ws") / "workspaces", n_sites=2, admins=("project_admin", "member")
    )


@pytest.fixture(scope="module")
def federation(project: ProvisionedProject) -> Iterator[Federation]:
    with running(project) as fed:
        yield fed


def console(kit: Path, *commands: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    args = [str(kit / "startup" / "fl_admin.sh")]
    for command in commands:
        args += ["-c", command]
    return subprocess.run(args, env=ENV, capture_output=True, text=True, input=stdin, timeout=120)


def test_commands_print_tables(project: ProvisionedProject, federation: Federation) -> None:
    result = console(project.admin_roles["project_admin"], "check_status server", "check_status client", "list_jobs -a")
    assert result.returncode == 0, result.stderr
    assert "sites: 2 alive of 2 in the project" in result.stdout
    assert "site-1" in result.stdout and "alive" in result.stdout
    assert "no jobs" in result.stdout


def test_errors_are_reported_and_set_the_exit_code(project: ProvisionedProject, federation: Federation) -> None:
    result = console(project.admin_roles["project_admin"], "show_job nope", "check_status planets", "frobnicate")
    assert result.returncode == 1
    assert "Error: no job 'nope'" in result.stdout
    assert "usage: check_status server | check_status client" in result.stdout
    assert "unknown command 'frobnicate'" in result.stdout
    denied = console(project.admin_roles["member"], "abort_job nope")
    assert denied.returncode == 1


def test_interactive_session_with_help_and_bye(project: ProvisionedProject, federation: Federation) -> None:
    result = console(project.admin_roles["project_admin"], stdin="help\nhelp list_jobs\ncheck_status client\nbye\n")
    assert result.returncode == 0, result.stderr
    assert "Logged in as project-admin@org-a.example (project_admin" in result.stdout
    for command in (
        "check_status",
        "submit_job",
        "list_jobs",
        "abort_job",
        "download_job",
        "clone_job",
        "delete_job",
        "show_job",
        "job_log",
        "bye",
    ):
        assert command in result.stdout
    assert "-a" in result.stdout and "site-2" in result.stdout


def test_console_without_a_server_says_how_to_start_it(tmp_path: Path) -> None:
    lonely = provision_project(tmp_path, n_sites=1)
    result = console(lonely.admins[0], "check_status server")
    assert result.returncode == 3
    assert "cannot reach the server" in result.stderr and "start.sh" in result.stderr


def test_start_fl_and_stop_fl(tmp_path: Path) -> None:
    workspaces = tmp_path / "workspaces"
    provision_project(workspaces, n_sites=3)
    started = subprocess.run(
        [str(ROOT / "start_fl.sh"), "2", "--workspaces", str(workspaces)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "is up: server + 2 sites" in started.stdout
        assert "site-2" in started.stdout and "log.txt" in started.stdout
        assert "site-3" not in started.stdout.split("is up")[1]
    finally:
        stopped = subprocess.run(
            [str(ROOT / "stop_fl.sh"), "--workspaces", str(workspaces)],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert stopped.returncode == 0
    assert stopped.stdout.count("stopped") == 3
    assert not list(workspaces.glob("*/prod_*/*/daemon.pid"))
