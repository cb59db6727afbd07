"""The admin port's servicer: identify the admin from its certificate, then call `AdminOps`.

Authorization (which role may do what) is checked inside `AdminOps` against the policy, so the
Session API, the console and job.py all meet the same rules.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import grpc

from fedgrid import __version__
from fedgrid.certs import Identity
from fedgrid.errors import ConfigError, NotFoundError
from fedgrid.serde import (
    ServerStatus,
    SiteStatus,
    job_detail_to_proto,
    job_info_to_proto,
    server_status_to_proto,
    site_status_to_proto,
)
from fedgrid.v1 import admin_pb2 as apb
from fedgrid.v1 import admin_pb2_grpc, common_pb2
from fedserver import limits, metrics
from fedserver.admin_ops import AdminOps
from fedserver.peers import PeerAuthority, peer_address
from fedserver.registry import SiteRegistry
from fedserver.rpc import rpc


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(
        self,
        *,
        peers: PeerAuthority,
        registry: SiteRegistry,
        ops: AdminOps,
        server_name: str,
        started: float,
        quota: limits.StreamQuota,
        idle_timeout: float,
    ) -> None:
        self.peers = peers
        self.registry = registry
        self.ops = ops
        self.server_name = server_name
        self.started = started
        self.quota = quota
        self.idle_timeout = idle_timeout

    def identify(self, context: grpc.aio.ServicerContext, method: str) -> Identity:
        return self.peers.identify(context, "admin", method)

    async def Hello(self, request: apb.HelloRequest, context: grpc.aio.ServicerContext) -> apb.HelloReply:
        # An admin provisioned after this server presents a newer roster before it can be identified.
        self.peers.adopt(request.roster, peer_address(context))
        return await self._hello(request, context)

    @rpc
    async def _hello(
        self, request: apb.HelloRequest, context: grpc.aio.ServicerContext, caller: Identity
    ) -> apb.HelloReply:
        return apb.HelloReply(
            name=caller.name,
            org=caller.org,
            role=caller.role or "",
            project=self.peers.project,
            server_name=self.server_name,
            server_version=__version__,
        )

    @rpc
    async def CheckStatus(
        self, request: apb.StatusRequest, context: grpc.aio.ServicerContext, caller: Identity
    ) -> apb.StatusReply:
        self.ops.check(caller, "check_status")
        if request.target == "server":
            jobs = self.ops.store.list(include_finished=False)
            status = ServerStatus(
                name=self.server_name,
                project=self.peers.project,
                started=self.started,
                uptime=time.time() - self.started,
                sites_alive=len(self.registry.alive()),
                sites_known=len(self.peers.site_names()),
                jobs_running=sum(1 for j in jobs if j.status == "RUNNING"),
                jobs_queued=sum(1 for j in jobs if j.status == "SUBMITTED"),
                version=__version__,
            )
            return apb.StatusReply(server=server_status_to_proto(status))
        if request.target not in ("client", "site"):
            raise ConfigError(f"check_status: target must be 'server' or 'client', not {request.target!r}")
        wanted = set(request.names)
        known = self.peers.site_names()
        unknown = wanted - known - {s.name for s in self.registry.sites()}
        if unknown:
            raise NotFoundError(f"unknown site {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        sites = []
        seen = set()
        for site in self.registry.sites():
            if wanted and site.name not in wanted:
                continue
            seen.add(site.name)
            sites.append(
                SiteStatus(
                    name=site.name,
                    org=site.org,
                    state="alive" if self.registry.is_alive(site) else "dead",
                    last_heartbeat=site.last_heartbeat,
                    address=site.address,
                    registered=site.registered,
                    running_jobs=site.running_jobs,
                )
            )
        for member in self.peers.roster.participants:
            if member.type == "client" and member.name not in seen and (not wanted or member.name in wanted):
                sites.append(
                    SiteStatus(
                        name=member.name,
                        org=member.org,
                        state="never connected",
                        last_heartbeat=0.0,
                        address="",
                        registered=0.0,
                    )
                )
        return apb.StatusReply(sites=[site_status_to_proto(s) for s in sorted(sites, key=lambda s: s.name)])

    @rpc
    async def SubmitJob(
        self, request_iterator: AsyncIterator[apb.UploadFrame], context: grpc.aio.ServicerContext, caller: Identity
    ) -> apb.SubmitReply:
        cert_pem = context.auth_context()["x509_pem_cert"][0]
        with self.quota.hold(caller.name, "SubmitJob"):
            frames = metrics.counted("upload", limits.messages(context, self.idle_timeout, "job upload"))
            record = await self.ops.submit(caller, cert_pem, frames)
        return apb.SubmitReply(job_id=record.job_id, name=record.name)

    @rpc
    async def ListJobs(
        self, request: apb.ListJobsRequest, context: grpc.aio.ServicerContext, caller: Identity
    ) -> apb.ListJobsReply:
        jobs = self.ops.list_jobs(
            caller, include_finished=request.all, name_prefix=request.name_prefix, limit=request.max
        )
        return apb.ListJobsReply(jobs=[job_info_to_proto(j) for j in jobs])

    @rpc
    async def ShowJob(
        self, request: apb.JobRequest, context: grpc.aio.ServicerContext, caller: Identity
    ) -> apb.JobDetail:
        return job_detail_to_proto(self.ops.show_job(caller, request.job_id))

    @rpc
    async def AbortJob(
        self, request: apb.JobRequest, context: grpc.aio.ServicerContext, caller: Identity
    ) -> common_pb2.Ack:
        return common_pb2.Ack(message=await self.ops.abort(caller, request.job_id))

    @rpc
    async def DeleteJob(
        self, request: apb.JobRequest, context: grpc.aio.ServicerContext, caller: Identity
    ) -> common_pb2.Ack:
        return common_pb2.Ack(message=self.ops.delete(caller, request.job_id))

    @rpc
    async def CloneJob(
        self, request: apb.JobRequest, context: grpc.aio.ServicerContext, caller: Identity
    ) -> apb.SubmitReply:
        record = await self.ops.clone(caller, request.job_id)
        return apb.SubmitReply(job_id=record.job_id, name=record.name)

    @rpc
    async def DownloadJob(self, request: apb.JobRequest, context: grpc.aio.ServicerContext, caller: Identity) -> None:
        with self.quota.hold(caller.name, "DownloadJob"):
            async with contextlib.aclosing(self.ops.download(caller, request.job_id)) as frames:
                async for frame in frames:
                    await limits.write(context, frame, self.idle_timeout, f"result of job {request.job_id}")
                    metrics.sent("download", len(frame.data))

    @rpc
    async def JobLog(
        self, request: apb.JobLogRequest, context: grpc.aio.ServicerContext, caller: Identity
    ) -> apb.JobLogReply:
        text, path = self.ops.job_log(caller, request.job_id, request.source, request.lines)
        return apb.JobLogReply(text=text, path=path)

    @rpc
    async def WatchJob(
        self, request: apb.WatchJobRequest, context: grpc.aio.ServicerContext, caller: Identity
    ) -> AsyncIterator[apb.JobEvent]:
        with self.quota.hold(caller.name, "WatchJob"):
            async for event in self.ops.watch(caller, request.job_id, request.from_round):
                yield event
