"""An encrypted job's HE key made at a site (`he.keys: sites`): the worker's part, when the job starts.

Every worker of the job sends its certificate and asks for the key (fedserver/job_keys.py relays). The key
site is answered with the other sites' certificates: it makes a fresh CKKS context with the project's
parameters (from its kit), sends the server the keyless part, and the secret context wrapped for each other
site with that site's certificate key (fedgrid/keywrap.py). Any other site is answered with the blob
addressed to it and opens it only if it is for this site and this job, from the job's key site (its
`key_site`, else the site the server names, which must be a site the job is deployed to), signed by that
site's certificate from the project's root CA, and holds a context with the project's parameters.

The secret context lives in the worker's memory for the job's duration and is written nowhere: a new job
has a new key, and no key opens another job's ciphertexts.
"""

from __future__ import annotations

import logging
import time

from cryptography.hazmat.primitives import serialization

from fedgrid import he, keywrap
from fedgrid.certs import load_cert_pem
from fedgrid.errors import PrivacyError
from fedgrid.jobspec import JobSpec
from fedgrid.kit import Kit
from fedgrid.v1 import federation_pb2 as fpb

log = logging.getLogger("fedclient.api")


def project_params(kit: Kit) -> he.HEParams:
    """The CKKS parameters the project was provisioned with (the kit's config.json)."""
    values = {k: v for k, v in kit.he.params.items() if k != "keys"}
    return he.HEParams.from_dict(values, where=f"{kit.path}/startup/config.json: he")


def accepted_senders(spec: JobSpec, named: str) -> set[str]:
    """The sites this job takes its key from: its key_site; else the one the server names, if the job is
    deployed to it (any site of the project for a job deployed to all)."""
    if spec.server.key_site:
        return {spec.server.key_site}
    if spec.all_sites or named in spec.named_sites():
        return {named}
    return set()


def obtain(stream: object, kit: Kit, job_id: str, spec: JobSpec) -> he.HEContext:
    """This job's secret HE context: made here (key site) or received wrapped for this site."""
    started = time.perf_counter()
    params = project_params(kit)
    request = fpb.PrivacyRequest(job_id=job_id, job_key=fpb.JobKeyRequest(cert_pem=kit.cert_pem))
    answer = stream.privacy(request, "job key").job_key  # type: ignore[attr-defined]
    private_key = serialization.load_pem_private_key(kit.key_pem, password=None)
    if answer.key_site == kit.name:
        if spec.server.key_site not in ("", kit.name):
            raise PrivacyError(
                f"job key: the server asks {kit.name} to make the key, but the job names {spec.server.key_site}"
            )
        answered = time.perf_counter()
        secret, public = he.create_contexts(params)
        wrapped = []
        for recipient in answer.recipients:
            if recipient.site not in spec.named_sites() and not spec.all_sites:
                raise PrivacyError(f"job key: {recipient.site} is not a site of this job; no key is wrapped for it")
            wrapped.append(
                keywrap.wrap_secret(
                    secret,
                    job_id=job_id,
                    sender_key=private_key,  # type: ignore[arg-type]
                    sender_cert=kit.cert,
                    recipient_cert=load_cert_pem(recipient.cert_pem, f"certificate of {recipient.site}"),
                    ca_cert=kit.ca_cert,
                )
            )
        made = time.perf_counter() - answered
        offer = fpb.PrivacyRequest(job_id=job_id, key_offer=fpb.JobKeyOffer(public_context=public, wrapped=wrapped))
        stream.privacy(offer, "job key offer")  # type: ignore[attr-defined]
        log.info(
            "made this job's HE key and wrapped it for %d sites in %.3f s (%.3f s from asking, with the wait for "
            "the other sites' certificates)",
            len(wrapped),
            made,
            time.perf_counter() - started,
        )
        return he.HEContext.load(secret, expect_secret_key=True, where="the job's HE context")
    secret = keywrap.unwrap_secret(
        answer.wrapped,
        job_id=job_id,
        senders=accepted_senders(spec, answer.key_site),
        recipient_key=private_key,  # type: ignore[arg-type]
        recipient_cert=kit.cert,
        ca_cert=kit.ca_cert,
    )
    context = he.HEContext.load(secret, expect_secret_key=True, where=f"the job's HE context from {answer.key_site}")
    if context.params != params:
        raise PrivacyError(
            f"job key: the context from {answer.key_site} has parameters ({context.params.describe()}) other than "
            f"the project's ({params.describe()})"
        )
    log.info("received this job's HE key from %s in %.3f s", answer.key_site, time.perf_counter() - started)
    return context

