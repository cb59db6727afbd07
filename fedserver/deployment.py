"""How a job's sites are started and stopped: the one thing deployment and simulation do differently.

`JobRun` (fedserver/jobrun.py) asks its `Deployment` to start the job at its sites and, when the job ends
badly, to stop it there; each site tells the run how its worker went through `JobRun.site_report`
("started", then "finished", "failed" with its traceback, ...). Everything else a job does (its rounds,
strategies, the Work streams of its workers, its result folder) is the same code either way.

`SiteDeployment` is the real one: commands pushed to the site daemons through the site registry, and
their heartbeats saying whether a site is alive. The simulator's starts virtual sites in its worker
pool (fedgrid/sim/).
"""

from __future__ import annotations

from typing import Protocol

from fedgrid.errors import StateError
from fedgrid.jobspec import JobSpec
from fedgrid.v1 import federation_pb2 as fpb
from fedserver.registry import SiteRegistry


class Deployment(Protocol):
    def start_job(self, job_id: str, spec: JobSpec, sites: list[str]) -> None:
        """Ask each of `sites` to start its worker of the job; each answers through `JobRun.site_report`."""

    def abort_job(self, job_id: str, sites: list[str], reason: str) -> None:
        """Tell `sites` to end their worker of the job (best effort)."""

    def is_alive(self, site: str) -> bool:
        """Whether `site` is reachable now (a site that went silent may rejoin once it is)."""


class SiteDeployment:
    """Jobs on the site daemons registered with this server."""

    def __init__(self, registry: SiteRegistry) -> None:
        self.registry = registry

    def start_job(self, job_id: str, spec: JobSpec, sites: list[str]) -> None:
        hosts: dict[str, int] = {}
        for site in sites:
            host = self._host(site)
            hosts[host] = hosts.get(host, 0) + 1
        for site in sites:
            # workers_hint: the job's workers on that machine, to size each one's torch threads.
            start = fpb.StartJob(job_id=job_id, app=spec.app_for_site(site) or "", workers_hint=hosts[self._host(site)])
            self.registry.send(site, fpb.Command(start_job=start))

    def abort_job(self, job_id: str, sites: list[str], reason: str) -> None:
        for site in sites:
            try:
                self.registry.send(site, fpb.Command(abort_job=fpb.AbortJob(job_id=job_id, reason=reason)))
            except StateError:
                pass

    def is_alive(self, site: str) -> bool:
        record = self.registry.get(site)
        return record is not None and self.registry.is_alive(record)

    def _host(self, site: str) -> str:
        record = self.registry.get(site)
        return record.hostname if record else site
