"""One provisioning run: project file in, a new prod_NN folder of signed kits out, or nothing at all.

The kits are built in a hidden temporary folder beside prod_NN, each is loaded back with
`fedgrid.kit.load_kit` exactly as a daemon will load it, and only then are the state saved and the
folder renamed into place. Any failure removes what this run created.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedgrid.kit import load_kit
from fedgrid.roster import sign_roster
from provision.builders import BuildContext, build_kit, prepare_he, roster_payload
from provision.ca import create_root_ca
from provision.schema import Project, load_project
from provision.workspace import LOCK_FILE, ProjectWorkspace, State


@dataclass(frozen=True)
class ProvisionResult:
    project: Project
    prod_dir: Path
    state_dir: Path
    kits: dict[str, Path]
    """Kit folder of each participant, in project-file order."""
    roster_version: int
    new_ca: bool
    """True when this run created the root CA (the project's first run)."""
    notices: tuple[str, ...] = ()
    """Warnings about the project file (keys accepted but ignored), one line each."""


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what a failed run must remove)."""
    missing = None
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def _remove_if_unused(root: Path, created: Path) -> None:
    """Remove the folders this run created, unless a concurrent run has put something in them."""
    if {p.name for p in root.iterdir()} <= {LOCK_FILE}:
        (root / LOCK_FILE).unlink(missing_ok=True)
    for folder in (root, *root.parents):
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == created:
            return


def provision(project_file: Path, workspace: Path | None = None) -> ProvisionResult:
    """Validate `project_file` and write one kit per participant under `<workspace>/<project>/prod_NN`.

    `workspace` defaults to the folder holding the project file. Raises ProjectFileError (nothing
    written) for a bad project file and another FedgridError or OSError for other failures (nothing
    left behind either).
    """
    project_file = Path(project_file)
    notices: list[str] = []
    project = load_project(project_file, notices)
    base = Path(workspace) if workspace is not None else project_file.parent
    ws = ProjectWorkspace(root=base.resolve() / project.name, project=project.name)
    created = _first_missing(ws.root)
    ws.root.mkdir(parents=True, exist_ok=True)
    staging: Path | None = None
    state_created = False
    try:
        with ws.locked():
            state = ws.load_state()
            new_ca = state is None
            if state is None:
                ca_key, ca_cert = create_root_ca(project.name, project.certificate.key_type)
                state = State(ca_key=ca_key, ca_cert=ca_cert, roster_version=0)
            version = state.roster_version + 1
            roster = sign_roster(roster_payload(project, version, dt.datetime.now(dt.UTC)), state.ca_key)
            ctx = BuildContext(
                project=project,
                ca_key=state.ca_key,
                ca_cert=state.ca_cert,
                roster_json=roster,
                he=prepare_he(project, ws.load_he() if state is not None and not new_ca else None),
            )
            prod_dir = ws.next_prod_dir()
            staging = Path(tempfile.mkdtemp(prefix=f".{prod_dir.name}.", suffix=".partial", dir=ws.root))
            for participant in project.participants:
                build_kit(ctx, participant, staging / participant.name)
                load_kit(staging / participant.name, expect_type=participant.type)
            state_created = new_ca
            ws.save_state(State(ca_key=state.ca_key, ca_cert=state.ca_cert, roster_version=version), new_ca=new_ca)
            if ctx.he is not None:
                ws.save_he(ctx.he)
            elif project.he.enabled and ws.drop_he():
                notices.append(
                    f"{project_file}: he.keys is sites: the HE keys provisioned by earlier runs were removed from "
                    f"{ws.state_dir}; kits made with them keep their copy"
                )
            staging.rename(prod_dir)
            staging = None
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if state_created:
            shutil.rmtree(ws.state_dir, ignore_errors=True)
        if created is not None:
            _remove_if_unused(ws.root, created)
        raise
    return ProvisionResult(
        project=project,
        prod_dir=prod_dir,
        state_dir=ws.state_dir,
        kits={p.name: prod_dir / p.name for p in project.participants},
        roster_version=version,
        new_ca=new_ca,
        notices=tuple(notices),
    )
