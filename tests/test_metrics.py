"""Prometheus metrics of real daemons: a federation with metrics ports set runs a job, with a misbehaving site
that sends a NaN update and a wrong-shaped one; the server's and a site's /metrics are scraped over HTTP and
read with the Prometheus client's own parser. Also: nothing listens when no metrics port is set, a taken
port refuses to start naming the setting, and the Grafana dashboard queries only metrics that exist."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ProvisionedProject, free_ports, provision_project
from federation import ENV, Federation, running, set_local, wait_until
from prometheus_client.parser import text_string_to_metric_families
from rogue import RogueSite

from fedgrid import tensors
from fedgrid.errors import NotFoundError
from fedgrid.recipe import FedAvgRecipe
from fedgrid.v1 import federation_pb2 as fpb

SCRIPT = Path(__file__).parent / "scripts" / "train_fixed.py"
DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana-fedgrid.json"
ROUNDS = 2
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedProject:
    return provision_project(tmp_path_factory.mktemp("metrics"), n_sites=3)


def scrape(port: int) -> Samples:
    """Every sample of http://127.0.0.1:port/metrics, parsed by the Prometheus client's parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when there is none)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= set(have))


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process `pid` listens on (its sockets in state LISTEN)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def rogue_answer(header: fpb.TaskHeader, payload: bytes) -> tuple[str, bytes]:
    """Round 1: the model's layout full of NaN. Round 2: every tensor one row longer than the model's."""
    arrays = tensors.decode(payload, what="global model")
    if header.round == 1:
        return tensors.FORMAT, tensors.encode({name: np.full_like(a, np.nan) for name, a in arrays.items()})
    return tensors.FORMAT, tensors.encode({name: np.concatenate([a, a[:1]]) for name, a in arrays.items()})


@pytest.fixture
def ports(project: ProvisionedProject) -> Iterator[tuple[int, int]]:
    """Metrics on for the server and site-1 (site-2 keeps the provisioned default: none)."""
    server_port, site_port = free_ports(2)
    set_local(project.server, "server.json", metrics_port=server_port)
    set_local(project.sites[0], "site.json", metrics_port=site_port)
    yield server_port, site_port
    set_local(project.server, "server.json", metrics_port=0)
    set_local(project.sites[0], "site.json", metrics_port=0)


def test_metrics_after_a_job_with_a_misbehaving_site(
    project: ProvisionedProject, ports: tuple[int, int], tmp_path: Path
) -> None:
    server_port, site_port = ports
    model = torch.nn.Linear(256, 128)
    recipe = FedAvgRecipe(
        name="metered",
        model=model,
        train_script=SCRIPT,
        num_rounds=ROUNDS,
        min_clients=3,
        min_responses=2,
    )
    folder = recipe.export(tmp_path / "job")
    model_bytes = len(tensors.encode({k: v.detach().numpy() for k, v in model.state_dict().items()}))
    rogue = RogueSite(project.sites[2], rogue_answer)
    with running(project, sites=project.sites[:2]) as federation:
        rogue.start()
        try:
            federation.wait_alive(["site-1", "site-2", "site-3"])
            wait_until(
                lambda: value(scrape(server_port), "fedgrid_sites_connected") == 3, 30, "3 sites connected in /metrics"
            )
            with federation.session() as session:
                job_id = session.submit_job(folder)
                info = session.wait(job_id)
                with pytest.raises(NotFoundError):
                    session.show_job("no-such-job")
            assert info.status == "FINISHED:COMPLETED", info.error
            assert rogue.answered
            server = scrape(server_port)
            site = wait_until(
                lambda: (s := scrape(site_port)) and value(s, "fedgrid_site_job_reports_total", state="finished") and s,
                30,
                "site-1's report of the job's end in its /metrics",
            )
            _check_server(server, model_bytes)
            _check_site(site)
            wait_until(
                lambda: value(scrape(site_port), "fedgrid_site_workers_resident_memory_bytes") > 50e6,
                60,
                "the worker started ahead of the next job (torch imported) in site-1's /metrics",
            )
            _check_listening(project, federation, server_port, site_port)
            _check_dashboard(names(server) | names(site))
        finally:
            rogue.close()


def _check_server(server: Samples, model_bytes: int) -> None:
    sites = 3
    assert value(server, "fedgrid_sites_known") == sites
    assert value(server, "fedgrid_sites_connected") == sites
    assert {dict(labels)["site"] for name, labels in server if name == "fedgrid_site_connected"} == {
        "site-1",
        "site-2",
        "site-3",
    }
    for name in ("site-1", "site-2", "site-3"):
        assert value(server, "fedgrid_site_connected", site=name) == 1
        assert 0 <= value(server, "fedgrid_site_heartbeat_age_seconds", site=name) < 10  # heartbeat_timeout
    assert value(server, "fedgrid_jobs", state="completed") == 1
    assert value(server, "fedgrid_jobs", state="running") == value(server, "fedgrid_jobs", state="submitted") == 0

    assert value(server, "fedgrid_rounds_completed_total") == ROUNDS
    assert value(server, "fedgrid_round_duration_seconds_count") == ROUNDS
    assert value(server, "fedgrid_round_duration_seconds_sum") > 0
    assert value(server, "fedgrid_round_duration_seconds_bucket", le="+Inf") == ROUNDS

    # Each round sends the model to 3 sites, and the last model goes out once more to be evaluated.
    task_bytes = value(server, "fedgrid_server_sent_bytes_total", kind="task")
    assert model_bytes * sites * ROUNDS <= task_bytes <= 1.1 * model_bytes * sites * (ROUNDS + 1)
    # Two real updates and the rogue's refused one each round, a model's size each.
    result_bytes = value(server, "fedgrid_server_received_bytes_total", kind="result")
    assert model_bytes * sites * ROUNDS <= result_bytes <= 1.1 * model_bytes * sites * ROUNDS
    # The two real sites fetched the package the admin uploaded (the rogue does not fetch it).
    upload = value(server, "fedgrid_server_received_bytes_total", kind="upload")
    package = value(server, "fedgrid_server_sent_bytes_total", kind="package")
    assert upload > model_bytes / 2 and 1.9 * upload <= package <= 2.1 * upload

    assert value(server, "fedgrid_updates_refused_total", reason="non_finite") == 1
    assert value(server, "fedgrid_updates_refused_total", reason="layout") == 1
    assert value(server, "fedgrid_updates_refused_total") == 2
    assert ("fedgrid_updates_refused_total", (("reason", "late"),)) in server  # every reason is there, at 0

    assert value(server, "fedgrid_rpc_handled_total", method="Register", code="OK") == sites
    assert value(server, "fedgrid_rpc_handled_total", method="Heartbeat", code="OK") > sites
    assert value(server, "fedgrid_rpc_handled_total", method="FetchJob", code="OK") == 2
    assert value(server, "fedgrid_rpc_handled_total", method="SubmitJob", code="OK") == 1
    assert value(server, "fedgrid_rpc_handled_total", method="ShowJob", code="NOT_FOUND") == 1
    assert value(server, "fedgrid_rpc_duration_seconds_count", method="Register") == sites
    assert value(server, "fedgrid_rpc_duration_seconds_count", method="Heartbeat") > sites
    assert value(server, "fedgrid_work_requests_total", kind="hello") == sites
    assert value(server, "fedgrid_work_requests_total", kind="next_task") >= sites * (ROUNDS + 1)
    assert value(server, "fedgrid_work_requests_total", kind="result") >= sites * ROUNDS

    assert value(server, "fedgrid_tracking_pending_records") == 0
    assert value(server, "process_resident_memory_bytes") > 10e6
    assert value(server, "fedgrid_build_info") == 1


def _check_site(site: Samples) -> None:
    assert value(site, "fedgrid_site_server_connected") == 1
    assert value(site, "fedgrid_site_job_reports_total", state="started") == 1
    assert value(site, "fedgrid_site_job_reports_total", state="finished") == 1
    assert value(site, "fedgrid_site_job_reports_total", state="failed") == 0
    assert value(site, "fedgrid_site_workers_started_total", mode="ahead") >= 1
    assert value(site, "fedgrid_site_jobs_running") == 0
    assert value(site, "process_resident_memory_bytes") > 10e6


def _check_listening(project: ProvisionedProject, federation: Federation, server_port: int, site_port: int) -> None:
    """Each daemon listens on what its settings name, and on nothing else: site-2 sets no metrics port."""
    assert listening_ports(federation.pid(project.server)) == {project.fed_port, project.admin_port, server_port}
    assert listening_ports(federation.pid(project.sites[0])) == {site_port}
    assert listening_ports(federation.pid(project.sites[1])) == set()


def _check_dashboard(exported: set[str]) -> None:
    """The dashboard is Grafana JSON whose panels tile the 24-column grid and query metrics the daemons export."""
    dashboard = json.loads(DASHBOARD.read_text())
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        place = panel["gridPos"]
        area = {
            (x, y)
            for x in range(place["x"], place["x"] + place["w"])
            for y in range(place["y"], place["y"] + place["h"])
        }
        assert place["x"] + place["w"] <= 24 and not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    queried = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            for opening, closing in ("()", "[]", "{}"):
                assert expr.count(opening) == expr.count(closing), expr
            queried |= set(re.findall(r"\b(?:fedgrid|process)_[a-z_]+\b", expr))
    assert not queried - exported, f"the dashboard queries metrics nobody exports: {sorted(queried - exported)}"
    for needed in (
        "fedgrid_sites_connected",
        "fedgrid_site_heartbeat_age_seconds",
        "fedgrid_jobs",
        "fedgrid_rounds_completed_total",
        "fedgrid_round_duration_seconds_bucket",
        "fedgrid_server_sent_bytes_total",
        "fedgrid_server_received_bytes_total",
        "fedgrid_updates_refused_total",
        "fedgrid_rpc_handled_total",
        "fedgrid_rpc_duration_seconds_bucket",
        "process_resident_memory_bytes",
    ):
        assert needed in queried, needed


def test_without_a_metrics_port_the_server_listens_on_its_two_ports_only(project: ProvisionedProject) -> None:
    with running(project, sites=project.sites[1:2]) as federation:
        assert listening_ports(federation.pid(project.server)) == {project.fed_port, project.admin_port}
        assert listening_ports(federation.pid(project.sites[1])) == set()


@pytest.mark.parametrize(("module", "file"), [("fedserver", "server.json"), ("fedclient", "site.json")])
def test_a_taken_metrics_port_refuses_to_start_naming_the_setting(
    project: ProvisionedProject, module: str, file: str
) -> None:
    kit = project.server if module == "fedserver" else project.sites[0]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        set_local(kit, file, metrics_port=port)
        try:
            result = subprocess.run(
                [sys.executable, "-m", module, "--kit", str(kit), "--no-ready-file"],
                env=ENV,
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            set_local(kit, file, metrics_port=0)
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in message, message[-3000:]
    assert f"metrics_port {port}" in message and str(kit / "local" / file) in message
    assert "choose a free port there" in message
