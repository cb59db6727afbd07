"""A federation across several hosts for real: the server and four sites each in their own Linux network
namespace, on a private subnet made by scripts/netns.py, reaching each other by their own addresses.

The sites' firewalls (nftables in their namespaces) let them reach the server's fed_port and nothing
else of it, for the whole module: every job here runs with the admin port closed to the sites, as the
README's port table says a deployment may. The admin connects from this machine over the network's host
link. A cut (every packet between a site and the server dropped inside the site's namespace) makes a
partition that neither side is told about.

Needs root, iproute2 and nftables (scripts/setup.sh --test installs them); skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from conftest import ProvisionedProject, provision_project
from federation import Federation, set_local, wait_until
from replay import INITIAL, SCRIPT, Site, assert_model, replay, train_args

from fedgrid import tensors
from fedgrid.recipe import FedAvgRecipe
from fedgrid.serde import JobDetail
from fedgrid.session import Session


def _load_netns() -> ModuleType:
    path = Path(__file__).parents[1] / "scripts" / "netns.py"
    spec = importlib.util.spec_from_file_location("netns", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["netns"] = module
    spec.loader.exec_module(module)
    return module


netns = _load_netns()
UNAVAILABLE = netns.available()
pytestmark = pytest.mark.skipif(bool(UNAVAILABLE), reason=f"no test network: {UNAVAILABLE}")

SITES = [
    Site("site-1", shift=1.0, samples=100),
    Site("site-2", shift=4.0, samples=300),
    Site("site-3", shift=-2.0, samples=50),
    Site("site-4", shift=0.5, samples=150),
]
NAMES = [s.name for s in SITES]
# Fixed ports are safe here: each port is on an address of the test's own namespaces, where nothing else listens.
FED_PORT, ADMIN_PORT = 8002, 8003
HEARTBEAT_TIMEOUT = 5.0
"""Seconds of silence after which the server shows a site dead (and it leaves its jobs): short, so that
a cut site leaves soon, long enough that a busy machine's late heartbeat does not make one leave."""


@pytest.fixture(scope="module")
def net() -> Iterator[netns.TestNet]:
    netns.clean()  # the networks of earlier runs that crashed before their teardown
    default_routes = _default_routes()
    network = netns.TestNet.create(["server", *NAMES])
    try:
        for site in NAMES:
            network.only_port(site, "server", FED_PORT)
        yield network
    finally:
        network.destroy()
    assert network.owner not in netns.networks(), "the test network is gone after its teardown"
    assert _default_routes() == default_routes, "this machine's default routes are as they were"
    left = netns.run("ip", "-4", "route", "show", "table", "all", "dev", network.host_link, check=False).stdout
    assert network.host_link not in netns.run("ip", "link").stdout and not left.strip(), left


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, net: netns.TestNet) -> ProvisionedProject:
    project = provision_project(
        tmp_path_factory.mktemp("netns"),
        n_sites=len(SITES),
        host=net.address("server"),
        fed_port=FED_PORT,
        admin_port=ADMIN_PORT,
    )
    set_local(project.server, "server.json", heartbeat_timeout=HEARTBEAT_TIMEOUT)
    return project


@pytest.fixture(scope="module")
def federation(project: ProvisionedProject, net: netns.TestNet) -> Iterator[Federation]:
    """The server and each site daemon started inside its own namespace (`ip netns exec ... start.sh`)."""
    fed = Federation(project, launcher=lambda kit: net.prefix(kit.name))
    try:
        fed.start_all()
        yield fed
    finally:
        fed.close()


def _default_routes() -> list[dict[str, object]]:
    return json.loads(netns.run("ip", "-j", "route", "show", "default").stdout or "[]")


def _reachable(net: netns.TestNet, port: int) -> dict[str, bool]:
    """Per site: whether a TCP connection from inside its namespace to the server's `port` opens within 3 s."""
    probe = f"import socket; socket.create_connection(({net.address('server')!r}, {port}), timeout=3).close()"
    probes = {
        site: subprocess.Popen([*net.prefix(site), sys.executable, "-c", probe], stderr=subprocess.DEVNULL)
        for site in NAMES
    }
    return {site: process.wait(30) == 0 for site, process in probes.items()}


def _recipe(tmp_path: Path, rounds: int, extra_args: str = "", **options: object) -> Path:
    recipe = FedAvgRecipe(
        name="netns",
        model=INITIAL,
        train_script=SCRIPT,
        train_args=f"{train_args(SITES)} {extra_args}".strip(),
        num_rounds=rounds,
        sites=NAMES,
        **options,  # type: ignore[arg-type]
    )
    return recipe.export(tmp_path / "job")


def _ended(session: Session, job_id: str, timeout: float = 90.0) -> JobDetail:
    def done() -> JobDetail | None:
        detail = session.show_job(job_id)
        return detail if detail.info.status.startswith("FINISHED") else None

    return wait_until(done, timeout, f"job {job_id} to end")


def test_the_network_is_private_and_reaches_nothing_outside(net: netns.TestNet) -> None:
    for name in ["server", *NAMES]:
        routes = net.routes(name)
        assert [r for r in routes if r.get("dst") == "default"] == [], f"{name} has a default route"
        outside = net.exec(name, "ip", "route", "get", "192.0.2.1", check=False)
        assert outside.returncode != 0 and "unreachable" in outside.stderr, f"{name} can route out: {outside.stdout}"
        assert net.address(name) in net.exec(name, "ip", "-4", "-br", "addr", "show", "dev", "eth0").stdout
    # This machine reaches the test subnet through the network's own host link only.
    route = netns.run("ip", "route", "get", net.address("server")).stdout
    assert f"dev {net.host_link} " in route, route


def test_a_four_site_job_runs_across_the_namespaces_and_the_server_sees_each_site_at_its_address(
    federation: Federation, net: netns.TestNet, tmp_path: Path
) -> None:
    with federation.session() as session:
        addresses = {s.name: s.address for s in session.check_status("client")}
        for site in NAMES:
            assert addresses[site].startswith(f"ipv4:{net.address(site)}:"), addresses
        job_id = session.submit_job(_recipe(tmp_path, rounds=2, min_clients=4))
        detail = _ended(session, job_id)
        assert detail.info.status == "FINISHED:COMPLETED", detail.info.error
        assert [(r.sites_asked, r.sites_answered) for r in detail.rounds] == [(4, 4), (4, 4)]
        assert set(detail.site_states.values()) == {"finished"}, detail.site_states
        result = session.download_job(job_id, tmp_path / "download")
    assert_model(tensors.load_file(result / "final_model.safetensors"), replay([SITES] * 2)[1], "final model")


def test_a_site_cut_off_mid_round_leaves_and_rejoins_the_next_round_when_its_route_is_back(
    federation: Federation, net: netns.TestNet, tmp_path: Path
) -> None:
    """site-2 is cut off while it trains round 2: the server shows it dead and gone from the job, and
    round 2 closes with the other three. Its route comes back before round 2 closes: its late round-2
    update is dropped, it rejoins, and round 3 asks it again and folds its update."""
    gates = tmp_path / "gates"
    gates.mkdir()

    def open_gate(site: str, round_no: int) -> None:
        (gates / f"{site}-{round_no}").touch()

    for site in NAMES:
        open_gate(site, 1)
        open_gate(site, 3)
    with federation.session() as session:
        recipe = _recipe(tmp_path, 3, f"--gate {gates}", min_clients=3, min_responses=3, round_timeout=120.0)
        job_id = session.submit_job(recipe)
        wait_until(lambda: (gates / "site-2-2.waiting").exists(), 90, "site-2 to train round 2")

        net.cut("site-2", "server")
        try:
            left = wait_until(
                lambda: session.show_job(job_id).site_states["site-2"].startswith("left"), 30, "site-2 to leave"
            )
            states = {s.name: s.state for s in session.check_status("client")}
            assert states["site-2"] != "alive" and states["site-1"] == "alive", states
            assert session.show_job(job_id).info.status == "RUNNING"
        finally:
            net.restore("site-2")
        assert left and "left: no heartbeat for" in session.show_job(job_id).site_states["site-2"]

        open_gate("site-2", 2)  # it sends its round-2 update (too late) and asks for work again
        wait_until(lambda: "site-2 rejoined the job" in session.job_log(job_id, "server", 0), 60, "site-2 to rejoin")
        state = session.show_job(job_id).site_states["site-2"]
        assert state.startswith("running (rejoined after it left: no heartbeat for"), state
        for site in NAMES:
            open_gate(site, 2)
        detail = _ended(session, job_id)
        log = session.job_log(job_id, "server", 0)
        result = session.download_job(job_id, tmp_path / "download")

    assert detail.info.status == "FINISHED:COMPLETED", detail.info.error
    assert [(r.sites_asked, r.sites_answered) for r in detail.rounds] == [(4, 4), (4, 3), (4, 4)]
    assert detail.site_states["site-2"].startswith("finished (rejoined after it left: no heartbeat for")
    assert "site-2 left the job: no heartbeat for" in log
    assert "site-2: result for round-2-train arrived after its round closed; dropped" in log
    three = [s for s in SITES if s.name != "site-2"]
    expected = replay([SITES, three, SITES])[2]
    assert_model(tensors.load_file(result / "final_model.safetensors"), expected, "final model")


def test_sites_that_reach_only_the_fed_port_run_a_job(
    federation: Federation, net: netns.TestNet, tmp_path: Path
) -> None:
    """The sites' firewalls let through the fed_port only; the admin port answers this machine alone."""
    assert _reachable(net, FED_PORT) == dict.fromkeys(NAMES, True), "every site reaches the fed_port"
    assert _reachable(net, ADMIN_PORT) == dict.fromkeys(NAMES, False), "no site reaches the admin port"
    socket.create_connection((net.address("server"), ADMIN_PORT), timeout=5).close()
    with federation.session() as session:
        job_id = session.submit_job(_recipe(tmp_path, rounds=1, min_clients=4))
        detail = _ended(session, job_id)
    assert detail.info.status == "FINISHED:COMPLETED", detail.info.error
    assert [(r.sites_asked, r.sites_answered) for r in detail.rounds] == [(4, 4)]
