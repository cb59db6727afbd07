"""The federation port's servicer: thin methods that identify the caller and hand over to plain objects."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from fedgrid.certs import Identity
from fedgrid.v1 import common_pb2, federation_pb2_grpc
from fedgrid.v1 import federation_pb2 as fpb
from fedserver import limits, metrics
from fedserver.limits import StreamQuota
from fedserver.peers import PeerAuthority, peer_address
from fedserver.registry import SiteRegistry
from fedserver.rpc import rpc
from fedserver.scheduler import Scheduler
from fedserver.worker_io import WorkerStream

log = logging.getLogger(__name__)


class FederationService(federation_pb2_grpc.FederationServicer):
    def __init__(
        self,
        *,
        peers: PeerAuthority,
        registry: SiteRegistry,
        scheduler: Scheduler,
        server_name: str,
        quota: StreamQuota,
        idle_timeout: float,
    ) -> None:
        self.peers = peers
        self.registry = registry
        self.scheduler = scheduler
        self.server_name = server_name
        self.quota = quota
        self.idle_timeout = idle_timeout

    def identify(self, context: grpc.aio.ServicerContext, method: str) -> Identity:
        return self.peers.identify(context, "federation", method)

    async def Register(self, request: fpb.RegisterRequest, context: grpc.aio.ServicerContext) -> fpb.RegisterReply:
        # A site provisioned after this server presents a newer roster before it can be identified.
        self.peers.adopt(request.roster, peer_address(context))
        return await self._register(request, context)

    @rpc
    async def _register(
        self, request: fpb.RegisterRequest, context: grpc.aio.ServicerContext, caller: Identity
    ) -> fpb.RegisterReply:
        site = self.registry.register(
            name=caller.name,
            org=caller.org,
            address=peer_address(context),
            hostname=request.hostname,
            cpu_count=request.cpu_count,
            memory_gb=request.memory_gb,
            running_jobs=list(request.running_jobs),
            max_jobs=request.max_jobs,
        )
        self.scheduler.site_registered(caller.name, list(request.running_jobs))
        return fpb.RegisterReply(
            session_id=site.session_id,
            heartbeat_interval=self.registry.heartbeat_interval,
            server_name=self.server_name,
            project=self.peers.project,
        )

    @rpc
    async def Heartbeat(
        self, request: fpb.HeartbeatRequest, context: grpc.aio.ServicerContext, caller: Identity
    ) -> fpb.HeartbeatReply:
        known = self.registry.heartbeat(caller.name, request.session_id, list(request.running_jobs))
        return fpb.HeartbeatReply(known=known)

    @rpc
    async def Commands(
        self, request: fpb.CommandsRequest, context: grpc.aio.ServicerContext, caller: Identity
    ) -> AsyncIterator[fpb.Command]:
        with self.quota.hold(caller.name, "Commands"):
            async for command in self.registry.commands(caller.name, request.session_id):
                yield command

    @rpc
    async def FetchJob(self, request: fpb.FetchJobRequest, context: grpc.aio.ServicerContext, caller: Identity) -> None:
        async for frame in self.scheduler.run_for(request.job_id, caller.name).io.package_frames():
            await limits.write(context, frame, self.idle_timeout, f"job package for {caller.name}")
            metrics.sent("package", len(frame.data))

    @rpc
    async def ReportJob(
        self, request: fpb.JobReport, context: grpc.aio.ServicerContext, caller: Identity
    ) -> common_pb2.Ack:
        self.scheduler.site_report(caller.name, request)
        return common_pb2.Ack()

    @rpc
    async def Work(
        self, request_iterator: AsyncIterator[fpb.WorkerMessage], context: grpc.aio.ServicerContext, caller: Identity
    ) -> None:
        with self.quota.hold(caller.name, "Work"):
            await WorkerStream(self.scheduler, caller.name, context, self.idle_timeout).serve()
