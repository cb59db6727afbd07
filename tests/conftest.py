"""Shared test helpers: real provisioned projects in temporary folders, on free loopback ports.

`provision_project(tmp_dir, ...)` writes a project.yml and runs provisioning in-process (the same
code path as `provision -p`), so every test that needs kits gets real certificates and real
signatures. `provisioned_project` is one such project for the whole session: treat its kits as
read-only, and copy a kit (shutil.copytree) before changing it.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from provision.provisioner import provision

PROJECT_FILE = "project.yml"


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that were free on 127.0.0.1 a moment ago (bind port 0, read, close)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass(frozen=True)
class ProvisionedProject:
    """Where a provisioned test project is, and how to reach its server."""

    name: str
    project_file: Path
    prod_dir: Path
    state_dir: Path
    server: Path
    sites: tuple[Path, ...]
    admins: tuple[Path, ...]
    admin_roles: Mapping[str, Path]
    """Kit of the first admin with each role ("project_admin" -> kit folder)."""
    host: str
    fed_port: int
    admin_port: int

    @property
    def kits(self) -> tuple[Path, ...]:
        return (self.server, *self.sites, *self.admins)


def project_dict(
    *,
    name: str = "test_project",
    n_sites: int = 2,
    admins: Sequence[str | tuple[str, str, str]] = ("project_admin",),
    he: bool = False,
    he_params: Mapping[str, Any] | None = None,
    host: str = "127.0.0.1",
    fed_port: int = 8002,
    admin_port: int = 8003,
    validity_days: int = 365,
    key_type: str = "ecdsa-p256",
) -> dict[str, Any]:
    """The content of a project.yml: sites site-1..site-N alternate between org-a and org-b.

    `admins` lists roles (an admin "<role>@org-a.example" per entry, numbered when a role repeats)
    or explicit (name, org, role) tuples.
    """
    participants: list[dict[str, Any]] = [
        {
            "name": "server",
            "type": "server",
            "org": "org-a",
            "host": host,
            "fed_port": fed_port,
            "admin_port": admin_port,
        },
    ]
    participants += [
        {"name": f"site-{i}", "type": "client", "org": "org-a" if i % 2 else "org-b"} for i in range(1, n_sites + 1)
    ]
    used: dict[str, int] = {}
    for admin in admins:
        if isinstance(admin, str):
            used[admin] = used.get(admin, 0) + 1
            local = admin.replace("_", "-") + (str(used[admin]) if used[admin] > 1 else "")
            admin = (f"{local}@org-a.example", "org-a", admin)
        admin_name, org, role = admin
        participants.append({"name": admin_name, "type": "admin", "org": org, "role": role})
    return {
        "api_version": 1,
        "name": name,
        "description": "a project provisioned by the test suite",
        "certificate": {"validity_days": validity_days, "key_type": key_type},
        "he": {"enabled": he, **(he_params or {})},
        "participants": participants,
    }


def write_project_file(folder: Path, data: Mapping[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PROJECT_FILE
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False), encoding="utf-8")
    return path


def provision_project(
    tmp_dir: Path,
    n_sites: int = 2,
    admins: Sequence[str | tuple[str, str, str]] = ("project_admin",),
    he: bool = False,
    **options: Any,
) -> ProvisionedProject:
    """Write a project.yml with free loopback ports into `tmp_dir` and provision it there.

    `options` go to `project_dict` (name, he_params, host, validity_days, key_type, or fixed
    fed_port/admin_port). Provisioning again in the same folder adds prod_01, prod_02, ...
    """
    if "fed_port" not in options and "admin_port" not in options:
        options["fed_port"], options["admin_port"] = free_ports(2)
    data = project_dict(n_sites=n_sites, admins=admins, he=he, **options)
    project_file = write_project_file(Path(tmp_dir), data)
    result = provision(project_file)
    kits = result.kits
    by_type: dict[str, list[Path]] = {"server": [], "client": [], "admin": []}
    roles: dict[str, Path] = {}
    for p in result.project.participants:
        by_type[p.type].append(kits[p.name])
        if p.role is not None:
            roles.setdefault(p.role, kits[p.name])
    server = result.project.server
    return ProvisionedProject(
        name=result.project.name,
        project_file=project_file,
        prod_dir=result.prod_dir,
        state_dir=result.state_dir,
        server=by_type["server"][0],
        sites=tuple(by_type["client"]),
        admins=tuple(by_type["admin"]),
        admin_roles=roles,
        host=server.host or "127.0.0.1",
        fed_port=server.fed_port or 0,
        admin_port=server.admin_port or 0,
    )


@pytest.fixture(scope="session")
def provisioned_project(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    """One project for the session: a server, two sites and an admin of every role. Read-only."""
    return provision_project(
        tmp_path_factory.mktemp("project"), n_sites=2, admins=("project_admin", "org_admin", "lead", "member")
    )
