"""What admins do with jobs: submit, list, show, abort, delete, clone, download, read logs, watch.

Every operation checks the caller's role against the policy first (the same rules for the console, the
Session API and job.py). A submitted upload is unpacked into a private folder, checked (signature chain,
every file against the signed manifest, the job folder's validation, encryption against the federation),
and only then moved into the store; nothing is kept when any check fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from cryptography import x509

from fedgrid import jobspec
from fedgrid.certs import Identity
from fedgrid.errors import JobSpecError, StateError
from fedgrid.files import write_atomic
from fedgrid.jobspec import JobSpec
from fedgrid.policy import Caller, JobOwner, Policy
from fedgrid.privacy_config import check_sites
from fedgrid.serde import JobDetail, JobInfo, job_info_to_proto, round_info_to_proto
from fedgrid.settings import ServerSettings
from fedgrid.transfer import CHUNK_SIZE, frames, receive_async
from fedgrid.v1 import admin_pb2 as apb
from fedserver import jobstore, memory, results, strategies
from fedserver.job_io import MANIFEST, PACKAGE, SUBMITTER_CERT
from fedserver.jobstore import JobRecord, JobStore
from fedserver.peers import PeerAuthority
from fedserver.scheduler import Scheduler
from fedserver.tracking.factory import check_installed, check_uris
from fedserver.watchers import Watchers

log = logging.getLogger(__name__)


def caller_of(identity: Identity) -> Caller:
    return Caller(name=identity.name, org=identity.org, role=identity.role or "")


class AdminOps:
    def __init__(
        self,
        *,
        store: JobStore,
        scheduler: Scheduler,
        peers: PeerAuthority,
        policy: Policy,
        settings: ServerSettings,
        watchers: Watchers,
        he_enabled: bool,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.peers = peers
        self.policy = policy
        self.settings = settings
        self.watchers = watchers
        self.he_enabled = he_enabled
        """The project was provisioned with HE (its keys in the kits, or made per job at the sites)."""

    def check(self, identity: Identity, command: str) -> None:
        self.policy.check(caller_of(identity), command)

    def _owned(self, identity: Identity, command: str, job_id: str) -> JobRecord:
        """The job, once the caller's role may run `command` on it (its `manage` scope covers the job)."""
        self.check(identity, command)
        record = self.store.find(job_id)
        self.policy.check(caller_of(identity), command, JobOwner(record.submitter, record.submitter_org))
        return record

    # ------------------------------------------------------------------ submit

    async def submit(self, identity: Identity, cert_pem: bytes, frames_in: AsyncIterator[apb.UploadFrame]) -> JobRecord:
        """Receive, verify and store a signed job upload; nothing is kept if any check fails.

        The upload is written to a file of a private folder frame by frame as it arrives (never held whole
        in memory), unpacked from that file and checked; a refused upload's folder is removed whole."""
        self.check(identity, "submit_job")
        limit = int(self.settings.max_upload_mb * 1e6)
        job_id = self.store.new_id()
        staged = self.store.incoming_dir(job_id)
        try:
            with open(staged / PACKAGE, "wb") as sink:
                header = await receive_async(frames_in, sink, max_size=limit, what="job upload")
                sink.flush()
                os.fsync(sink.fileno())
            spec = await asyncio.to_thread(self._check_upload, staged, header.signed_manifest, cert_pem, identity)
            record = self.store.add(
                job_id=job_id,
                staged=staged,
                name=spec.name,
                submitter=identity.name,
                submitter_org=identity.org,
                num_rounds=spec.server.num_rounds,
                meta=json.loads((staged / "job" / jobspec.META_FILE).read_text()),
                encrypted=spec.server.encryption != "none",
            )
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        finally:
            memory.trim()
        log.info("job %s (%s) submitted by %s (%s)", job_id, spec.name, identity.name, identity.org)
        self.scheduler.wake()
        return record

    def _check_upload(self, staged: Path, signed_manifest: bytes, cert_pem: bytes, identity: Identity) -> JobSpec:
        job_dir = staged / "job"
        job_dir.mkdir()
        jobspec.safe_extract(
            staged / PACKAGE,
            job_dir,
            max_bytes=int(self.settings.max_upload_mb * 1e6) * 4,
            max_files=self.settings.max_job_files,
        )
        jobspec.verify_signature(job_dir, signed_manifest, x509.load_pem_x509_certificate(cert_pem), identity.name)
        spec = jobspec.load_job(job_dir, known_sites=self.peers.site_names())
        if spec.server.encryption != "none" and not self.he_enabled:
            raise JobSpecError(
                f"{spec.server_app}/config/server.json: encryption {spec.server.encryption!r} asked, but this "
                "federation was provisioned without HE; provision with `he: {enabled: true}` in project.yml"
            )
        if spec.server.secure_aggregation != "none":
            sites = spec.named_sites() if not spec.all_sites else self.peers.site_names()
            check_sites(spec.server.secagg, max(2, len(sites)), f"{spec.server_app}/config/server.json")
        check_installed(spec)
        check_uris(spec, self.settings.tracking_uris)
        strategies.check(spec, forbidden=self.store.root)
        write_atomic(staged / MANIFEST, signed_manifest)
        write_atomic(staged / SUBMITTER_CERT, cert_pem)
        return spec

    async def clone(self, identity: Identity, job_id: str) -> JobRecord:
        source = self._owned(identity, "clone_job", job_id)
        new_id = self.store.new_id()
        staged = self.store.incoming_dir(new_id)
        try:
            src_dir = self.store.job_dir(source.job_id)
            await asyncio.to_thread(shutil.copytree, src_dir / "job", staged / "job")
            for name in (PACKAGE, MANIFEST, SUBMITTER_CERT):
                shutil.copy2(src_dir / name, staged / name)
            record = self.store.add(
                job_id=new_id,
                staged=staged,
                name=source.name,
                submitter=identity.name,
                submitter_org=identity.org,
                num_rounds=source.num_rounds,
                meta=source.meta,
                encrypted=source.encrypted,
                cloned_from=source.job_id,
            )
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        self.scheduler.wake()
        return record

    # ------------------------------------------------------------------ look

    def list_jobs(self, identity: Identity, *, include_finished: bool, name_prefix: str, limit: int) -> list[JobInfo]:
        self.check(identity, "list_jobs")
        return list(self.store.list(include_finished=include_finished, name_prefix=name_prefix, limit=limit))

    def show_job(self, identity: Identity, job_id: str) -> JobDetail:
        record = self._owned(identity, "show_job", job_id)
        result = dict(record.result)
        waiting = self.scheduler.waiting_reason(record)
        if waiting:
            result["waiting"] = waiting
        return JobDetail(
            info=record,
            meta=record.meta,
            rounds=tuple(self.store.rounds(record.job_id)),
            site_states=dict(self.store.site_states(record.job_id)),
            result=result,
        )

    def job_log(self, identity: Identity, job_id: str, source: str, lines: int) -> tuple[str, str]:
        record = self._owned(identity, "job_log", job_id)
        path = results.log_path(self.store.job_dir(record.job_id), record, source)
        if not path.exists():
            return "", str(path)
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:] if lines > 0 else text), str(path)

    async def watch(self, identity: Identity, job_id: str, from_round: int) -> AsyncIterator[apb.JobEvent]:
        """Rounds already recorded from `from_round` on, then each new round and status, until the job ends."""
        record = self._owned(identity, "watch_job", job_id)
        queue = self.watchers.subscribe(record.job_id)
        try:
            sent = from_round - 1
            for done in self.store.rounds(record.job_id):
                if done.round > sent:
                    sent = done.round
                    yield apb.JobEvent(round=round_info_to_proto(done))
            while True:
                current = self.store.get(record.job_id)
                if current.finished:
                    yield apb.JobEvent(finished=job_info_to_proto(current))
                    return
                kind, payload = await queue.get()
                if kind == "round" and payload is not None and payload.round > sent:
                    sent = payload.round
                    yield apb.JobEvent(round=round_info_to_proto(payload))
                elif kind == "status":
                    yield apb.JobEvent(status=job_info_to_proto(self.store.get(record.job_id)))
        finally:
            self.watchers.unsubscribe(record.job_id, queue)

    # ------------------------------------------------------------------ manage

    async def abort(self, identity: Identity, job_id: str) -> str:
        record = self._owned(identity, "abort_job", job_id)
        if record.finished:
            raise StateError(f"job {record.job_id} already {record.status}")
        run = self.scheduler.runs.get(record.job_id)
        if run is None:
            self.store.update(
                record.job_id,
                status=jobstore.ABORTED,
                end_time=time.time(),
                error=f"aborted by {identity.name} before it started",
            )
            await self.watchers.finished(record.job_id)
        else:
            await run.abort(f"aborted by {identity.name}")
        log.info("job %s aborted by %s", record.job_id, identity.name)
        return f"job {record.job_id} aborted"

    def delete(self, identity: Identity, job_id: str) -> str:
        record = self._owned(identity, "delete_job", job_id)
        self.store.delete(record.job_id)
        log.info("job %s deleted by %s", record.job_id, identity.name)
        return f"job {record.job_id} deleted"

    async def download(self, identity: Identity, job_id: str) -> AsyncIterator[apb.DownloadFrame]:
        """The frames of a finished job's result, zipped into an unnamed temporary file (gone when closed)
        and read from it a chunk at a time: a result is as large as its models."""
        record = self._owned(identity, "download_job", job_id)
        if not record.finished:
            raise StateError(f"job {record.job_id} is {record.status}; its result can be downloaded when it ends")
        job_dir = self.store.job_dir(record.job_id)
        with tempfile.TemporaryFile(dir=job_dir) as out:
            await asyncio.to_thread(results.zip_result, job_dir, record, out)
            size = out.tell()
            out.seek(0)
            header = apb.DownloadHeader(job_id=record.job_id, size=size)
            for frame in frames(apb.DownloadFrame, header, iter(lambda: out.read(CHUNK_SIZE), b"")):
                yield frame
