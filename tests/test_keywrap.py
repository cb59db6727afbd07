"""fedgrid.keywrap with the keys and certificates of provisioned projects (EC and RSA): a real HE secret context
goes from the key site to another site, and every blob that is not exactly that is refused with its reason."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import pytest
from conftest import ProvisionedProject, provision_project
from cryptography.hazmat.primitives import serialization

from fedgrid import he, keywrap
from fedgrid.errors import PrivacyError
from fedgrid.kit import Kit, load_kit
from fedgrid.signing import PrivateKey, canonical_json, sign_bytes

JOB = "3f1c9e0a-job"
SMALL_HE = he.HEParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(56, 40))


@pytest.fixture(scope="module", params=["ecdsa-p256", "ecdsa-p384", "rsa-2048"])
def project(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    folder = tmp_path_factory.mktemp(f"keywrap-{request.param}")
    return provision_project(folder, n_sites=3, admins=(), key_type=request.param)


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    """Another project with the same site names and its own root CA."""
    return provision_project(tmp_path_factory.mktemp("stranger"), n_sites=3, admins=())


def kits(project: ProvisionedProject) -> dict[str, Kit]:
    return {k.name: k for k in (load_kit(p, "client") for p in project.sites)}


def wrap(sender: Kit, recipient: Kit, secret: bytes, job: str = JOB) -> bytes:
    return keywrap.wrap_secret(
        secret,
        job_id=job,
        sender_key=sender.private_key(),
        sender_cert=sender.cert,
        recipient_cert=recipient.cert,
        ca_cert=sender.ca_cert,
    )


def unwrap(recipient: Kit, blob: bytes, job: str = JOB, senders: tuple[str, ...] = ("site-1",)) -> bytes:
    return keywrap.unwrap_secret(
        blob,
        job_id=job,
        senders=senders,
        recipient_key=recipient.private_key(),
        recipient_cert=recipient.cert,
        ca_cert=recipient.ca_cert,
    )


def split(blob: bytes) -> tuple[dict[str, str], bytes]:
    """The header and ciphertext of a blob, read independently of the module."""
    offset = len(keywrap.MAGIC)
    (size,) = struct.unpack_from("<I", blob, offset)
    header = json.loads(blob[offset + 4 : offset + 4 + size])
    offset += 4 + size
    (size,) = struct.unpack_from("<I", blob, offset)
    return header, blob[offset + 4 : offset + 4 + size]


def assemble(header: dict[str, str], ciphertext: bytes, signer: PrivateKey) -> bytes:
    """A blob as an attacker holding `signer` would make one."""
    head = canonical_json(header)
    body = keywrap.MAGIC + struct.pack("<I", len(head)) + head + struct.pack("<I", len(ciphertext)) + ciphertext
    signature = sign_bytes(body, signer)
    return body + struct.pack("<I", len(signature)) + signature


def pem(kit: Kit) -> str:
    return kit.cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def test_a_site_opens_the_he_secret_context_the_key_site_wrapped_for_it(project: ProvisionedProject) -> None:
    site = kits(project)
    secret, _public = he.create_contexts(SMALL_HE)
    blob = wrap(site["site-1"], site["site-2"], secret)
    assert keywrap.addressing(blob) == (JOB, "site-1", "site-2")
    assert secret[-64:] not in blob and secret[len(secret) // 2 : len(secret) // 2 + 64] not in blob
    opened = unwrap(site["site-2"], blob)
    assert opened == secret
    assert he.HEContext.load(opened, expect_secret_key=True).context_id == he.HEContext.load(secret).context_id
    # Each wrap is fresh (a new ephemeral or AES key and nonce): wrapping again gives another ciphertext.
    assert split(wrap(site["site-1"], site["site-2"], secret))[1][:32] != split(blob)[1][:32]


def test_a_blob_for_another_site_or_job_or_from_another_sender_is_refused(project: ProvisionedProject) -> None:
    site = kits(project)
    blob = wrap(site["site-1"], site["site-2"], b"k" * 100)
    with pytest.raises(PrivacyError, match="^wrapped key for site-2, not for site-3$"):
        unwrap(site["site-3"], blob)
    with pytest.raises(PrivacyError, match="^wrapped key for job 3f1c9e0a-job, not for this job other-job$"):
        unwrap(site["site-2"], blob, job="other-job")
    with pytest.raises(PrivacyError, match=r"from site-1, which is not this job's key site \(site-3\)"):
        unwrap(site["site-2"], blob, senders=("site-3",))


def test_a_blob_signed_by_another_site_in_the_senders_name_is_refused(project: ProvisionedProject) -> None:
    site = kits(project)
    # site-3 (a member of the project, not the key site) wraps its own key for site-2 and claims site-1 sent it.
    header, ciphertext = split(wrap(site["site-3"], site["site-2"], b"attacker's key" * 8))
    header.update(sender="site-1", sender_cert=pem(site["site-1"]))
    forged = assemble(header, ciphertext, site["site-3"].private_key())
    with pytest.raises(PrivacyError, match="not signed by site-1's certificate key: forged, or altered"):
        unwrap(site["site-2"], forged)
    # Nor can it send its own certificate under site-1's name.
    header["sender_cert"] = pem(site["site-3"])
    with pytest.raises(PrivacyError, match="claims to be from site-1 but carries site-3's certificate"):
        unwrap(site["site-2"], assemble(header, ciphertext, site["site-3"].private_key()))


def test_a_sender_certificate_from_another_root_ca_is_refused(
    project: ProvisionedProject, stranger: ProvisionedProject
) -> None:
    site, other = kits(project), kits(stranger)
    header, ciphertext = split(wrap(site["site-1"], site["site-2"], b"k" * 32))
    header["sender_cert"] = pem(other["site-1"])  # the same name, from a CA this project does not trust
    blob = assemble(header, ciphertext, other["site-1"].private_key())
    with pytest.raises(PrivacyError, match="certificate of site-1 was not issued by this project's root CA"):
        unwrap(site["site-2"], blob)


def test_any_altered_byte_is_refused(project: ProvisionedProject) -> None:
    site = kits(project)
    blob = wrap(site["site-1"], site["site-2"], b"s" * 300)
    header, ciphertext = split(blob)
    head_len = len(canonical_json(header))
    start = len(keywrap.MAGIC) + 4
    unsigned = "not signed by site-1's certificate key: forged, or altered on the way"
    positions = {  # where the byte is -> why it is refused
        0: "does not start with the keywrap magic bytes",
        start + head_len // 2: "sender's certificate",  # inside the sender's certificate
        start + head_len + 4 + 10: unsigned,  # the ciphertext
        start + head_len + 4 + len(ciphertext) - 1: unsigned,  # the GCM tag
        len(blob) - 5: unsigned,  # the signature
    }
    for position, reason in positions.items():
        altered = bytearray(blob)
        altered[position] ^= 0x01
        with pytest.raises(PrivacyError, match=reason):
            unwrap(site["site-2"], bytes(altered))
    with pytest.raises(PrivacyError, match="truncated"):
        unwrap(site["site-2"], blob[: len(keywrap.MAGIC) + 2])
    with pytest.raises(PrivacyError, match="bytes follow the signature"):
        unwrap(site["site-2"], blob + b"\x00")


def test_the_aead_binds_the_header_even_under_a_valid_signature(project: ProvisionedProject) -> None:
    site = kits(project)
    header, ciphertext = split(wrap(site["site-1"], site["site-2"], b"s" * 64, job="job-a"))
    header["job"] = "job-b"  # re-labelled and re-signed by the sender itself: the ciphertext still says job-a
    relabelled = assemble(header, ciphertext, site["site-1"].private_key())
    with pytest.raises(PrivacyError, match="does not decrypt: altered after encryption"):
        unwrap(site["site-2"], relabelled, job="job-b")


def test_the_key_site_wraps_only_for_other_sites_of_the_project(
    project: ProvisionedProject, stranger: ProvisionedProject
) -> None:
    site, other = kits(project), kits(stranger)
    server = load_kit(project.server, "server")
    with pytest.raises(PrivacyError, match="recipient's certificate: server is a server, not a site"):
        wrap(site["site-1"], server, b"k")
    with pytest.raises(PrivacyError, match="certificate of site-2 was not issued by this project's root CA"):
        wrap(site["site-1"], other["site-2"], b"k")
    with pytest.raises(PrivacyError, match="site-1 would wrap the key for itself"):
        wrap(site["site-1"], site["site-1"], b"k")
    with pytest.raises(PrivacyError, match="private key does not belong to its certificate"):
        keywrap.wrap_secret(
            b"k",
            job_id=JOB,
            sender_key=site["site-3"].private_key(),
            sender_cert=site["site-1"].cert,
            recipient_cert=site["site-2"].cert,
            ca_cert=site["site-1"].ca_cert,
        )


def test_a_blob_for_the_key_a_site_had_before_it_was_provisioned_again(tmp_path: Path) -> None:
    first = provision_project(tmp_path, n_sites=2, admins=())
    old = kits(first)
    blob = wrap(old["site-1"], old["site-2"], b"k" * 16)
    again = provision_project(tmp_path, n_sites=2, admins=())  # prod_01: same root CA, new site keys
    new_site_2 = kits(again)["site-2"]
    assert new_site_2.ca_cert == old["site-2"].ca_cert
    with pytest.raises(PrivacyError, match=r"wrapped key for another key of site-2 \(was site-2 provisioned again"):
        unwrap(new_site_2, blob)


def test_a_blob_that_is_not_one_is_refused_in_one_line(project: ProvisionedProject) -> None:
    site = kits(project)
    for junk, reason in (
        (b"", "does not start with the keywrap magic"),
        (keywrap.MAGIC + struct.pack("<I", 3) + b"[1]" + struct.pack("<II", 0, 0), "the header must hold exactly"),
        (keywrap.MAGIC + struct.pack("<I", 1 << 30), "the header length 1073741824 is beyond the blob"),
    ):
        with pytest.raises(PrivacyError, match=reason):
            unwrap(site["site-2"], junk)
    header, ciphertext = split(wrap(site["site-1"], site["site-2"], b"k" * 16))
    header["nonce"] = "not base64!"
    with pytest.raises(PrivacyError, match="the nonce is not base64"):
        unwrap(site["site-2"], assemble(header, ciphertext, site["site-1"].private_key()))
    assert base64.b64decode(split(wrap(site["site-1"], site["site-2"], b"k"))[0]["nonce"])
