"""The admin Session API: every admin command as a Python call, over mutual TLS with an admin kit.

```python
from fedgrid.session import Session

with Session("workspaces/example_project/prod_00/admin@nvidia.com") as s:
    print(s.check_status("client"))
    job_id = s.submit_job("my_job_folder")
    for r in s.watch_job(job_id):
        print(r)
```

The console (`fl_admin.sh`) and job.py are built on it. Errors raise the same FedgridError types the
server raised (AuthorizationError, NotFoundError, JobSpecError, ...) with the server's message; a
server that cannot be reached raises UnreachableError saying how to start it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc

from fedgrid import jobspec
from fedgrid.errors import FedgridError, JobSpecError, StateError
from fedgrid.grpc_errors import UnreachableError, error_from_rpc
from fedgrid.kit import Kit, load_kit
from fedgrid.serde import (
    JobDetail,
    JobInfo,
    RoundInfo,
    ServerStatus,
    SiteStatus,
    job_detail_from_proto,
    job_info_from_proto,
    round_info_from_proto,
    server_status_from_proto,
    site_status_from_proto,
)
from fedgrid.settings import ADMIN_SETTINGS_FILE, AdminSettings, load_settings
from fedgrid.tls import secure_channel
from fedgrid.transfer import UPLOAD_CHUNK_SIZE, Chunks, frames, receive
from fedgrid.v1 import admin_pb2 as apb
from fedgrid.v1 import admin_pb2_grpc

T = TypeVar("T")
TIMEOUT = 30.0
MAX_DOWNLOAD = 8 << 30


class Session:
    """A logged-in admin: name, org and role come from the kit's certificate, as the server sees them."""

    def __init__(self, kit: Kit | str | Path, timeout: float = TIMEOUT) -> None:
        self.kit = kit if isinstance(kit, Kit) else load_kit(Path(kit), expect_type="admin")
        self.settings = load_settings(AdminSettings, self.kit.local_dir / ADMIN_SETTINGS_FILE)
        self.timeout = timeout
        self.channel = secure_channel(self.kit, self.kit.admin_port)
        self.stub = admin_pb2_grpc.AdminStub(self.channel)
        hello = self._call(lambda: self.stub.Hello(apb.HelloRequest(roster=self.kit.roster_bytes), timeout=timeout))
        self.name, self.org, self.role = hello.name, hello.org, hello.role
        self.project, self.server_name = hello.project, hello.server_name

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def _error(self, exc: grpc.RpcError) -> FedgridError:
        code, details = exc.code(), exc.details() or ""
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return UnreachableError(
                f"cannot reach the server at {self.kit.server_host}:{self.kit.admin_port} ({details}); is it running? "
                "Start it with <server kit>/startup/start.sh (or ./start_fl.sh N); if it runs, this kit's "
                "certificate may have been refused (see the server log)"
            )
        return error_from_rpc(exc)

    # ------------------------------------------------------------------ status

    def check_status(self, target: str = "server", names: list[str] | None = None) -> ServerStatus | list[SiteStatus]:
        """`server`: the server's state; `client`: each site's state, last heartbeat and address."""
        reply = self._call(
            lambda: self.stub.CheckStatus(apb.StatusRequest(target=target, names=names or []), timeout=self.timeout)
        )
        if target == "server":
            return server_status_from_proto(reply.server)
        return [site_status_from_proto(s) for s in reply.sites]

    # ------------------------------------------------------------------ jobs

    def submit_job(self, folder: str | Path) -> str:
        """Validate, sign and upload a job folder; returns the job id."""
        folder = Path(folder)
        jobspec.load_job(folder)
        package = jobspec.pack(folder)
        signed = jobspec.sign_job(folder, self.kit.private_key(), self.kit.name)
        header = apb.UploadHeader(signed_manifest=signed, size=len(package))
        reply = self._call(
            lambda: self.stub.SubmitJob(
                frames(apb.UploadFrame, header, [package], chunk_size=UPLOAD_CHUNK_SIZE), timeout=max(self.timeout, 300)
            )
        )
        return reply.job_id

    def list_jobs(self, all: bool = False, name_prefix: str = "", max: int = 0) -> list[JobInfo]:  # noqa: A002
        reply = self._call(
            lambda: self.stub.ListJobs(
                apb.ListJobsRequest(all=all, name_prefix=name_prefix, max=max), timeout=self.timeout
            )
        )
        return [job_info_from_proto(j) for j in reply.jobs]

    def show_job(self, job_id: str) -> JobDetail:
        return job_detail_from_proto(
            self._call(lambda: self.stub.ShowJob(apb.JobRequest(job_id=job_id), timeout=self.timeout))
        )

    def get_job_status(self, job_id: str) -> str:
        return self.show_job(job_id).info.status

    def abort_job(self, job_id: str) -> str:
        return self._call(lambda: self.stub.AbortJob(apb.JobRequest(job_id=job_id), timeout=self.timeout)).message

    def delete_job(self, job_id: str) -> str:
        return self._call(lambda: self.stub.DeleteJob(apb.JobRequest(job_id=job_id), timeout=self.timeout)).message

    def clone_job(self, job_id: str) -> str:
        return self._call(lambda: self.stub.CloneJob(apb.JobRequest(job_id=job_id), timeout=self.timeout)).job_id

    def download_job(self, job_id: str, destination: str | Path | None = None) -> Path:
        """Fetch a finished job's result folder; returns where it was unpacked.

        Default destination: the admin kit's download folder (`local/admin.json`), one folder per job id.
        """
        buffer = Chunks()
        header = self._call(
            lambda: receive(
                self.stub.DownloadJob(apb.JobRequest(job_id=job_id), timeout=max(self.timeout, 600)),
                buffer,
                max_size=MAX_DOWNLOAD,
                what=f"result of job {job_id}",
            )
        )
        base = Path(destination) if destination else self.download_root()
        target = base / header.job_id
        tmp = base / f".{header.job_id}.part"
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            jobspec.safe_extract(buffer.getvalue(), tmp, max_bytes=MAX_DOWNLOAD, max_files=100_000)
        except JobSpecError as exc:
            raise StateError(f"the downloaded result is unusable: {exc}") from exc
        if target.exists():
            import shutil

            shutil.rmtree(target)
        tmp.rename(target)
        return target

    def download_root(self) -> Path:
        path = Path(self.settings.download_dir)
        return path if path.is_absolute() else self.kit.path / path

    def job_log(self, job_id: str, source: str = "server", lines: int = 50) -> str:
        """The last `lines` of a job's log: the server's, or a site's once the job ended (0 = whole log)."""
        reply = self._call(
            lambda: self.stub.JobLog(apb.JobLogRequest(job_id=job_id, source=source, lines=lines), timeout=self.timeout)
        )
        return reply.text

    def watch_job(self, job_id: str, from_round: int = 1) -> Iterator[RoundInfo | JobInfo]:
        """Each finished round as it happens (RoundInfo), then the job's final JobInfo."""
        stream = self.stub.WatchJob(apb.WatchJobRequest(job_id=job_id, from_round=from_round))
        try:
            for event in stream:
                kind = event.WhichOneof("kind")
                if kind == "round":
                    yield round_info_from_proto(event.round)
                elif kind == "finished":
                    yield job_info_from_proto(event.finished)
                    return
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        finally:
            stream.cancel()

    def wait(self, job_id: str) -> JobInfo:
        """Block until the job ends; returns its final info."""
        for event in self.watch_job(job_id, from_round=1 << 30):
            if isinstance(event, JobInfo):
                return event
        return job_info_from_proto(apb.JobInfo())
