"""Loading and verifying kits, certificates, rosters and signed manifests; the kit's scripts."""

from __future__ import annotations

import base64
import concurrent.futures
import datetime as dt
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import ProvisionedProject
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedgrid import kit as kit_module
from fedgrid.certs import (
    Identity,
    identity_from_cert,
    load_private_key,
    verify_issued_by,
    verify_root_ca,
)
from fedgrid.errors import ConfigError, IdentityError, KitError, TamperedError
from fedgrid.kit import load_kit
from fedgrid.policy import DEFAULT_POLICY, Caller, Policy
from fedgrid.roster import load_roster, sign_roster
from fedgrid.settings import AdminSettings, ServerSettings, SiteSettings, load_settings
from fedgrid.signing import PrivateKey, manifest_of, sign_bytes, sign_manifest, verify_bytes, verify_manifest
from provision.ca import KEY_TYPES, cert_pem, create_root_ca, generate_key, issue_certificate

SITE = Identity(name="site-1", org="org-a", type="client", role=None, project="test_project")
ADMIN = Identity(name="lead@org-a.example", org="org-a", type="admin", role="lead", project="test_project")


@pytest.fixture
def site_kit(provisioned_project: ProvisionedProject, tmp_path: Path) -> Path:
    """A private copy of site-1's kit, free to change."""
    return Path(shutil.copytree(provisioned_project.sites[0], tmp_path / "site-1"))


def ca_key_of(project: ProvisionedProject) -> PrivateKey:
    return load_private_key(project.state_dir / "rootCA.key")


def resign(kit: Path, project: ProvisionedProject) -> None:
    """Sign the kit's startup/ again with the project's CA, as a (compromised) provisioner could."""
    startup = kit / "startup"
    signed = sign_manifest(manifest_of(startup), ca_key_of(project), signer="test_project root CA")
    (startup / "signature.json").write_text(json.dumps(signed))


# --- load_kit ----------------------------------------------------------------------------------


def test_load_kit_returns_what_the_daemons_need(provisioned_project: ProvisionedProject) -> None:
    kit = load_kit(provisioned_project.sites[0], expect_type="client")
    startup = provisioned_project.sites[0] / "startup"
    assert kit.identity == SITE
    assert (kit.server_name, kit.server_host) == ("server", "127.0.0.1")
    assert (kit.fed_port, kit.admin_port) == (provisioned_project.fed_port, provisioned_project.admin_port)
    assert kit.root_pem == (startup / "rootCA.pem").read_bytes()
    assert kit.cert_pem == (startup / "cert.pem").read_bytes()
    assert kit.key_pem == (startup / "key.pem").read_bytes()
    assert kit.roster_bytes == (startup / "roster.json").read_bytes()
    assert kit.roster.find("site-2") is not None and kit.roster.find("site-9") is None
    assert kit.local_dir == provisioned_project.sites[0] / "local"
    assert kit.workspace_dir == kit_module.workspace_dir(provisioned_project.sites[0])
    assert kit.log_path.name == "log.txt" and kit.ready_path.name == "daemon.ready"
    assert b"PRIVATE" not in repr(kit).encode()
    signature = sign_bytes(b"job manifest", kit.private_key())
    verify_bytes(b"job manifest", signature, kit.cert.public_key())  # type: ignore[arg-type]


def test_load_kit_of_the_wrong_type(provisioned_project: ProvisionedProject) -> None:
    with pytest.raises(KitError, match=r"site kit of 'site-1'; this command needs a server kit"):
        load_kit(provisioned_project.sites[0], expect_type="server")
    with pytest.raises(KitError, match=r"admin kit .* needs a site kit"):
        load_kit(provisioned_project.admin_roles["lead"], expect_type="client")


def test_a_folder_that_is_no_kit(tmp_path: Path) -> None:
    with pytest.raises(KitError, match="is not a startup kit"):
        load_kit(tmp_path)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _corrupt_signature(path: Path) -> None:
    signed = json.loads(path.read_text())
    raw = bytearray(base64.b64decode(signed["signature"]))
    raw[-1] ^= 0x01
    signed["signature"] = base64.b64encode(bytes(raw)).decode()
    path.write_text(json.dumps(signed))


def _other_root_ca(path: Path) -> None:
    _, other = create_root_ca("test_project")
    path.write_bytes(cert_pem(other))


TAMPERING: dict[str, tuple[Callable[[Path], None], str]] = {
    "config byte changed": (
        lambda kit: _flip_byte(kit / "startup/config.json"),
        "startup/config.json was changed after signing",
    ),
    "script edited": (
        lambda kit: (kit / "startup/start.sh").write_text("#!/bin/sh\necho hi\n"),
        "startup/start.sh was changed after signing",
    ),
    "key replaced": (
        lambda kit: (kit / "startup/key.pem").write_bytes(b"x"),
        "startup/key.pem was changed after signing",
    ),
    "file added": (
        lambda kit: (kit / "startup/extra.sh").write_text("echo evil\n"),
        "startup/extra.sh is not signed (added after signing)",
    ),
    "file added in a subfolder": (
        lambda kit: ((kit / "startup/sub").mkdir(), (kit / "startup/sub/x.py").write_text("")),
        "startup/sub/x.py is not signed (added after signing)",
    ),
    "symlink added": (
        lambda kit: (kit / "startup/link.pem").symlink_to(kit / "startup/cert.pem"),
        "startup/link.pem is a symbolic link",
    ),
    "cert deleted": (lambda kit: (kit / "startup/cert.pem").unlink(), "startup/cert.pem is missing"),
    "roster deleted": (lambda kit: (kit / "startup/roster.json").unlink(), "startup/roster.json is missing"),
    "signature corrupted": (
        lambda kit: _corrupt_signature(kit / "startup/signature.json"),
        "startup/signature.json: signature does not verify",
    ),
    "signature not JSON": (
        lambda kit: (kit / "startup/signature.json").write_text("{oops"),
        "startup/signature.json: not valid JSON",
    ),
    "signature deleted": (
        lambda kit: (kit / "startup/signature.json").unlink(),
        "startup/signature.json is missing",
    ),
    "root CA swapped": (
        lambda kit: _other_root_ca(kit / "startup/rootCA.pem"),
        "startup/signature.json: signature does not verify",
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampered_kit_is_refused_naming_the_file(site_kit: Path, case: str) -> None:
    tamper, message = TAMPERING[case]
    load_kit(site_kit)  # intact before
    tamper(site_kit)
    with pytest.raises(TamperedError) as caught:
        load_kit(site_kit)
    assert message in str(caught.value)


def test_local_settings_may_change(site_kit: Path) -> None:
    (site_kit / "local/site.json").write_text(json.dumps({"torch_threads": 1}))
    (site_kit / "workspace").mkdir()
    (site_kit / "log.txt").write_text("log\n")
    assert load_kit(site_kit).name == "site-1"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"worker_nice": 20}, "worker_nice must be an integer from 0 to 19, got 20"),
        ({"worker_nice": -1}, "worker_nice must be an integer from 0 to 19, got -1"),
        ({"worker_nice": "5"}, "worker_nice must be an integer from 0 to 19, got '5'"),
        ({"memory_gb": True}, "memory_gb must be a number of at least 0, got True"),
        ({"nice": 5}, "unknown key 'nice'; allowed: allow_custom_code, heartbeat_interval"),
        ([], "expected an object, got []"),
        ('{"torch_threads": 1,}', "not valid JSON (trailing comma at line 1 column 21)"),
    ],
)
def test_bad_local_settings_are_refused_naming_the_file(site_kit: Path, settings: object, message: str) -> None:
    path = site_kit / "local/site.json"
    path.write_text(settings if isinstance(settings, str) else json.dumps(settings))
    with pytest.raises(ConfigError) as caught:
        load_settings(SiteSettings, path)
    assert str(caught.value).startswith(f"{path}: {message}")
    assert str(caught.value).endswith("; fix it or delete it to use the defaults")


@pytest.mark.parametrize(("cls", "file"), [(SiteSettings, "site.json"), (ServerSettings, "server.json")])
def test_a_data_lane_setting_is_ignored_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cls: type, file: str
) -> None:
    """Settings written when workers had a lane of their own still load: the key is ignored, said once."""
    path = tmp_path / file
    path.write_text(json.dumps({"data_lane": False, "max_concurrent_jobs": 3}))
    with caplog.at_level(logging.WARNING, logger="fedgrid.settings"):
        settings = load_settings(cls, path)
    assert settings.max_concurrent_jobs == 3 and not hasattr(settings, "data_lane")
    [record] = caplog.records
    assert record.getMessage() == (
        f"{path}: setting 'data_lane' is no longer used and is ignored "
        "(job workers use the federation port (fed_port) alone); delete it"
    )
    path.write_text(json.dumps({"data_lane": True}))
    with pytest.raises(ConfigError, match="unknown key 'data_lane'"):
        load_settings(AdminSettings, path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda roles: roles.update(boss=roles["lead"]), "roles key must be one of project_admin, org_admin, lead"),
        (lambda roles: roles["lead"].update(view="yes"), "roles['lead'].view must be true or false, got 'yes'"),
        (lambda roles: roles["lead"].update(manage="all"), "roles['lead'].manage must be one of any, org, own, none"),
        (lambda roles: roles["lead"].pop("submit"), "roles['lead']: missing key 'submit'"),
    ],
)
def test_a_bad_authorization_policy_is_refused_with_one_line(
    tmp_path: Path, change: Callable[[dict], None], message: str
) -> None:
    policy = json.loads(json.dumps(DEFAULT_POLICY))
    change(policy["roles"])
    path = tmp_path / "authorization.json"
    path.write_text(json.dumps(policy))
    with pytest.raises(ConfigError) as caught:
        Policy.load(path)
    assert str(caught.value).startswith(f"{path}: {message}")
    assert Policy.load(tmp_path / "missing.json").allows(Caller("a", "o", "lead"), "submit_job")


def test_key_of_another_participant_is_refused(site_kit: Path, provisioned_project: ProvisionedProject) -> None:
    shutil.copyfile(provisioned_project.sites[1] / "startup/key.pem", site_kit / "startup/key.pem")
    resign(site_kit, provisioned_project)
    with pytest.raises(KitError, match=r"key.pem: this key does not belong to cert.pem"):
        load_kit(site_kit)


def test_config_that_disagrees_with_the_certificate_is_refused(
    site_kit: Path, provisioned_project: ProvisionedProject
) -> None:
    config_path = site_kit / "startup/config.json"
    config = json.loads(config_path.read_text())
    config["name"] = "site-2"
    config_path.write_text(json.dumps(config))
    resign(site_kit, provisioned_project)
    with pytest.raises(KitError, match=r"cert.pem: the certificate names .*site-1.* config.json says .*site-2"):
        load_kit(site_kit)


def _edit_config(kit: Path, project: ProvisionedProject, change: Callable[[dict], None]) -> None:
    """Change the kit's config.json and sign the kit again, as a provisioner could."""
    config_path = kit / "startup/config.json"
    config = json.loads(config_path.read_text())
    change(config)
    config_path.write_text(json.dumps(config))
    resign(kit, project)


def test_a_kit_with_a_data_port_loads_with_one_warning(
    site_kit: Path, provisioned_project: ProvisionedProject, caplog: pytest.LogCaptureFixture
) -> None:
    """Kits provisioned when the server had a third port keep working: the port is ignored, said once."""
    with caplog.at_level(logging.WARNING, logger="fedgrid.kit"):
        load_kit(site_kit)
    assert not caplog.records
    _edit_config(site_kit, provisioned_project, lambda config: config["server"].update(data_port=8004))

    with caplog.at_level(logging.WARNING, logger="fedgrid.kit"):
        kit = load_kit(site_kit)

    assert (kit.fed_port, kit.admin_port) == (provisioned_project.fed_port, provisioned_project.admin_port)
    assert not hasattr(kit, "data_port")
    [record] = caplog.records
    message = record.getMessage()
    assert "config.json: server.data_port is no longer used and is ignored" in message
    assert f"job workers reach the server on fed_port {provisioned_project.fed_port}" in message


BAD_CONFIGS: dict[str, tuple[Callable[[dict], None], str]] = {
    "port as text": (
        lambda c: c["server"].update(fed_port="8002"),
        "server.fed_port must be an integer from 1 to 65535",
    ),
    "port out of range": (lambda c: c["server"].update(admin_port=70000), "got 70000"),
    "unknown key": (lambda c: c.update(colour="red"), "unknown key 'colour'; allowed: project, name, type"),
    "missing key": (lambda c: c["server"].pop("host"), "server: missing key 'host'"),
    "unknown type": (lambda c: c.update(type="robot"), "type must be one of server, client, admin, got 'robot'"),
    "bad he context": (lambda c: c["he"].update(context="../key.pem"), "he.context must be he_context.bin"),
    "not an object": (lambda c: c.update(server=[1]), "server must be an object, got [1]"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_config_json_is_refused_with_one_line(
    site_kit: Path, provisioned_project: ProvisionedProject, case: str
) -> None:
    change, message = BAD_CONFIGS[case]
    _edit_config(site_kit, provisioned_project, change)
    with pytest.raises(KitError) as caught:
        load_kit(site_kit)
    text = str(caught.value)
    assert text.startswith(f"{site_kit.resolve() / 'startup/config.json'}: "), text
    assert message in text and text.endswith("; re-provision this kit") and "\n" not in text


def test_roster_of_another_project_is_refused(site_kit: Path, provisioned_project: ProvisionedProject) -> None:
    other_key, _ = create_root_ca("test_project")
    roster = json.loads((site_kit / "startup/roster.json").read_text())
    (site_kit / "startup/roster.json").write_bytes(sign_roster(roster["payload"], other_key))
    resign(site_kit, provisioned_project)
    with pytest.raises(KitError, match=r"roster.json: roster: signature does not verify"):
        load_kit(site_kit)


def test_expired_kit_says_to_reprovision(provisioned_project: ProvisionedProject) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    with pytest.raises(KitError, match=r"certificate of site-1 expired on \d{4}-\d\d-\d\d.*re-provision"):
        load_kit(provisioned_project.sites[0], now=later)
    much_later = dt.datetime.now(dt.UTC) + dt.timedelta(days=4000)
    with pytest.raises(KitError, match=r"rootCA.pem: root CA certificate .* expired on"):
        load_kit(provisioned_project.sites[0], now=much_later)


def test_open_key_file_is_loaded_with_a_warning(site_kit: Path, caplog: pytest.LogCaptureFixture) -> None:
    os.chmod(site_kit / "startup/key.pem", 0o644)
    with caplog.at_level(logging.WARNING, logger="fedgrid.kit"):
        load_kit(site_kit)
    assert any("key.pem" in r.getMessage() and "chmod 600" in r.getMessage() for r in caplog.records)
    caplog.clear()
    os.chmod(site_kit / "startup/key.pem", 0o600)
    with caplog.at_level(logging.WARNING, logger="fedgrid.kit"):
        load_kit(site_kit)
    assert not caplog.records


# --- certificates ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> tuple[object, x509.Certificate]:
    return create_root_ca("test_project")


def test_expired_certificate(ca: tuple) -> None:
    ca_key, ca_cert = ca
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    _, cert = issue_certificate(ca_key, ca_cert, SITE, validity_days=10, not_before=past)
    with pytest.raises(IdentityError, match=r"certificate of site-1 expired on \d{4}-"):
        verify_issued_by(cert, ca_cert)
    verify_issued_by(cert, ca_cert, now=past + dt.timedelta(days=1))


def test_certificate_not_yet_valid(ca: tuple) -> None:
    ca_key, ca_cert = ca
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)
    _, cert = issue_certificate(ca_key, ca_cert, SITE, not_before=future)
    with pytest.raises(IdentityError, match="certificate of site-1 is not valid before"):
        verify_issued_by(cert, ca_cert)


def test_certificate_of_another_ca(ca: tuple) -> None:
    other_key, other_cert = create_root_ca("test_project")
    _, cert = issue_certificate(other_key, other_cert, SITE)
    with pytest.raises(IdentityError, match="certificate of site-1 was not issued by this project's root CA"):
        verify_issued_by(cert, ca[1])
    with pytest.raises(IdentityError, match="is not a CA"):
        verify_root_ca(cert)
    verify_root_ca(other_cert)


def test_certificate_validity_never_outlives_the_ca() -> None:
    ca_key, ca_cert = create_root_ca("test_project", validity_days=10)
    _, cert = issue_certificate(ca_key, ca_cert, SITE, validity_days=365)
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc


def _bare_cert(ca: tuple, attributes: list[x509.NameAttribute]) -> x509.Certificate:
    ca_key, ca_cert = ca
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(generate_key().public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )


def test_identity_needs_every_attribute(ca: tuple) -> None:
    _, admin_cert = issue_certificate(*ca, ADMIN)
    assert identity_from_cert(admin_cert) == ADMIN
    cn = x509.NameAttribute(NameOID.COMMON_NAME, "site-1")
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "org-a")
    with pytest.raises(IdentityError, match="certificate of site-1: no OU"):
        identity_from_cert(_bare_cert(ca, [cn, org]))
    admin = [
        x509.NameAttribute(NameOID.COMMON_NAME, "x@y.org"),
        org,
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "admin"),
        x509.NameAttribute(NameOID.DN_QUALIFIER, "p"),
    ]
    with pytest.raises(IdentityError, match="no TITLE"):
        identity_from_cert(_bare_cert(ca, admin))
    with pytest.raises(IdentityError, match="role 'king'"):
        identity_from_cert(_bare_cert(ca, [*admin, x509.NameAttribute(NameOID.TITLE, "king")]))
    kinds = [
        cn,
        org,
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "robot"),
        x509.NameAttribute(NameOID.DN_QUALIFIER, "p"),
    ]
    with pytest.raises(IdentityError, match="type 'robot'"):
        identity_from_cert(_bare_cert(ca, kinds))


# --- roster ------------------------------------------------------------------------------------


def _payload(version: int = 3) -> dict:
    return {
        "project": "test_project",
        "version": version,
        "issued": "2025-01-02T03:04:05+00:00",
        "participants": [
            {"name": "server", "type": "server", "org": "org-a", "role": None},
            {"name": "site-1", "type": "client", "org": "org-a", "role": None},
            {"name": "lead@org-a.example", "type": "admin", "org": "org-a", "role": "lead"},
        ],
    }


def test_roster_round_trip(ca: tuple) -> None:
    roster = load_roster(sign_roster(_payload(), ca[0]), ca[1])
    assert (roster.project, roster.version, roster.issued.year) == ("test_project", 3, 2025)
    assert roster.sites == ("site-1",)
    member = roster.find("lead@org-a.example")
    assert member is not None and (member.type, member.org, member.role) == ("admin", "org-a", "lead")


def test_roster_changed_after_signing_is_refused(ca: tuple) -> None:
    document = json.loads(sign_roster(_payload(), ca[0]))
    document["payload"]["participants"].append({"name": "site-9", "type": "client", "org": "evil", "role": None})
    with pytest.raises(TamperedError, match="roster: signature does not verify"):
        load_roster(json.dumps(document).encode(), ca[1])
    document = json.loads(sign_roster(_payload(), ca[0]))
    document["payload"]["version"] = 99
    with pytest.raises(TamperedError):
        load_roster(json.dumps(document).encode(), ca[1])


def test_roster_signed_by_another_projects_ca_is_refused(ca: tuple) -> None:
    other_key, _ = create_root_ca("other_project")
    with pytest.raises(TamperedError, match="signature does not verify with this project's root CA"):
        load_roster(sign_roster(_payload(), other_key), ca[1])


@pytest.mark.parametrize(
    "data, message",
    [
        (b"not json", "not valid JSON"),
        (b"[]", "expected exactly the keys payload and signature"),
        (b'{"payload": {}, "signature": "!!"}', "signature must be a base64 string"),
    ],
)
def test_malformed_roster(ca: tuple, data: bytes, message: str) -> None:
    with pytest.raises(IdentityError, match=message):
        load_roster(data, ca[1])


def test_invalid_roster_is_never_signed(ca: tuple) -> None:
    payload = _payload()
    payload["participants"].append(payload["participants"][1])
    with pytest.raises(IdentityError, match="listed twice"):
        sign_roster(payload, ca[0])
    with pytest.raises(IdentityError, match="version"):
        sign_roster({**_payload(), "version": 0}, ca[0])


# --- signing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ecdsa-p384", "rsa-2048"])
def test_sign_and_verify_bytes(key_type: str) -> None:
    key = generate_key(key_type)
    signature = sign_bytes(b"weights", key)
    verify_bytes(b"weights", signature, key.public_key())
    with pytest.raises(TamperedError, match="update: signature does not verify"):
        verify_bytes(b"weightz", signature, key.public_key(), what="update")
    with pytest.raises(TamperedError):
        verify_bytes(b"weights", signature, generate_key(key_type).public_key())


def test_every_key_type_is_known() -> None:
    assert KEY_TYPES == ("ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096")


def test_manifest_of_a_folder(tmp_path: Path) -> None:
    (tmp_path / "app/custom").mkdir(parents=True)
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "app/custom/train.py").write_text("print(1)\n")
    (tmp_path / "signature.json").write_text("{}")
    files = manifest_of(tmp_path)
    assert sorted(files) == ["app/custom/train.py", "meta.json"]
    assert files["meta.json"] == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    (tmp_path / "app/link.py").symlink_to(tmp_path / "meta.json")
    with pytest.raises(ConfigError, match="app/link.py is a symbolic link"):
        manifest_of(tmp_path)


def test_signed_manifest_names_the_signer_and_refuses_a_swapped_one(tmp_path: Path) -> None:
    (tmp_path / "job").mkdir()
    (tmp_path / "job/meta.json").write_text("{}")
    key = generate_key("rsa-2048")
    signed = sign_manifest(manifest_of(tmp_path / "job"), key, signer="lead@org-a.example")
    assert verify_manifest(tmp_path / "job", signed, key.public_key()) == "lead@org-a.example"
    with pytest.raises(TamperedError, match="job/signature.json: signature does not verify"):
        verify_manifest(tmp_path / "job", {**signed, "signer": "admin@org-a.example"}, key.public_key())
    with pytest.raises(TamperedError, match="signed with rsa-pss-sha256"):
        verify_manifest(tmp_path / "job", signed, generate_key().public_key())


# --- mutual TLS with the kits ------------------------------------------------------------------


class _WhoIsCalling(health.HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self.callers: list[Identity] = []

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        pem = context.auth_context()["x509_pem_cert"][0]
        self.callers.append(identity_from_cert(x509.load_pem_x509_certificate(pem)))
        return super().Check(request, context)


@pytest.fixture
def tls_server(provisioned_project: ProvisionedProject) -> Iterator[tuple[int, _WhoIsCalling]]:
    kit = load_kit(provisioned_project.server, expect_type="server")
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    servicer = _WhoIsCalling()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(kit.key_pem, kit.cert_pem)], root_certificates=kit.root_pem, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield port, servicer
    server.stop(0)


def _check(kit_path: Path, port: int) -> None:
    kit = load_kit(kit_path)
    credentials = grpc.ssl_channel_credentials(kit.root_pem, kit.key_pem, kit.cert_pem)
    with grpc.secure_channel(f"{kit.server_host}:{port}", credentials) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)


def test_kits_connect_over_mutual_tls(
    tls_server: tuple[int, _WhoIsCalling], provisioned_project: ProvisionedProject, tmp_path: Path
) -> None:
    port, servicer = tls_server
    _check(provisioned_project.sites[1], port)
    _check(provisioned_project.admin_roles["member"], port)
    assert [(c.name, c.type, c.role) for c in servicer.callers] == [
        ("site-2", "client", None),
        ("member@org-a.example", "admin", "member"),
    ]

    from conftest import provision_project  # a project with its own root CA

    stranger = provision_project(tmp_path, n_sites=1, admins=())
    with pytest.raises(grpc.RpcError):
        _check(stranger.sites[0], port)
    assert len(servicer.callers) == 2


# --- the kit's scripts -------------------------------------------------------------------------

# Stands in for python so that the scripts can be exercised without the daemons: it answers the
# import check and, run as "-m MODULE --kit KIT", serves until SIGTERM like a daemon does.
STUB_PYTHON = """#!/usr/bin/env bash
if [[ "$1" == "-c" ]]; then exit 0; fi
if [[ "$2" == "fedgrid.console" ]]; then echo "console $*"; exit 0; fi
kit="$4"
if [[ -n "${STUB_CRASH:-}" ]]; then echo "stub: cannot bind port"; exit 3; fi
trap 'rm -f "$kit/daemon.ready"; echo "stub: stopping"; exit 0' TERM
echo "stub: serving"
touch "$kit/daemon.ready"
while :; do sleep 0.05; done
"""


def _run(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "FEDGRID_START_TIMEOUT": "10", **env},
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    waited = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    return not waited.stdout.strip().startswith("Z")


def test_scripts_are_valid_bash(provisioned_project: ProvisionedProject) -> None:
    scripts = [p for kit in provisioned_project.kits for p in (kit / "startup").glob("*.sh")]
    assert len(scripts) == 2 * (1 + len(provisioned_project.sites)) + len(provisioned_project.admins)
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script


def test_start_and_stop_a_daemon(site_kit: Path, tmp_path: Path) -> None:
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    start, stop = site_kit / "startup/start.sh", site_kit / "startup/stop.sh"
    pid_file = site_kit / "daemon.pid"

    missing = _run(start, FEDGRID_PYTHON=str(tmp_path / "no-python"))
    assert missing.returncode == 1 and "cannot import fedgrid" in missing.stderr and "FEDGRID_PYTHON" in missing.stderr
    assert _run(stop).stdout.startswith("not running")

    started = _run(start, FEDGRID_PYTHON=str(stub))
    assert started.returncode == 0, started.stderr
    pid = int(pid_file.read_text())
    try:
        assert f"pid {pid}" in started.stdout and "log.txt" in started.stdout
        assert _alive(pid) and (site_kit / "daemon.ready").exists()

        again = _run(start, FEDGRID_PYTHON=str(stub))
        assert again.returncode == 1 and f"already running, pid {pid}" in again.stderr

        stopped = _run(stop)
        assert stopped.returncode == 0 and f"pid {pid}" in stopped.stdout
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
        assert not pid_file.exists() and not (site_kit / "daemon.ready").exists()
        assert "stub: stopping" in (site_kit / "log.txt").read_text()
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_start_reports_a_daemon_that_dies(site_kit: Path, tmp_path: Path) -> None:
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    (site_kit / "daemon.pid").write_text(f"{os.getpid()}\n")  # stale: a live pid that is not the daemon

    crashed = _run(site_kit / "startup/start.sh", FEDGRID_PYTHON=str(stub), STUB_CRASH="1")

    assert crashed.returncode == 1
    assert "exited during start-up" in crashed.stderr and "stub: cannot bind port" in crashed.stderr
    assert not (site_kit / "daemon.pid").exists()
    assert _alive(os.getpid())


def test_admin_script_passes_arguments_to_the_console(provisioned_project: ProvisionedProject, tmp_path: Path) -> None:
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    kit = provisioned_project.admin_roles["lead"]
    result = _run(kit / "startup/fl_admin.sh", "list_jobs", "-n", "5", FEDGRID_PYTHON=str(stub))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"console -m fedgrid.console --kit {kit} list_jobs -n 5"
