"""Provisioning end to end: real project files, real certificates, real folders."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ProvisionedProject, free_ports, project_dict, provision_project, write_project_file
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedgrid.certs import identity_from_cert, load_cert, verify_issued_by
from fedgrid.kit import load_kit
from fedgrid.policy import DEFAULT_POLICY
from fedgrid.roster import load_roster
from fedgrid.settings import ServerSettings, SiteSettings, settings_to_dict

REPO = Path(__file__).resolve().parents[1]
COMMON = {"rootCA.pem", "cert.pem", "key.pem", "config.json", "roster.json", "signature.json"}
EXPECTED_FILES = {
    "server": {f"startup/{f}" for f in COMMON | {"start.sh", "stop.sh"}}
    | {"local/server.json", "local/authorization.json", "readme.txt"},
    "client": {f"startup/{f}" for f in COMMON | {"start.sh", "stop.sh"}} | {"local/site.json", "readme.txt"},
    "admin": {f"startup/{f}" for f in COMMON | {"fl_admin.sh"}} | {"local/admin.json", "readme.txt"},
}


def run_provision(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "provision", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd or REPO, timeout=60)


def files_of(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def digests(folder: Path) -> dict[str, str]:
    return {rel: hashlib.sha256((folder / rel).read_bytes()).hexdigest() for rel in files_of(folder)}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if values else None


# --- a valid project ---------------------------------------------------------------------------


def test_every_kit_has_exactly_the_expected_files(provisioned_project: ProvisionedProject) -> None:
    project = provisioned_project
    assert sorted(p.name for p in project.prod_dir.iterdir()) == sorted(k.name for k in project.kits)
    for kit in project.kits:
        kind = json.loads((kit / "startup/config.json").read_text())["type"]
        assert files_of(kit) == EXPECTED_FILES[kind], kit.name


def test_secrets_have_private_modes(provisioned_project: ProvisionedProject) -> None:
    for kit in provisioned_project.kits:
        assert mode(kit / "startup/key.pem") == 0o600
        assert mode(kit / "startup") == 0o700
        if (kit / "startup/start.sh").exists():
            assert os.access(kit / "startup/start.sh", os.X_OK)
    assert mode(provisioned_project.state_dir) == 0o700
    assert mode(provisioned_project.state_dir / "rootCA.key") == 0o600


def test_no_kit_holds_the_ca_key_or_another_key(provisioned_project: ProvisionedProject) -> None:
    ca_key_pem = (provisioned_project.state_dir / "rootCA.key").read_bytes()
    ca_key_body = b"".join(ca_key_pem.splitlines()[1:-1])
    own_keys = {kit / "startup/key.pem" for kit in provisioned_project.kits}
    for path in provisioned_project.prod_dir.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        assert ca_key_body not in data.replace(b"\n", b""), path
        if path not in own_keys:
            assert b"PRIVATE KEY" not in data, path
    keys = {p.read_bytes() for p in own_keys}
    assert len(keys) == len(own_keys)  # every participant has a key of its own


def test_certificates_carry_the_identity(provisioned_project: ProvisionedProject) -> None:
    project = provisioned_project
    ca = load_cert(project.state_dir / "rootCA.pem")
    assert attribute(ca, NameOID.COMMON_NAME) == "test_project root CA"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    expected = {
        project.server: ("server", "org-a", "server", None),
        project.sites[0]: ("site-1", "org-a", "client", None),
        project.sites[1]: ("site-2", "org-b", "client", None),
        project.admin_roles["lead"]: ("lead@org-a.example", "org-a", "admin", "lead"),
        project.admin_roles["member"]: ("member@org-a.example", "org-a", "admin", "member"),
    }
    for kit, (name, org, kind, role) in expected.items():
        cert = load_cert(kit / "startup/cert.pem")
        assert attribute(cert, NameOID.COMMON_NAME) == name
        assert attribute(cert, NameOID.ORGANIZATION_NAME) == org
        assert attribute(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == kind
        assert attribute(cert, NameOID.TITLE) == role
        assert attribute(cert, NameOID.DN_QUALIFIER) == "test_project"
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        assert ExtendedKeyUsageOID.CLIENT_AUTH in usages
        assert (ExtendedKeyUsageOID.SERVER_AUTH in usages) == (kind == "server")
        verify_issued_by(cert, ca)
        assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days in (365, 366)


def test_server_certificate_names_its_host(provisioned_project: ProvisionedProject, tmp_path: Path) -> None:
    cert = load_cert(provisioned_project.server / "startup/cert.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["server"]

    by_name = provision_project(tmp_path, n_sites=1, admins=(), host="fl.example.org")
    cert = load_cert(by_name.server / "startup/cert.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "server"]
    site_cert = load_cert(by_name.sites[0] / "startup/cert.pem")
    with pytest.raises(x509.ExtensionNotFound):
        site_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_every_kit_loads_and_matches_its_participant(provisioned_project: ProvisionedProject) -> None:
    project = provisioned_project
    server = load_kit(project.server, expect_type="server")
    assert (server.name, server.type, server.org, server.role) == ("server", "server", "org-a", None)
    assert (server.server_host, server.fed_port, server.admin_port) == (
        "127.0.0.1",
        project.fed_port,
        project.admin_port,
    )
    assert server.roster.version == 1
    assert [m.name for m in server.roster.participants] == [k.name for k in project.kits]
    site = load_kit(project.sites[1], expect_type="client")
    assert (site.name, site.org, site.project) == ("site-2", "org-b", "test_project")
    admin = load_kit(project.admin_roles["org_admin"], expect_type="admin")
    assert (admin.name, admin.role) == ("org-admin@org-a.example", "org_admin")
    assert admin.root_pem == server.root_pem
    assert not admin.he.enabled and admin.he.context_path is None


def test_local_settings_and_config_content(provisioned_project: ProvisionedProject) -> None:
    project = provisioned_project

    def read(path: Path) -> Any:
        return json.loads(path.read_text())

    assert read(project.server / "local/server.json") == settings_to_dict(ServerSettings())
    assert read(project.server / "local/authorization.json") == DEFAULT_POLICY
    assert read(project.sites[0] / "local/site.json") == settings_to_dict(SiteSettings())
    config = json.loads((project.admin_roles["lead"] / "startup/config.json").read_text())
    assert config == {
        "project": "test_project",
        "name": "lead@org-a.example",
        "type": "admin",
        "org": "org-a",
        "role": "lead",
        "server": {
            "name": "server",
            "host": "127.0.0.1",
            "fed_port": project.fed_port,
            "admin_port": project.admin_port,
        },
        "he": {"enabled": False, "context": None},
    }
    readme = (project.sites[0] / "readme.txt").read_text()
    assert "startup/start.sh" in readme and "key.pem" in readme


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096"])
def test_key_types(tmp_path: Path, key_type: str) -> None:
    project = provision_project(tmp_path, n_sites=1, admins=(), key_type=key_type)
    kit = load_kit(project.sites[0])
    ca_key, key = kit.ca_cert.public_key(), kit.cert.public_key()
    if key_type.startswith("rsa"):
        assert isinstance(key, rsa.RSAPublicKey) and isinstance(ca_key, rsa.RSAPublicKey)
        assert key.key_size == int(key_type[4:])
    else:
        assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(ca_key, ec.EllipticCurvePublicKey)
        assert key.curve.name == {"ecdsa-p256": "secp256r1", "ecdsa-p384": "secp384r1"}[key_type]


def test_validity_days_is_used(tmp_path: Path) -> None:
    project = provision_project(tmp_path, n_sites=1, admins=(), validity_days=30)
    cert = load_cert(project.sites[0] / "startup/cert.pem")
    assert 30 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 31


# --- later runs --------------------------------------------------------------------------------


def test_second_run_writes_prod_01_and_reuses_the_ca(tmp_path: Path) -> None:
    first = provision_project(tmp_path, n_sites=2, admins=("project_admin",), fed_port=9102, admin_port=9103)
    before = digests(first.prod_dir)
    ca_before = (first.state_dir / "rootCA.pem").read_bytes()

    second = provision_project(tmp_path, n_sites=2, admins=("project_admin",), fed_port=9102, admin_port=9103)

    assert first.prod_dir.name == "prod_00" and second.prod_dir.name == "prod_01"
    assert digests(first.prod_dir) == before
    assert (second.state_dir / "rootCA.pem").read_bytes() == ca_before
    assert (second.server / "startup/rootCA.pem").read_bytes() == ca_before
    assert load_kit(second.server).roster.version == 2
    assert load_kit(first.server).roster.version == 1


def test_a_site_added_later_works_with_the_running_server(tmp_path: Path) -> None:
    first = provision_project(tmp_path, n_sites=2, admins=(), fed_port=9202, admin_port=9203)
    old_server = load_kit(first.server, expect_type="server")

    later = provision_project(tmp_path, n_sites=3, admins=(), fed_port=9202, admin_port=9203)
    new_site = load_kit(later.sites[2], expect_type="client")

    assert new_site.name == "site-3"
    verify_issued_by(new_site.cert, old_server.ca_cert)  # the old server's trust anchor accepts it
    roster = load_roster(new_site.roster_bytes, old_server.ca_cert)
    assert roster.version > old_server.roster.version
    assert roster.find("site-3") is not None and old_server.roster.find("site-3") is None


def test_cli_writes_kits_and_prints_what_to_do_next(tmp_path: Path) -> None:
    fed, admin = free_ports(2)
    project_file = write_project_file(tmp_path / "files", project_dict(fed_port=fed, admin_port=admin))
    workspace = tmp_path / "out"

    result = run_provision("-p", str(project_file), "-w", str(workspace))

    assert result.returncode == 0, result.stderr
    assert (workspace / "test_project/prod_00/site-1/startup/signature.json").is_file()
    assert "prod_00" in result.stdout and "start.sh" in result.stdout and "fl_admin.sh" in result.stdout
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == ["project.yml"]
    assert result.stderr == ""


def test_a_data_port_in_the_project_file_is_ignored_with_one_warning(tmp_path: Path) -> None:
    """Project files written when the server had a third port still provision; the key is ignored, said once."""
    data = project_dict()
    data["participants"][0]["data_port"] = 8004
    project_file = write_project_file(tmp_path / "files", data)
    workspace = tmp_path / "out"

    result = run_provision("-p", str(project_file), "-w", str(workspace))

    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"warning: {project_file}: participant 'server' (#1): data_port is no longer used")
    assert "ignored" in lines[0] and "fed_port" in lines[0]
    for kit in ("server", "site-1"):
        config = json.loads((workspace / f"test_project/prod_00/{kit}/startup/config.json").read_text())
        assert config["server"] == {"name": "server", "host": "127.0.0.1", "fed_port": 8002, "admin_port": 8003}
        assert "8004" not in (workspace / f"test_project/prod_00/{kit}/readme.txt").read_text()


def test_workspace_defaults_to_the_project_files_folder(tmp_path: Path) -> None:
    project_file = write_project_file(tmp_path, project_dict(n_sites=1, admins=()))
    result = run_provision("-p", str(project_file))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "test_project/prod_00/server/startup/start.sh").is_file()
    assert (tmp_path / "test_project/state/rootCA.key").is_file()


def test_help_explains_and_exits_0() -> None:
    result = run_provision("--help")
    assert result.returncode == 0
    for words in ("-p", "--workspace", "prod_NN", "root CA", "exit codes"):
        assert words in result.stdout


def test_bad_usage_exits_2() -> None:
    result = run_provision("--no-such-option")
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_missing_project_file_exits_2(tmp_path: Path) -> None:
    result = run_provision("-p", str(tmp_path / "nope.yml"))
    assert result.returncode == 2
    assert "nope.yml: no such file" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_broken_state_exits_1_and_leaves_nothing_new(tmp_path: Path) -> None:
    project = provision_project(tmp_path, n_sites=1, admins=())
    (project.state_dir / "rootCA.key").unlink()
    before = sorted(p.name for p in project.prod_dir.parent.iterdir())

    result = run_provision("-p", str(project.project_file))

    assert result.returncode == 1
    assert "rootCA.key is missing" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in project.prod_dir.parent.iterdir()) == before


# --- invalid project files ---------------------------------------------------------------------


Change = Callable[[dict[str, Any]], None]
ADMIN = "project-admin@org-a.example"


def _set(who: str | None, **values: Any) -> Change:
    """Set keys of the participant `who` (None: of the top level)."""

    def apply(data: dict[str, Any]) -> None:
        target = data if who is None else next(p for p in data["participants"] if p["name"] == who)
        target.update(values)

    return apply


def _drop(who: str | None, key: str) -> Change:
    def apply(data: dict[str, Any]) -> None:
        target = data if who is None else next(p for p in data["participants"] if p["name"] == who)
        del target[key]

    return apply


def _add(entry: Any) -> Change:
    return lambda data: data["participants"].append(entry)


def _cert(**values: Any) -> Change:
    return lambda data: data["certificate"].update(values)


# The default test project: #1 server, #2 site-1 (org-a), #3 site-2 (org-b), #4 ADMIN.
BAD_PROJECTS: dict[str, tuple[Change, tuple[str, ...]]] = {
    "unknown top key": (_set(None, participantz=[]), ("unknown key 'participantz'",)),
    "missing name": (_drop(None, "name"), ("missing key 'name'",)),
    "missing participants": (_drop(None, "participants"), ("missing key 'participants'",)),
    "api version": (_set(None, api_version=2), ("api_version must be 1, got 2",)),
    "api version text": (_set(None, api_version="1"), ("api_version must be 1, got '1'",)),
    "bad project name": (_set(None, name="my project"), ("name must be letters, digits", "got 'my project'")),
    "participants not a list": (_set(None, participants={"a": 1}), ("participants must be",)),
    "no participants": (_set(None, participants=[]), ("participants must be a non-empty",)),
    "description not text": (_set(None, description=["a"]), ("description",)),
    "unknown participant key": (
        _set("site-2", prot=1),
        ("participant 'site-2' (#3)", "unknown key 'prot'", "allowed: name, type, org"),
    ),
    "participant missing org": (_drop("site-1", "org"), ("participant 'site-1' (#2)", "missing key 'org'")),
    "participant missing type": (_drop("site-1", "type"), ("participant 'site-1' (#2)", "'type'")),
    "participant unknown type": (
        _set("site-1", type="worker"),
        ("participant 'site-1' (#2)", "type must be one of", "'worker'"),
    ),
    "participant without name": (_add({"type": "client", "org": "x"}), ("participant #5", "key 'name'")),
    "participant not a mapping": (_add("site-9"), ("participant #5 must be a mapping, got 'site-9'",)),
    "participant name not text": (_set("site-1", name=42), ("participant #2", "name must be a string")),
    "bad site name": (_set("site-1", name="site 1"), ("participant 'site 1' (#2)", "invalid name")),
    "site name too long": (_set("site-1", name="s" * 64), ("(#2)", "invalid name")),
    "bad admin name": (_set(ADMIN, name="root"), ("participant 'root' (#4)", "e-mail")),
    "bad org": (_set("site-2", org="Org B!"), ("participant 'site-2' (#3): org must be letters", "got 'Org B!'")),
    "org not text": (_set("site-2", org=7), ("participant 'site-2' (#3): org must be a string, got 7",)),
    "duplicate name": (_set("site-2", name="site-1"), ("participant 'site-1' (#3)", "duplicate name", "#2")),
    "duplicate name by case": (_set("site-2", name="SITE-1"), ("participant 'SITE-1' (#3)", "duplicate")),
    "no server": (lambda data: data["participants"].pop(0), ("no server",)),
    "two servers": (
        _add(
            {"name": "server2", "type": "server", "org": "org-a", "host": "localhost", "fed_port": 1, "admin_port": 2}
        ),
        ("participant 'server2' (#5)", "second server"),
    ),
    "admin without role": (_drop(ADMIN, "role"), (f"participant '{ADMIN}' (#4)", "missing key 'role'")),
    "admin unknown role": (_set(ADMIN, role="boss"), ("(#4)", "role must be one of", "'boss'")),
    "role on a site": (_set("site-1", role="lead"), ("'site-1' (#2)", "'role' is only for admins")),
    "host on a site": (
        _set("site-1", host="localhost"),
        ("participant 'site-1' (#2)", "'host' is only for the server"),
    ),
    "port on an admin": (_set(ADMIN, fed_port=1), ("(#4)", "'fed_port' is only for the server")),
    "server without host": (_drop("server", "host"), ("participant 'server' (#1)", "missing key 'host'")),
    "bad host": (_set("server", host="bad host!"), ("participant 'server' (#1)", "host must be")),
    "port not int": (_set("server", fed_port="8002"), ("'server' (#1)", "fed_port", "'8002'")),
    "port is bool": (_set("server", fed_port=True), ("'server' (#1)", "fed_port", "True")),
    "port zero": (_set("server", admin_port=0), ("'server' (#1)", "admin_port", "got 0")),
    "port too big": (_set("server", fed_port=65536), ("'server' (#1)", "fed_port", "65536")),
    "same ports": (
        _set("server", fed_port=9000, admin_port=9000),
        ("'server' (#1)", "fed_port and admin_port must differ"),
    ),
    "data port on a site": (_set("site-1", data_port=8004), ("'site-1' (#2)", "unknown key 'data_port'")),
    "validity zero": (_cert(validity_days=0), ("certificate.validity_days", "got 0")),
    "validity too long": (_cert(validity_days=3651), ("certificate.validity_days", "3651")),
    "validity text": (_cert(validity_days="1y"), ("certificate.validity_days", "'1y'")),
    "bad key type": (_cert(key_type="dsa-1024"), ("certificate.key_type", "'dsa-1024'")),
    "unknown certificate key": (_cert(days=3), ("certificate", "unknown key 'days'")),
    "he not a mapping": (_set(None, he=True), ("he must be a mapping",)),
    "he without enabled": (_set(None, he={}), ("he: missing key 'enabled'",)),
    "he enabled not bool": (_set(None, he={"enabled": "no"}), ("he.enabled",)),
    "he keys unknown": (_set(None, he={"enabled": True, "keys": "server"}), ("he.keys must be 'sites'", "'server'")),
}

RAW_BAD_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "yaml syntax": ("api_version: 1\nname: [unclosed\n", ("YAML syntax error", "line")),
    "tab indentation": ("api_version: 1\nparticipants:\n\t- name: x\n", ("YAML syntax error",)),
    "empty file": ("", ("expected a mapping", "empty")),
    "a list": ("- 1\n- 2\n", ("expected a mapping", "a list")),
    "a scalar": ("hello\n", ("expected a mapping", "a string")),
    "duplicate key": (
        "api_version: 1\nname: p\nparticipants: []\nparticipants: []\n",
        ("line 4", "duplicate key 'participants'"),
    ),
}


def _assert_refused(tmp_path: Path, project_file: Path, fragments: tuple[str, ...]) -> None:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    before = sorted(p.name for p in project_file.parent.iterdir())

    result = run_provision("-p", str(project_file), "-w", str(workspace))

    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{project_file}:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""
    assert list(workspace.iterdir()) == []
    assert sorted(p.name for p in project_file.parent.iterdir()) == before


@pytest.mark.parametrize("case", sorted(BAD_PROJECTS))
def test_invalid_project_file_is_refused_with_one_line(tmp_path: Path, case: str) -> None:
    change, fragments = BAD_PROJECTS[case]
    data = project_dict(n_sites=2, admins=("project_admin",))
    change(data)
    project_file = write_project_file(tmp_path / "files", data)
    _assert_refused(tmp_path, project_file, fragments)


@pytest.mark.parametrize("case", sorted(RAW_BAD_FILES))
def test_unparsable_project_file_is_refused_with_one_line(tmp_path: Path, case: str) -> None:
    text, fragments = RAW_BAD_FILES[case]
    project_file = tmp_path / "files" / "project.yml"
    project_file.parent.mkdir()
    project_file.write_text(text)
    _assert_refused(tmp_path, project_file, fragments)


def test_he_enabled_without_he_support_or_with_it(tmp_path: Path) -> None:
    """With fedgrid.he missing, an HE project is refused cleanly; with it, the default (keys made at the sites)
    writes the CKKS parameters into the kits and no context, key or secret anywhere."""
    data = project_dict(n_sites=1, admins=("member",), he=True)
    project_file = write_project_file(tmp_path / "files", data)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    result = run_provision("-p", str(project_file), "-w", str(workspace))
    try:
        import fedgrid.he  # noqa: F401
    except ImportError:
        assert result.returncode == 2
        assert "HE support is not installed" in result.stderr
        assert list(workspace.iterdir()) == []
        return
    assert result.returncode == 0, result.stderr
    project = workspace / "test_project"
    assert not [p for p in project.rglob("*he*context*")]
    site = load_kit(project / "prod_00/site-1")
    assert site.he.enabled and site.he.keys == "sites" and site.he.context_path is None
    assert site.he.params["poly_modulus_degree"] == 8192
    assert "kept in memory only" in (project / "prod_00/site-1/readme.txt").read_text()


def test_provisioned_he_keys_go_into_the_site_kits_and_leave_the_state_folder_when_sites_make_them(
    tmp_path: Path,
) -> None:
    data = project_dict(n_sites=1, admins=("member",), he=True, he_params={"keys": "provisioned"})
    project_file = write_project_file(tmp_path / "files", data)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    result = run_provision("-p", str(project_file), "-w", str(workspace))
    assert result.returncode == 0, result.stderr
    prod = workspace / "test_project/prod_00"
    assert (prod / "server/startup/he_context.bin").is_file()
    assert mode(prod / "site-1/startup/he_context.bin") == 0o600
    assert not (prod / "member@org-a.example/startup/he_context.bin").exists()
    assert load_kit(prod / "site-1").he.keys == "provisioned"
    assert (workspace / "test_project/state/he_secret_context.bin").is_file()

    data["he"] = {"enabled": True}
    write_project_file(tmp_path / "files", data)
    result = run_provision("-p", str(project_file), "-w", str(workspace))
    assert result.returncode == 0, result.stderr
    assert "HE keys provisioned by earlier runs were removed" in result.stdout + result.stderr
    assert not list((workspace / "test_project/state").glob("he_*"))
    assert not list((workspace / "test_project/prod_01").rglob("he_context.bin"))


def test_workspace_examples_are_valid(tmp_path: Path) -> None:
    from provision.schema import load_project

    example = load_project(REPO / "workspaces/project.yml")
    assert example.name == "example_project"
    server = example.server
    assert (server.name, server.host, server.fed_port, server.admin_port) == ("server1", "localhost", 8002, 8003)
    assert [c.name for c in example.clients] == ["site-1", "site-2", "site-3", "site-4"]
    assert [(a.name, a.role) for a in example.admins] == [("admin@nvidia.com", "project_admin")]

    secure = load_project(REPO / "workspaces/secure_project.yml")
    assert secure.name == "secure_project"
    assert (secure.server.fed_port, secure.server.admin_port) == (8102, 8103)
    assert [c.name for c in secure.clients] == [f"site-{i}" for i in range(1, 9)]
    assert len({c.org for c in secure.clients}) > 1
    assert {a.role for a in secure.admins} == {"project_admin", "org_admin", "lead", "member"}


def test_certificate_identity_round_trips(provisioned_project: ProvisionedProject) -> None:
    identity = identity_from_cert(load_cert(provisioned_project.admin_roles["member"] / "startup/cert.pem"))
    assert (identity.name, identity.org, identity.type, identity.role, identity.project) == (
        "member@org-a.example",
        "org-a",
        "admin",
        "member",
        "test_project",
    )
