"""Kit builders: small functions, run in order, each writing one part of one participant's kit.

`BUILDERS` is the whole recipe of a kit, read top to bottom. Each builder gets the typed
`BuildContext` of the run, the participant and the kit folder; configuration files are dicts
dumped to JSON. `sign_startup` comes last because it signs whatever the others wrote to startup/.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from fedgrid import kit as k
from fedgrid.certs import Identity
from fedgrid.errors import EncryptionError, ProjectFileError
from fedgrid.policy import DEFAULT_POLICY, POLICY_FILE
from fedgrid.roster import ROSTER_FILE
from fedgrid.settings import (
    ADMIN_SETTINGS_FILE,
    SERVER_SETTINGS_FILE,
    SITE_SETTINGS_FILE,
    AdminSettings,
    ServerSettings,
    SiteSettings,
    settings_to_dict,
)
from fedgrid.signing import SIGNATURE_FILE, PrivateKey, manifest_of, sign_manifest
from provision import scripts
from provision.ca import cert_pem, issue_certificate, write_private_key
from provision.schema import Participant, Project

DAEMON_MODULES = {"server": "fedserver", "client": "fedclient"}
_WHAT = {"server": "fedgrid server", "client": "fedgrid site daemon", "admin": "fedgrid admin console"}


@dataclass(frozen=True)
class HEMaterial:
    """The project's CKKS contexts, made once per run: sites get the secret one, the server the public one."""

    secret_context: bytes
    public_context: bytes


@dataclass(frozen=True)
class BuildContext:
    """Everything the builders share in one provisioning run."""

    project: Project
    ca_key: PrivateKey
    ca_cert: x509.Certificate
    roster_json: bytes
    he: HEMaterial | None


Builder = Callable[[BuildContext, Participant, Path], None]


def _startup(kit_dir: Path) -> Path:
    return kit_dir / k.STARTUP_DIR


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _write_script(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    os.chmod(path, 0o755)


def write_certificates(ctx: BuildContext, p: Participant, kit_dir: Path) -> None:
    """rootCA.pem, and a new key (0600) with its certificate from the root CA."""
    identity = Identity(name=p.name, org=p.org, type=p.type, role=p.role, project=ctx.project.name)
    key, cert = issue_certificate(
        ctx.ca_key,
        ctx.ca_cert,
        identity,
        key_type=ctx.project.certificate.key_type,
        validity_days=ctx.project.certificate.validity_days,
        host=p.host,
    )
    startup = _startup(kit_dir)
    (startup / k.ROOT_CA_FILE).write_bytes(cert_pem(ctx.ca_cert))
    (startup / k.CERT_FILE).write_bytes(cert_pem(cert))
    write_private_key(startup / k.KEY_FILE, key)


def write_config(ctx: BuildContext, p: Participant, kit_dir: Path) -> None:
    """config.json: who this is and where the server is (read back by fedgrid.kit.load_kit)."""
    server = ctx.project.server
    he: dict[str, Any] = {"enabled": ctx.project.he.enabled}
    if ctx.project.he.enabled:
        he.update(ctx.project.he.config)
    he["context"] = k.HE_CONTEXT_FILE if ctx.he is not None and p.type != "admin" else None
    _write_json(
        _startup(kit_dir) / k.CONFIG_FILE,
        {
            "project": ctx.project.name,
            "name": p.name,
            "type": p.type,
            "org": p.org,
            "role": p.role,
            "server": {
                "name": server.name,
                "host": server.host,
                "fed_port": server.fed_port,
                "admin_port": server.admin_port,
            },
            "he": he,
        },
    )


def write_roster(ctx: BuildContext, p: Participant, kit_dir: Path) -> None:
    (_startup(kit_dir) / ROSTER_FILE).write_bytes(ctx.roster_json)


def write_he_context(ctx: BuildContext, p: Participant, kit_dir: Path) -> None:
    """he_context.bin (`he.keys: provisioned` only): public context for the server, context with the secret key
    (0600) for sites. With `he.keys: sites` no kit holds a context: each job's key is made at a site."""
    if ctx.he is None or p.type == "admin":
        return
    path = _startup(kit_dir) / k.HE_CONTEXT_FILE
    if p.type == "server":
        path.write_bytes(ctx.he.public_context)
    else:
        _write_secret(path, ctx.he.secret_context)


def write_scripts(ctx: BuildContext, p: Participant, kit_dir: Path) -> None:
    startup = _startup(kit_dir)
    if p.type == "admin":
        _write_script(startup / k.ADMIN_SCRIPT, scripts.admin_script())
        return
    module, what = DAEMON_MODULES[p.type], _WHAT[p.type]
    _write_script(startup / k.START_SCRIPT, scripts.start_script(module, what))
    _write_script(startup / k.STOP_SCRIPT, scripts.stop_script(module, what))


def write_local_settings(ctx: BuildContext, p: Participant, kit_dir: Path) -> None:
    """local/: the defaults of the settings the kit's operator may change."""
    local = kit_dir / k.LOCAL_DIR
    if p.type == "server":
        _write_json(local / SERVER_SETTINGS_FILE, settings_to_dict(ServerSettings()))
        _write_json(local / POLICY_FILE, DEFAULT_POLICY)
    elif p.type == "client":
        _write_json(local / SITE_SETTINGS_FILE, settings_to_dict(SiteSettings()))
    else:
        _write_json(local / ADMIN_SETTINGS_FILE, settings_to_dict(AdminSettings()))


def _readme(ctx: BuildContext, p: Participant) -> list[str]:
    project, server = ctx.project, ctx.project.server
    kind = {"client": "site"}.get(p.type, p.type)
    lines = [f"fedgrid startup kit of the {kind} {p.name} (org {p.org}) in project {project.name}."]
    if project.description:
        lines.append(project.description)
    lines.append("")
    if p.type == "admin":
        lines += [
            f"Role: {p.role}.",
            f"Admin console:  startup/{k.ADMIN_SCRIPT}   (connects to {server.host}:{server.admin_port})",
            "Python scripts (job.py) use this kit folder to submit jobs in your name.",
        ]
    else:
        lines += [
            f"Start:  startup/{k.START_SCRIPT}      (in the background; -f runs it in the foreground)",
            f"Stop:   startup/{k.STOP_SCRIPT}",
            f"Log:    {k.LOG_FILE}; daemon state and job folders: {k.WORKSPACE_DIR}/",
            "Set FEDGRID_PYTHON to the python that has fedgrid installed if it is not python3.",
        ]
        if p.type == "server":
            lines.append(f"Listens on {server.host}: port {server.fed_port} for sites, {server.admin_port} for admins.")
        else:
            lines.append(f"Connects to the server {server.name} at {server.host}:{server.fed_port}.")
    local = {
        "server": f"{SERVER_SETTINGS_FILE}, {POLICY_FILE}",
        "client": SITE_SETTINGS_FILE,
        "admin": ADMIN_SETTINGS_FILE,
    }[p.type]
    lines += [
        "",
        f"{k.STARTUP_DIR}/ is signed by the project's root CA ({SIGNATURE_FILE}): change nothing in it;",
        f"a changed kit is refused. Your own settings are in local/ ({local}) and may be edited.",
        "",
        f"Secret: {k.STARTUP_DIR}/{k.KEY_FILE} is your private key.",
    ]
    if ctx.he is not None and p.type == "client":
        lines.append(f"Secret: {k.STARTUP_DIR}/{k.HE_CONTEXT_FILE} holds the project's HE secret key.")
    elif ctx.project.he.enabled and p.type == "client":
        lines.append("HE keys are made per job at a site of the job and kept in memory only; this kit holds none.")
    lines.append("Keep this kit to yourself; never send it to anyone.")
    return lines


def write_readme(ctx: BuildContext, p: Participant, kit_dir: Path) -> None:
    (kit_dir / k.README_FILE).write_text("\n".join(_readme(ctx, p)) + "\n", encoding="utf-8")


def sign_startup(ctx: BuildContext, p: Participant, kit_dir: Path) -> None:
    """signature.json: every other file of startup/, signed by the root CA. Must run last."""
    startup = _startup(kit_dir)
    signed = sign_manifest(manifest_of(startup), ctx.ca_key, signer=f"{ctx.project.name} root CA")
    _write_json(startup / SIGNATURE_FILE, signed)


BUILDERS: tuple[Builder, ...] = (
    write_certificates,
    write_config,
    write_roster,
    write_he_context,
    write_scripts,
    write_local_settings,
    write_readme,
    sign_startup,
)


def build_kit(ctx: BuildContext, p: Participant, kit_dir: Path) -> None:
    """Create one participant's kit folder and run every builder on it."""
    kit_dir.mkdir()
    startup = _startup(kit_dir)
    startup.mkdir(mode=0o700)
    os.chmod(startup, 0o700)
    (kit_dir / k.LOCAL_DIR).mkdir()
    for builder in BUILDERS:
        builder(ctx, p, kit_dir)


def roster_payload(project: Project, version: int, issued: dt.datetime) -> dict[str, Any]:
    """The roster of this run: every participant of the project file, in its order."""
    return {
        "project": project.name,
        "version": version,
        "issued": issued.isoformat(timespec="seconds"),
        "participants": [{"name": p.name, "type": p.type, "org": p.org, "role": p.role} for p in project.participants],
    }


def prepare_he(project: Project, saved: HEMaterial | None = None) -> HEMaterial | None:
    """The CKKS contexts of this run when the project enables HE with provisioned keys (TenSEAL is imported
    only then); None when HE is off or the sites make each job's key.

    The contexts of an earlier run (`saved`, from the state folder) are reused while the parameters
    are unchanged, so that a site added later can still decrypt what the running federation sums.
    """
    if not project.he.enabled or project.he.keys != "provisioned":
        return None
    try:
        from fedgrid.he import HEContext, create_contexts
    except ImportError as exc:
        raise ProjectFileError(f"he.enabled is true, but HE support is not installed ({exc})") from None
    if saved is not None:
        try:
            same = HEContext.load(saved.public_context, expect_secret_key=False).params == project.he.params
        except EncryptionError:
            same = False  # written by an older fedgrid in a format this one no longer reads: new contexts
        if same:
            return saved
    secret, public = create_contexts(project.he.params)
    return HEMaterial(secret_context=secret, public_context=public)
