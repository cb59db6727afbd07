"""HE keys made at the sites (`he.keys: sites`, the default), on real daemons over mTLS from real kits.

The guarantees: after an encrypted job no file of the server, of the provisioning folders or of the kits
holds a secret key; each job gets a key of its own; a site refuses a wrapped key that is forged (altered
after the key site signed it) or addressed to another site, and the job fails with that reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ProvisionedProject, provision_project
from cryptography.hazmat.primitives import serialization
from federation import Federation, running
from rogue import RogueSite

from fedclient.job_key import project_params
from fedgrid import dp, he, keywrap, tensors
from fedgrid.certs import load_cert_pem
from fedgrid.recipe import FedAvgRecipe
from fedgrid.v1 import federation_pb2 as fpb

TINY = Path(__file__).parent / "scripts" / "train_tiny.py"
SECRET_FLAG = b'"secret_key": true'
"""What the metadata of an HE context holding a secret key says (fedgrid/he/context.py)."""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    return provision_project(tmp_path_factory.mktemp("he-sites"), n_sites=3, he=True)


@pytest.fixture(scope="module")
def federation(project: ProvisionedProject) -> Iterator[Federation]:
    with running(project, project.sites[:2]) as fed:
        yield fed


def tiny(name: str, min_clients: int = 2, **options: object) -> FedAvgRecipe:
    torch.manual_seed(0)
    return FedAvgRecipe(
        name=name,
        model=torch.nn.Linear(8, 1),
        train_script=TINY,
        num_rounds=2,
        min_clients=min_clients,
        encryption=True,
        **options,
    )  # type: ignore[arg-type]


def holding_a_secret_key(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and SECRET_FLAG in p.read_bytes()]


def test_an_encrypted_job_runs_on_a_key_made_at_a_site_and_no_secret_key_is_stored_anywhere(
    project: ProvisionedProject, federation: Federation, tmp_path: Path
) -> None:
    contexts = []
    with federation.session() as session:
        for name in ("he-sites-1", "he-sites-2"):
            job_id = session.submit_job(tiny(name).export(tmp_path / name))
            info = session.wait(job_id)
            assert info.status == "FINISHED:COMPLETED", info.error
            result = session.download_job(job_id, tmp_path / f"{name}-result")
            log = (result / "log.txt").read_text()
            assert "job key made by site-1" in log
            assert json.loads((result / "result.json").read_text())["rounds_completed"] == 2
            final = tensors.load_file(result / "final_model.safetensors")
            assert np.isfinite(final["weight"]).all()
            site_log = (result / "sites" / "site-2" / "log.txt").read_text()
            assert "received this job's HE key from site-1" in site_log
            kept = project.server / "workspace" / "jobs" / job_id / "he_public_context.bin"
            contexts.append(he.HEContext.load(kept.read_bytes(), expect_secret_key=False))
    assert contexts[0].context_id != contexts[1].context_id  # a key per job
    root = project.prod_dir.parent  # kits of every run and the provisioning state folder
    assert holding_a_secret_key(root) == []
    assert holding_a_secret_key(project.server / "workspace") == []
    assert not list(root.rglob("he_context.bin"))


def _rogue_key_site(project: ProvisionedProject, spoil: str) -> RogueSite:
    """site-3 played by the test as the key site: it wraps a real context, then spoils the blob it relays
    (altered after signing, or wrapped for a site that is not in the job)."""
    kit_path = project.sites[2]

    def make_key(stream: object, job_id: str) -> None:
        from fedgrid.kit import load_kit

        kit = load_kit(kit_path, expect_type="client")
        request = fpb.PrivacyRequest(job_id=job_id, job_key=fpb.JobKeyRequest(cert_pem=kit.cert_pem))
        answer = stream.privacy(request, "job key").job_key  # type: ignore[attr-defined]
        secret, public = he.create_contexts(project_params(kit))
        key = serialization.load_pem_private_key(kit.key_pem, password=None)
        certs = {r.site: load_cert_pem(r.cert_pem, r.site) for r in answer.recipients}
        wrapped = []
        for site in certs:
            recipient = certs[site]
            if spoil == "misaddressed":
                recipient = load_cert_pem((project.sites[0] / "startup" / "cert.pem").read_bytes(), "site-1")
            blob = bytearray(
                keywrap.wrap_secret(
                    secret,
                    job_id=job_id,
                    sender_key=key,  # type: ignore[arg-type]
                    sender_cert=kit.cert,
                    recipient_cert=recipient,
                    ca_cert=kit.ca_cert,
                )
            )
            if spoil == "forged":
                blob[-80] ^= 0x01  # inside the signature: no longer the key site's
            wrapped.append(bytes(blob))
        offer = fpb.PrivacyRequest(job_id=job_id, key_offer=fpb.JobKeyOffer(public_context=public, wrapped=wrapped))
        stream.privacy(offer, "job key offer")  # type: ignore[attr-defined]

    return RogueSite(kit_path, answer=lambda header, payload: ("", b""), on_start=make_key)


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        ("forged", "not signed by site-3's certificate key"),
        ("misaddressed", "site-3 -> site-1 for job"),
    ],
)
def test_a_forged_or_misaddressed_wrapped_key_is_refused_and_the_job_fails_with_the_reason(
    project: ProvisionedProject, federation: Federation, tmp_path: Path, spoil: str, reason: str
) -> None:
    """A forged blob reaches site-2, which refuses it (its worker fails with the reason, and so does the job);
    a blob for a site outside the job is refused by the server's relay, and the job fails with that."""
    rogue = _rogue_key_site(project, spoil)
    rogue.start()
    try:
        federation.wait_alive(["site-2", "site-3"])
        recipe = tiny(f"he-{spoil}", sites=["site-2", "site-3"], key_site="site-3")
        with federation.session() as session:
            job_id = session.submit_job(recipe.export(tmp_path / "job"))
            info = session.wait(job_id)
        assert info.status == "FINISHED:EXECUTION_EXCEPTION"
        assert reason in info.error, (info.error, rogue.errors)
    finally:
        rogue.close()


def test_distributed_privacy_runs_under_site_made_keys_and_records_epsilon(
    federation: Federation, tmp_path: Path
) -> None:
    """Each site clips and noises its update before encrypting it (weight 1): the server never sees an update,
    and the accountant charges every round."""
    privacy = {"clip_norm": 0.5, "noise_multiplier": 1.0, "delta": 1e-5, "where": "sites"}
    with federation.session() as session:
        job_id = session.submit_job(tiny("he-dp", privacy=privacy).export(tmp_path / "job"))
        info = session.wait(job_id)
        assert info.status == "FINISHED:COMPLETED", info.error
        detail = session.show_job(job_id)
    epsilons = [r.metrics["epsilon"] for r in detail.rounds]
    params = dp.DPParams(clip_norm=0.5, noise_multiplier=1.0, delta=1e-5, where="sites")
    assert epsilons == pytest.approx([dp.epsilon_spent(params, 1), dp.epsilon_spent(params, 2)])
