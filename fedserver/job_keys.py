"""An encrypted job's HE key, made at one of its sites (`he.keys: sites`): the server's part is a relay.

When the job's workers start, each sends its site certificate and asks for the job's key
(fedclient/job_key.py). The key site (the job's `key_site`, or its first site) is answered with the other
sites' certificates once all of them have asked; it makes a fresh CKKS context, sends the server the keyless
part (parameters and a context id: what adding ciphertexts needs) and the secret context wrapped for each
other site (fedgrid/keywrap.py); each of them is answered with the blob addressed to it. The server keeps the
keyless context in the job's folder (a resumed job adds with it again) and never holds a secret key: it
refuses a context that carries one, routes blobs by the addressing they claim, and cannot open them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from fedgrid import keywrap
from fedgrid.certs import identity_from_cert, load_cert_pem
from fedgrid.errors import EncryptionError, FedgridError, PrivacyError, StateError
from fedgrid.files import write_atomic
from fedgrid.v1 import federation_pb2 as fpb
from fedserver.grid import TaskBoard

CONTEXT_FILE = "he_public_context.bin"
"""The job's keyless context, in its folder on the server."""
WAIT = 120.0
"""Seconds the key site waits for the other sites' certificates, and they for their wrapped key."""
POLL = 0.2


class JobKeys:
    def __init__(self, *, job_id: str, key_site: str, board: TaskBoard, job_dir: Path, log: logging.Logger) -> None:
        self.job_id = job_id
        self.key_site = key_site
        self.board = board
        self.path = job_dir / CONTEXT_FILE
        self.log = log
        self.certs: dict[str, bytes] = {}
        self.wrapped: dict[str, bytes] = {}
        self.public_context: bytes | None = self.path.read_bytes() if self.path.exists() else None
        self.offered = self.public_context is not None
        self.refused = ""
        """Why the key site's offer was refused: the job cannot get its key, and fails with this reason."""
        self._changed = asyncio.Event()

    async def request(self, site: str, cert_pem: bytes) -> fpb.JobKey:
        """A site's certificate in, and what it needs back: the recipients (key site) or its wrapped key."""
        try:
            name = identity_from_cert(load_cert_pem(cert_pem, f"certificate of {site}")).name
        except FedgridError as exc:
            raise PrivacyError(f"job key: {exc}") from None
        if name != site:
            raise PrivacyError(f"job key: {site} sent the certificate of {name}")
        self.certs[site] = cert_pem
        self._changed.set()
        if site == self.key_site:
            if self.offered:
                raise StateError(f"job key: {site} made this job's key already; it is not made twice")
            await self._until(lambda: set(self.board.active_sites()) <= set(self.certs))
            recipients = [
                fpb.SiteCertificate(site=other, cert_pem=cert)
                for other, cert in sorted(self.certs.items())
                if other != site and other in self.board.active_sites()
            ]
            self.log.info("job key: %s makes the key for %d other sites", site, len(recipients))
            return fpb.JobKey(key_site=self.key_site, recipients=recipients)
        await self._until(lambda: site in self.wrapped or self.offered or bool(self.refused))
        if self.refused:
            raise StateError(f"job key: {self.refused}")
        if site not in self.wrapped:
            raise StateError(f"job key: the key site {self.key_site} wrapped no key for {site}")
        return fpb.JobKey(key_site=self.key_site, wrapped=self.wrapped[site])

    def offer(self, site: str, offer: fpb.JobKeyOffer) -> None:
        """The key site's keyless context and wrapped keys; refused whole unless each part is what it claims
        (and then the job cannot have its key: it fails with the reason)."""
        try:
            self._take(site, offer)
        except PrivacyError as exc:
            if site == self.key_site:
                self.refused = f"the key site's offer was refused: {exc}"
                self._changed.set()
            raise

    def _take(self, site: str, offer: fpb.JobKeyOffer) -> None:
        if site != self.key_site:
            raise PrivacyError(f"job key: {site} is not this job's key site ({self.key_site})")
        if self.offered:
            raise StateError("job key: this job's key was made already")
        from fedgrid import he

        try:
            he.HEContext.load(offer.public_context, expect_secret_key=False, where=f"the job context from {site}")
        except EncryptionError as exc:
            raise PrivacyError(f"job key: refused: {exc}") from None
        routed: dict[str, bytes] = {}
        for blob in offer.wrapped:
            job, sender, recipient = keywrap.addressing(blob)
            if job != self.job_id or sender != site or recipient not in self.certs or recipient in routed:
                raise PrivacyError(f"job key: a wrapped key addressed {sender} -> {recipient} for job {job} is not "
                                   "one this job expects")
            routed[recipient] = bytes(blob)
        write_atomic(self.path, offer.public_context)
        self.public_context = bytes(offer.public_context)
        self.wrapped = routed
        self.offered = True
        self._changed.set()
        self.log.info("job key: keyless context from %s kept; wrapped keys for %s relayed", site,
                      ", ".join(sorted(routed)) or "no other site")

    async def context(self, timeout: float = WAIT) -> bytes:
        """The keyless context to add this job's ciphertexts with; StateError when the key site sent none."""
        started = time.monotonic()
        await self._until(
            lambda: self.offered or bool(self.refused) or self.key_site not in self.board.active_sites(), timeout
        )
        if self.refused:
            raise StateError(self.refused)
        if self.public_context is None:
            raise StateError(
                f"the key site {self.key_site} sent no key for this encrypted job "
                f"within {time.monotonic() - started:.0f} s"
                + ("" if self.key_site in self.board.active_sites() else f" ({self.key_site} is not in the job)")
            )
        return self.public_context

    async def _until(self, done: Callable[[], bool], timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            self._changed.clear()
            try:
                async with asyncio.timeout(POLL):
                    await self._changed.wait()
            except TimeoutError:
                pass
