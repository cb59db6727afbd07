"""SecAgg+ at a site: the steps of fedgrid/secagg.py run over the worker's stream, around the masked upload.

A training result under `secure_aggregation: secagg+` goes out as

    1 advertise   two fresh X25519 public keys, signed with this site's certificate key; answered with the
                  round's sites and the advertisements of this site's neighbours, each checked: signed by the
                  key of a certificate this project's root CA issued to that site
    2 share keys  the seed commitment and the shares encrypted for each neighbour; answered with the shares
                  the neighbours encrypted for this site
    3 mask        the quantized difference to the global model, masked, uploaded as the result ("secagg+")
    4 unmask      told who survived and who dropped, the shares that remove exactly those masks

The session id is computed here from the job and the task id (which carries the round and the attempt),
and the neighbour graph from the round's sites and that session, so the server chooses neither. The
difference covers the floating point tensors of the result (the model's and a strategy's own, such as
SCAFFOLD's control variate, each against what the task brought); integer tensors are not sent and the
global model keeps their values. Each site counts once: the server divides the sum by the number of
survivors (by the number of sites asked under differential privacy, whose noise is added here first).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives import serialization

from fedclient.privacy import private_difference
from fedgrid import dp, secagg, tensors
from fedgrid.certs import identity_from_cert, load_cert_pem, public_key_of, verify_issued_by
from fedgrid.errors import FedgridError, PrivacyError, StateError
from fedgrid.kit import Kit
from fedgrid.privacy_config import SecAggConfig
from fedgrid.signing import sign_bytes, verify_bytes
from fedgrid.v1 import federation_pb2 as fpb

log = logging.getLogger("fedclient.api")

FORMAT = "secagg+"
"""The payload format of a masked update: encode_masked's little-endian integers."""


def difference_vector(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> np.ndarray:
    """update − reference over the tensors a masked update carries, as one float64 vector."""
    layout = tensors.layout_of(reference)
    tensors.check_layout(update, layout, "secagg: this site's update (against the task's tensors)")
    parts = [
        np.asarray(update[name], np.float64).reshape(-1) - np.asarray(reference[name], np.float64).reshape(-1)
        for name in secagg.masked_names(layout)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def signed_advert(kit: Kit, advert: secagg.Advertisement, session: bytes, task_id: str) -> fpb.SecAggAdvert:
    key = serialization.load_pem_private_key(kit.key_pem, password=None)
    return fpb.SecAggAdvert(
        task_id=task_id,
        site=advert.site,
        mask_key=advert.mask_key,
        channel_key=advert.channel_key,
        signature=sign_bytes(advert.signed_bytes(session), key),  # type: ignore[arg-type]
        cert_pem=kit.cert_pem,
    )


def checked_advert(message: fpb.SecAggAdvert, kit: Kit, session: bytes) -> secagg.Advertisement:
    """A neighbour's advertisement, once its certificate (this project's root CA, a site, its name) and its
    signature over the keys and the session are checked: the server cannot substitute keys."""
    site = message.site
    try:
        cert = load_cert_pem(message.cert_pem, f"certificate of {site}")
        verify_issued_by(cert, kit.ca_cert)
        identity = identity_from_cert(cert)
    except FedgridError as exc:
        raise PrivacyError(f"secagg: the advertisement of {site}: {exc}") from None
    if identity.type != "client" or identity.name != site or identity.project != kit.project:
        raise PrivacyError(f"secagg: the advertisement relayed as {site}'s carries the certificate of {identity.name}")
    advert = secagg.Advertisement(site, bytes(message.mask_key), bytes(message.channel_key))
    try:
        verify_bytes(advert.signed_bytes(session), message.signature, public_key_of(cert), what="advertisement")
    except FedgridError:
        raise PrivacyError(f"secagg: the keys advertised as {site}'s are not signed by its certificate key") from None
    return advert


class SecureRound:
    """One site's part in one SecAgg+ round: what `JobSession` calls around the masked upload."""

    def __init__(self, stream: object, kit: Kit, job_id: str, task_id: str, config: SecAggConfig) -> None:
        self.stream = stream
        self.kit = kit
        self.job_id = job_id
        self.task_id = task_id
        self.config = config
        self.session = secagg.session_of(job_id, task_id)
        self.state: secagg.SiteState | None = None

    def _ask(self, what: str, **step: object) -> fpb.PrivacyReply:
        request = fpb.PrivacyRequest(job_id=self.job_id, **step)  # type: ignore[arg-type]
        return self.stream.privacy(request, f"secagg {what}")  # type: ignore[attr-defined]

    def masked(
        self,
        update: Mapping[str, np.ndarray],
        reference: Mapping[str, np.ndarray],
        privacy: dp.DPParams | None,
        settings: Mapping[str, float],
    ) -> bytes:
        """Steps 1-3: the masked update to upload. PrivacyError when the round cannot go on safely."""
        if privacy is not None:
            noisy = private_difference(update, reference, privacy, settings)
            vector = difference_vector(noisy, {name: np.zeros_like(value) for name, value in noisy.items()})
        else:
            vector = difference_vector(update, reference)
        site = self.kit.name
        mask_private, channel_private, advert = secagg.fresh_keys(site)
        keys = self._ask("advertise", advertise=signed_advert(self.kit, advert, self.session, self.task_id)).keys
        sites = list(keys.sites)
        if site not in sites:
            raise PrivacyError(f"secagg: the server's list of the round's sites leaves out {site}")
        params = self.config.params(len(sites))
        setup = secagg.setup_round(self.session, sites, params, secagg.graph_seed(self.session))
        state = secagg.SiteState(setup, site, mask_private, channel_private)
        adverts = {}
        for message in keys.adverts:
            if message.site not in state.neighbours:
                raise PrivacyError(f"secagg: the server relayed keys of {message.site}, not a neighbour of {site}")
            adverts[message.site] = checked_advert(message, self.kit, self.session)
        shared = secagg.share_keys(state, adverts)
        inbox = self._ask(
            "shares",
            shares=fpb.SecAggShares(
                task_id=self.task_id, commitment=shared.commitment, shares=dict(shared.encrypted_shares)
            ),
        ).inbox
        quantized = secagg.quantize(vector, params, clip=privacy is not None, what=f"{site}'s update")
        masked = secagg.mask(state, quantized, dict(inbox.shares))
        self.state = state
        return secagg.encode_masked(masked, params)

    def unmask(self) -> None:
        """Step 4, after the masked upload was taken: the shares the survivors' list asks for, once."""
        if self.state is None:
            raise StateError("secagg: step 4 before step 3")
        survivors = self._ask("unmask", unmask=fpb.SecAggUnmask(task_id=self.task_id)).survivors
        answer = secagg.reveal(self.state, list(survivors.survivors), list(survivors.dropped))
        self._ask(
            "reveal",
            reveal=fpb.SecAggReveal(
                task_id=self.task_id,
                seed_shares={v: fpb.SecAggShare(index=s.index, data=s.data) for v, s in answer.seed_shares.items()},
                key_shares={v: fpb.SecAggShare(index=s.index, data=s.data) for v, s in answer.key_shares.items()},
            ),
        )
        log.info(
            "secagg: %s unmasking shares sent for %d survivors and %d dropped sites",
            self.task_id,
            len(answer.seed_shares),
            len(answer.key_shares),
        )

