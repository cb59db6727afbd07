"""The server daemon assembled: the two mTLS ports (federation, admin), the health service, the scheduler."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedgrid.errors import ConfigError
from fedgrid.kit import Kit
from fedgrid.metrics_http import Endpoint
from fedgrid.policy import POLICY_FILE, Policy
from fedgrid.settings import SERVER_SETTINGS_FILE, ServerSettings, load_settings
from fedgrid.tls import server_credentials
from fedgrid.v1 import admin_pb2_grpc, federation_pb2_grpc
from fedserver import metrics
from fedserver.admin_ops import AdminOps
from fedserver.admin_service import AdminService
from fedserver.deployment import SiteDeployment
from fedserver.federation_service import FederationService
from fedserver.jobrun import RunContext
from fedserver.jobstore import JobStore
from fedserver.limits import SERVER_OPTIONS, StreamQuota
from fedserver.peers import PeerAuthority
from fedserver.registry import SiteRegistry
from fedserver.scheduler import Scheduler
from fedserver.spool import FilePool, Spool
from fedserver.watchers import Watchers

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 2.0
SERVICES = ("fedgrid.v1.Federation", "fedgrid.v1.Admin")


class ServerApp:
    """Everything the server runs, wired once from its kit."""

    def __init__(self, kit: Kit) -> None:
        self.kit = kit
        self.settings = load_settings(ServerSettings, kit.local_dir / SERVER_SETTINGS_FILE)
        self.policy = Policy.load(kit.local_dir / POLICY_FILE)
        self.workspace = kit.workspace_dir
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self.peers = PeerAuthority(
            project=kit.project, ca_cert=kit.ca_cert, roster=kit.roster, state_file=self.workspace / "roster.json"
        )
        self.registry = SiteRegistry(
            heartbeat_timeout=self.settings.heartbeat_timeout,
            heartbeat_interval=min(HEARTBEAT_INTERVAL, self.settings.heartbeat_timeout / 3),
        )
        he_context = kit.he.context_path.read_bytes() if kit.he.enabled and kit.he.context_path else None
        self.store = JobStore(self.workspace)
        Spool.pool = FilePool(self.workspace / "spool")
        watchers = Watchers()
        ctx = RunContext(
            store=self.store,
            deployment=SiteDeployment(self.registry),
            watchers=watchers,
            he_context=he_context,
            tracking_factory=self._tracking_factory(),
            keep_uploads=self.settings.keep_uploads,
            data_root=Path(self.settings.data_root) if self.settings.data_root else None,
        )
        self.scheduler = Scheduler(store=self.store, registry=self.registry, settings=self.settings, ctx=ctx)
        self.ops = AdminOps(
            store=self.store,
            scheduler=self.scheduler,
            peers=self.peers,
            policy=self.policy,
            settings=self.settings,
            watchers=watchers,
            he_enabled=kit.he.enabled,
        )
        self.quota = StreamQuota(self.settings.max_streams_per_identity)
        self._servers: list[grpc.aio.Server] = []
        self._metrics: Endpoint | None = None

    def _tracking_factory(self) -> object | None:
        try:
            from fedserver.tracking.factory import make_factory
        except ImportError:
            return None
        return make_factory(
            default_mlflow_uri=self.settings.tracking_uri or f"sqlite:///{self.workspace / 'mlflow.db'}",
            allowed_uris=self.settings.tracking_uris,
        )

    def _bind(self, server: grpc.aio.Server, port: int, what: str) -> None:
        address = (
            f"[{self.kit.server_host}]:{port}" if ":" in self.kit.server_host else f"{self.kit.server_host}:{port}"
        )
        try:
            bound = server.add_secure_port(address, server_credentials(self.kit))
        except RuntimeError as exc:
            bound = 0
            log.error("binding %s failed: %s", address, exc)
        if not bound:
            raise ConfigError(
                f"cannot listen on {address} ({what} port): is another server running there? "
                f"Stop it, or change the port in project.yml and provision again"
            )

    async def start(self) -> None:
        health_servicer = health.aio.HealthServicer()
        for service in ("", *SERVICES):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        idle = self.settings.stream_idle_timeout
        federation = grpc.aio.server(options=SERVER_OPTIONS)
        federation_pb2_grpc.add_FederationServicer_to_server(
            FederationService(
                peers=self.peers,
                registry=self.registry,
                scheduler=self.scheduler,
                server_name=self.kit.name,
                quota=self.quota,
                idle_timeout=idle,
            ),
            federation,
        )
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, federation)
        admin = grpc.aio.server(options=SERVER_OPTIONS)
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminService(
                peers=self.peers,
                registry=self.registry,
                ops=self.ops,
                server_name=self.kit.name,
                started=self.started,
                quota=self.quota,
                idle_timeout=idle,
            ),
            admin,
        )
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, admin)
        self._bind(federation, self.kit.fed_port, "federation")
        self._bind(admin, self.kit.admin_port, "admin")
        self._metrics = metrics.serve(
            self.settings, self.kit.local_dir / SERVER_SETTINGS_FILE, scheduler=self.scheduler, peers=self.peers
        )
        await self.scheduler.start()
        for server in (federation, admin):
            await server.start()
            self._servers.append(server)
        log.info(
            "server %s of project %s serving: federation port %d, admin port %d (workspace %s)",
            self.kit.name,
            self.kit.project,
            self.kit.fed_port,
            self.kit.admin_port,
            self.workspace,
        )

    async def stop(self) -> None:
        log.info("server stopping")
        await self.scheduler.stop()
        await asyncio.gather(*(server.stop(grace=2.0) for server in self._servers))
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.close)
        self.store.close()

    async def serve(self, ready_file: Path | None, stop: asyncio.Event) -> None:
        await self.start()
        # What start-up loaded lives as long as the server: keep it out of every full collection.
        gc.freeze()
        if ready_file is not None:
            ready_file.write_text(str(time.time()))
        try:
            await stop.wait()
        finally:
            if ready_file is not None:
                ready_file.unlink(missing_ok=True)
            await self.stop()
