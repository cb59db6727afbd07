"""Where the admin view of the federation meets protobuf: dataclasses and their `*_to_proto` /
`*_from_proto` pairs. The server builds these from its records; the Session hands them to users."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fedgrid.v1 import admin_pb2 as apb


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    name: str
    status: str
    submitter: str
    submitter_org: str
    submit_time: float
    start_time: float = 0.0
    end_time: float = 0.0
    current_round: int = 0
    num_rounds: int = 0
    error: str = ""
    sites: tuple[str, ...] = ()
    encrypted: bool = False
    cloned_from: str = ""

    @property
    def finished(self) -> bool:
        return self.status.startswith("FINISHED")

    @property
    def duration(self) -> float:
        if not self.start_time:
            return 0.0
        import time

        return (self.end_time or time.time()) - self.start_time


def job_info_to_proto(info: JobInfo) -> apb.JobInfo:
    return apb.JobInfo(
        job_id=info.job_id,
        name=info.name,
        status=info.status,
        submitter=info.submitter,
        submitter_org=info.submitter_org,
        submit_time=info.submit_time,
        start_time=info.start_time,
        end_time=info.end_time,
        current_round=info.current_round,
        num_rounds=info.num_rounds,
        error=info.error,
        sites=list(info.sites),
        encrypted=info.encrypted,
        cloned_from=info.cloned_from,
    )


def job_info_from_proto(msg: apb.JobInfo) -> JobInfo:
    return JobInfo(
        job_id=msg.job_id,
        name=msg.name,
        status=msg.status,
        submitter=msg.submitter,
        submitter_org=msg.submitter_org,
        submit_time=msg.submit_time,
        start_time=msg.start_time,
        end_time=msg.end_time,
        current_round=msg.current_round,
        num_rounds=msg.num_rounds,
        error=msg.error,
        sites=tuple(msg.sites),
        encrypted=msg.encrypted,
        cloned_from=msg.cloned_from,
    )


@dataclass(frozen=True)
class RoundInfo:
    round: int
    sites_answered: int
    sites_asked: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    bytes_moved: int = 0


def round_info_to_proto(info: RoundInfo) -> apb.RoundInfo:
    return apb.RoundInfo(
        round=info.round,
        sites_answered=info.sites_answered,
        sites_asked=info.sites_asked,
        seconds=info.seconds,
        metrics=info.metrics,
        bytes_moved=info.bytes_moved,
    )


def round_info_from_proto(msg: apb.RoundInfo) -> RoundInfo:
    return RoundInfo(
        round=msg.round,
        sites_answered=msg.sites_answered,
        sites_asked=msg.sites_asked,
        seconds=msg.seconds,
        metrics=dict(msg.metrics),
        bytes_moved=msg.bytes_moved,
    )


@dataclass(frozen=True)
class JobDetail:
    info: JobInfo
    meta: dict[str, Any]
    rounds: tuple[RoundInfo, ...]
    site_states: dict[str, str]
    result: dict[str, Any]


def job_detail_to_proto(detail: JobDetail) -> apb.JobDetail:
    return apb.JobDetail(
        info=job_info_to_proto(detail.info),
        meta_json=json.dumps(detail.meta),
        rounds=[round_info_to_proto(r) for r in detail.rounds],
        site_states=detail.site_states,
        result_json=json.dumps(detail.result),
    )


def job_detail_from_proto(msg: apb.JobDetail) -> JobDetail:
    return JobDetail(
        info=job_info_from_proto(msg.info),
        meta=json.loads(msg.meta_json or "{}"),
        rounds=tuple(round_info_from_proto(r) for r in msg.rounds),
        site_states=dict(msg.site_states),
        result=json.loads(msg.result_json or "{}"),
    )


@dataclass(frozen=True)
class SiteStatus:
    name: str
    org: str
    state: str
    last_heartbeat: float
    address: str
    registered: float
    running_jobs: tuple[str, ...] = ()


def site_status_to_proto(s: SiteStatus) -> apb.SiteStatus:
    return apb.SiteStatus(
        name=s.name,
        org=s.org,
        state=s.state,
        last_heartbeat=s.last_heartbeat,
        address=s.address,
        registered=s.registered,
        running_jobs=list(s.running_jobs),
    )


def site_status_from_proto(msg: apb.SiteStatus) -> SiteStatus:
    return SiteStatus(
        name=msg.name,
        org=msg.org,
        state=msg.state,
        last_heartbeat=msg.last_heartbeat,
        address=msg.address,
        registered=msg.registered,
        running_jobs=tuple(msg.running_jobs),
    )


@dataclass(frozen=True)
class ServerStatus:
    name: str
    project: str
    started: float
    uptime: float
    sites_alive: int
    sites_known: int
    jobs_running: int
    jobs_queued: int
    version: str


def server_status_to_proto(s: ServerStatus) -> apb.ServerStatus:
    return apb.ServerStatus(
        name=s.name,
        project=s.project,
        started=s.started,
        uptime=s.uptime,
        sites_alive=s.sites_alive,
        sites_known=s.sites_known,
        jobs_running=s.jobs_running,
        jobs_queued=s.jobs_queued,
        version=s.version,
    )


def server_status_from_proto(msg: apb.ServerStatus) -> ServerStatus:
    return ServerStatus(
        name=msg.name,
        project=msg.project,
        started=msg.started,
        uptime=msg.uptime,
        sites_alive=msg.sites_alive,
        sites_known=msg.sites_known,
        jobs_running=msg.jobs_running,
        jobs_queued=msg.jobs_queued,
        version=msg.version,
    )
