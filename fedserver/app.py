"""The server daemon assembled: the mTLS ports (federation, admin, data lane), the health service, the runtime."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedgrid import wire
from fedgrid.errors import ConfigError
from fedgrid.kit import Kit
from fedgrid.policy import POLICY_FILE, Policy
from fedgrid.settings import SERVER_SETTINGS_FILE, ServerSettings, load_settings
from fedgrid.tls import server_credentials
from fedgrid.transfer import SERVER_OPTIONS
from fedgrid.v1 import admin_pb2, federation_pb2
from fedserver.admin_service import AdminService
from fedserver.federation_service import FederationService
from fedserver.jobstore import JobStore
from fedserver.lane import DataLane
from fedserver.peers import PeerAuthority
from fedserver.registry import SiteRegistry
from fedserver.runtime import JobRuntime

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
        self.runtime = JobRuntime(
            store=self.store,
            registry=self.registry,
            peers=self.peers,
            policy=self.policy,
            settings=self.settings,
            ca_cert=kit.ca_cert,
            he_context=he_context,
            tracking_factory=self._tracking_factory(),
        )
        self._servers: list[grpc.aio.Server] = []
        self.lane: DataLane | None = None

    def _tracking_factory(self) -> object | None:
        try:
            from fedserver.tracking.factory import make_factory
        except ImportError:
            return None
        return make_factory(
            default_mlflow_uri=self.settings.tracking_uri or f"sqlite:///{self.workspace / 'mlflow.db'}"
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
        federation = grpc.aio.server(options=SERVER_OPTIONS)
        wire.add_servicer(
            federation,
            FederationService(
                peers=self.peers, registry=self.registry, runtime=self.runtime, server_name=self.kit.name
            ),
            federation_pb2.DESCRIPTOR.services_by_name["Federation"],
        )
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, federation)
        admin = grpc.aio.server(options=SERVER_OPTIONS)
        wire.add_servicer(
            admin,
            AdminService(
                peers=self.peers,
                registry=self.registry,
                runtime=self.runtime,
                server_name=self.kit.name,
                started=self.started,
            ),
            admin_pb2.DESCRIPTOR.services_by_name["Admin"],
        )
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, admin)
        self._bind(federation, self.kit.fed_port, "federation")
        self._bind(admin, self.kit.admin_port, "admin")
        if self.kit.data_port is not None and self.settings.data_lane:
            self.lane = DataLane(self.kit, self.peers, self.runtime, asyncio.get_running_loop())
            self.lane.start(self.kit.data_port)
        await self.runtime.start()
        for server in (federation, admin):
            await server.start()
            self._servers.append(server)
        log.info(
            "server %s of project %s serving: federation port %d, admin port %d, data port %s (workspace %s)",
            self.kit.name,
            self.kit.project,
            self.kit.fed_port,
            self.kit.admin_port,
            self.kit.data_port if self.lane is not None else "closed (data_lane is off or the kit has none)",
            self.workspace,
        )

    async def stop(self) -> None:
        log.info("server stopping")
        if self.lane is not None:
            self.lane.stop()
        await self.runtime.stop()
        await asyncio.gather(*(server.stop(grace=2.0) for server in self._servers))
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
