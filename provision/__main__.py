"""`provision -p project.yml`: validate a project file and write one signed startup kit per participant.

Exit codes (fedgrid.exit_codes): 0 kits written; 2 bad project file or bad usage (nothing written);
1 any other failure, 130 interrupted (nothing left behind either way).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedgrid import kit as k
from fedgrid.errors import FedgridError, ProjectFileError
from fedgrid.exit_codes import ExitCode
from provision.provisioner import ProvisionResult, provision

_DESCRIPTION = """\
Validate a fedgrid project file and write a startup kit for every participant it lists: the
server, each site (type: client) and each admin. Every kit holds the project's root CA
certificate, the participant's own certificate and private key, its configuration, the signed
participant roster and its start/stop or admin-console script, all signed by the root CA.

Output goes to WORKSPACE/<project name>/prod_NN/<participant>/, where prod_NN is a new folder on
every run (prod_00, prod_01, ...); earlier runs are never touched. The root CA is created on the
first run in WORKSPACE/<project name>/state/ and reused afterwards, so a site added to the project
file later gets a kit that the running server accepts. Keep the state folder private: it holds
the CA's private key, which never goes into a kit."""

_EPILOG = """\
exit codes: 0 kits written; 2 invalid project file or usage (nothing written);
            1 any other failure, 130 interrupted (nothing left behind).
example:    provision -p workspaces/project.yml -w /tmp/fl"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="provision",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-p",
        "--project",
        required=True,
        type=Path,
        metavar="PROJECT_YML",
        help="the project file (see workspaces/project.yml)",
    )
    parser.add_argument(
        "-w",
        "--workspace",
        type=Path,
        metavar="WORKSPACE",
        help="where to write <project>/prod_NN and <project>/state (default: the folder holding the project file)",
    )
    return parser


def _summary(result: ProvisionResult) -> str:
    project = result.project
    lines = [
        f"provisioned {project.name}: {len(result.kits)} kits in {result.prod_dir} "
        f"(roster version {result.roster_version})",
    ]
    width = max(len(name) for name in result.kits)
    for p in project.participants:
        kind = {"client": "site"}.get(p.type, p.type)
        lines.append(f"  {kind:<6} {p.name:<{width}}  {result.kits[p.name]}")
    if result.new_ca:
        lines.append(f"new root CA in {result.state_dir} (keep this folder private, never hand it out)")
    else:
        lines.append(
            f"reused the root CA in {result.state_dir}: kits of earlier runs stay valid, and a "
            "running server adopts this roster when a new participant first connects"
        )
    server = result.kits[project.server.name] / k.STARTUP_DIR
    lines += ["next:", f"  start the server:    {server / k.START_SCRIPT}"]
    if project.clients:
        first = result.kits[project.clients[0].name] / k.STARTUP_DIR
        lines.append(f"  start each site:     {first / k.START_SCRIPT}  (and likewise for the other sites)")
    if project.admins:
        admin = result.kits[project.admins[0].name] / k.STARTUP_DIR
        lines.append(f"  admin console:       {admin / k.ADMIN_SCRIPT}")
    lines.append("  hand each participant only its own kit folder: it holds that participant's private key")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `provision` and `python -m provision`; returns the exit code."""
    args = _parser().parse_args(argv)  # exits 2 on bad usage, 0 on --help
    try:
        result = provision(args.project, args.workspace)
    except ProjectFileError as exc:
        print(str(exc), file=sys.stderr)
        return ExitCode.BAD_INPUT
    except FedgridError as exc:
        print(f"provision: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    except OSError as exc:
        print(f"provision: {exc.filename or ''}: {exc.strerror or exc}; nothing was written", file=sys.stderr)
        return ExitCode.FAILED
    except KeyboardInterrupt:
        print("provision: interrupted; nothing was written", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a bug must still end with one line, not a traceback
        what = f"{type(exc).__name__}: {exc}"
        print(f"provision: unexpected error ({what}); nothing was written", file=sys.stderr)
        return ExitCode.FAILED
    for notice in result.notices:
        print(f"warning: {notice}", file=sys.stderr)
    print(_summary(result))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
