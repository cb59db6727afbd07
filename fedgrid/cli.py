"""`fedgrid <command>`: one entry point for what a user does, each command handing over to its own tool.

`fedgrid provision ...` is `provision ...`, `fedgrid admin ...` is `fedadmin ...`, and so on: the
arguments after the command go to that tool unchanged, so `fedgrid <command> --help` is the tool's help
and the tools' own names keep working. A command is one row of `COMMANDS`, naming the `main(argv)` it
runs; a row without one is a slot for a tool not there yet, which says so and exits 2.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fedgrid
from fedgrid.exit_codes import ExitCode


@dataclass(frozen=True)
class Command:
    summary: str
    target: str = ""
    """"module:function", a `main(argv: list[str]) -> int`; "" for a command not available yet."""
    unavailable: str = ""
    """What to tell the user when there is no target."""


def version(argv: list[str]) -> int:
    """`fedgrid version`: which fedgrid and torch this environment runs, and where fedgrid is installed."""
    if argv:
        print(f"fedgrid version: error: takes no options, got {' '.join(argv)}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    try:
        torch = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch = "not installed"
    print(
        f"fedgrid {fedgrid.__version__} (torch {torch}, python {platform.python_version()}) "
        f"in {Path(fedgrid.__file__).parent}"
    )
    return ExitCode.OK


COMMANDS: dict[str, Command] = {
    "provision": Command(
        "validate a project file and write one signed startup kit per participant (= provision)",
        "provision.__main__:main",
    ),
    "server": Command("run the server daemon from its kit: --kit SERVER_KIT (= fedserver)", "fedserver.__main__:main"),
    "site": Command("run a site daemon from its kit: --kit SITE_KIT (= fedclient)", "fedclient.__main__:main"),
    "admin": Command(
        "the admin console, logged in with an admin kit: --kit ADMIN_KIT (= fedadmin)", "fedgrid.console:main"
    ),
    "data": Command("split a data set into one folder per site (= prepare-data)", "fedgrid.data.__main__:main"),
    "simulate": Command(
        "run a job folder on N virtual sites here or on a Ray cluster: <job folder> -n N (= fedgrid-sim)",
        "fedgrid.sim.__main__:main",
    ),
    "version": Command(
        "print the versions of fedgrid, torch and Python, and where fedgrid is installed", "fedgrid.cli:version"
    ),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: fedgrid <command> [options]",
        "",
        "fedgrid: federated learning over mutual TLS. `fedgrid <command> --help` shows a command's options.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def _load(target: str) -> Callable[[list[str]], int]:
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(usage(), file=sys.stderr)
        return ExitCode.BAD_INPUT
    name, rest = args[0], args[1:]
    if name in ("-h", "--help", "help"):
        print(usage())
        return ExitCode.OK
    if name in ("-V", "--version"):
        name = "version"
    command = COMMANDS.get(name)
    if command is None:
        print(f"fedgrid: error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    if not command.target:
        print(f"fedgrid {name}: {command.unavailable}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    return _load(command.target)(rest)
