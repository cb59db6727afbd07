#!/usr/bin/env python3
"""A private test network inside this machine: one Linux network namespace per participant.

Each participant (the server, site-1, ...) gets a namespace `fgnet<owner>-<name>` whose only interface
besides loopback is `eth0`, one end of a veth pair; the other ends hang on a bridge inside a namespace
of their own (`fgnet<owner>-hub`). The subnet is a free /24 of 10.77.0.0/16 (one that no route or
address of this machine overlaps): the server is .1, site-N is .(10+N). One more veth pair, `fgnet<owner>`
in the machine's own namespace (.254), lets an admin on this machine reach the participants.

Nothing leaves: no namespace has a default route, nothing forwards or translates addresses, and the
bridge has no address. `<owner>` is the PID of the process that made the network, so a network whose
owner is gone (a crashed test run) is found by name and removed (`clean`); two runs at once each have
their own names and subnet. Firewall rules inside a namespace (nftables) cut a participant off or let
it reach only one port of another.

Needs root, iproute2 (`ip`) and nftables (`nft`); `available()` says why not when it cannot work.

    scripts/netns.py up [--sites N]     make a network owned by the calling shell; prints its layout
    scripts/netns.py down               remove the network of the calling shell
    scripts/netns.py list               the test networks on this machine and whether their owner runs
    scripts/netns.py clean [--all]      remove the networks whose owner is gone (--all: every one)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

PREFIX = "fgnet"
SUPERNET = ipaddress.ip_network("10.77.0.0/16")
LOCK_FILE = Path("/run/lock/fedgrid-netns.lock")
HOST_OCTET = 254
SERVER_OCTET = 1
FIREWALL = "fgnet"
"""The nftables table (family inet) a participant's firewall rules live in."""
CUT = "fgnet_cut"
"""The nftables table that cuts a participant off (kept apart, so that restoring leaves FIREWALL)."""


class NetError(RuntimeError):
    """A step of making, changing or removing a test network failed (the message names the command)."""


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetError(f"`{' '.join(argv)}` failed (exit {result.returncode}): {result.stderr.strip()}")
    return result


def available() -> str:
    """Why a test network cannot be made here ("" when it can)."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (apt-get install iproute2 nftables, or scripts/setup.sh --test)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    try:
        nft = run("ip", "netns", "exec", probe, "nft", "list", "tables", check=False)
        if nft.returncode != 0:
            return f"nftables does not work inside a network namespace here: {nft.stderr.strip()}"
    finally:
        run("ip", "netns", "del", probe, check=False)
    return ""


def owner_alive(owner: int) -> bool:
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Participant:
    name: str
    namespace: str
    address: str


class TestNet:
    """One test network; `create` makes it, `destroy` removes every trace of it (safe to call twice)."""

    __test__ = False  # not a pytest test class

    def __init__(self, owner: int, subnet: ipaddress.IPv4Network, names: Sequence[str]) -> None:
        self.owner = owner
        self.subnet = subnet
        self.hub = f"{PREFIX}{owner}-hub"
        self.host_link = f"{PREFIX}{owner}"
        self.host_address = str(subnet[HOST_OCTET])
        self.members = {name: Participant(name, f"{PREFIX}{owner}-{name}", str(subnet[octet(name)])) for name in names}

    # ------------------------------------------------------------------ making and removing

    @classmethod
    def create(cls, names: Sequence[str], owner: int | None = None) -> TestNet:
        """A network of `names` ("server", "site-1", ...), owned by `owner` (this process by default)."""
        owner = os.getpid() if owner is None else owner
        with _locked():
            if run("ip", "link", "show", f"{PREFIX}{owner}", check=False).returncode == 0:
                raise NetError(f"a test network owned by {owner} exists already (scripts/netns.py list)")
            net = cls(owner, free_subnet(), names)
            try:
                net._make()
            except BaseException:
                net.destroy()
                raise
        return net

    def _make(self) -> None:
        _add_namespace(self.hub)
        run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.hub, "link", "set", "br0", "up")
        for member in self.members.values():
            _add_namespace(member.namespace)
            port = f"p-{member.name}"[:15]
            run("ip", "link", "add", "eth0", "netns", member.namespace, "type", "veth", "peer", "name", port,
                "netns", self.hub)
            run("ip", "-n", self.hub, "link", "set", port, "master", "br0", "up")
            run("ip", "-n", member.namespace, "addr", "add", f"{member.address}/{self.subnet.prefixlen}", "dev", "eth0")
            run("ip", "-n", member.namespace, "link", "set", "eth0", "up")
        run("ip", "link", "add", self.host_link, "type", "veth", "peer", "name", "p-host", "netns", self.hub)
        Path(f"/proc/sys/net/ipv6/conf/{self.host_link}/disable_ipv6").write_text("1")
        run("ip", "-n", self.hub, "link", "set", "p-host", "master", "br0", "up")
        run("ip", "addr", "add", f"{self.host_address}/{self.subnet.prefixlen}", "dev", self.host_link)
        run("ip", "link", "set", self.host_link, "up")

    def destroy(self) -> None:
        remove(self.owner)

    # ------------------------------------------------------------------ using it

    def address(self, name: str) -> str:
        return self.members[name].address

    def prefix(self, name: str) -> list[str]:
        """The command prefix that runs a program inside `name`'s namespace."""
        return ["ip", "netns", "exec", self.members[name].namespace]

    def exec(self, name: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside `name`'s namespace. Safe: the argument list comes from this script and the tests
        (fixed commands, our own kit paths and addresses), is passed as a list (no shell), and no input from
        a network peer or a job reaches it."""
        return run(*self.prefix(name), *argv, check=check)

    def routes(self, name: str) -> list[dict[str, object]]:
        return json.loads(self.exec(name, "ip", "-j", "route", "show", "table", "all").stdout or "[]")

    def only_port(self, name: str, peer: str, port: int) -> None:
        """Let `name` reach `peer` on TCP `port` only: every other packet it sends to `peer` is dropped."""
        address = self.address(peer)
        self._nft(name, f"""
            table inet {FIREWALL} {{
                chain output {{
                    type filter hook output priority 0; policy accept;
                    ip daddr {address} tcp dport {port} accept
                    ip daddr {address} counter drop
                }}
            }}""")

    def cut(self, name: str, peer: str) -> None:
        """Drop every packet between `name` and `peer` inside `name`'s namespace (no reset, no error:
        to both sides it looks like a link that went dead)."""
        address = self.address(peer)
        self._nft(name, f"""
            table inet {CUT} {{
                chain output {{ type filter hook output priority -10; policy accept; ip daddr {address} drop; }}
                chain input {{ type filter hook input priority -10; policy accept; ip saddr {address} drop; }}
            }}""")

    def restore(self, name: str) -> None:
        """Undo `cut`."""
        self.exec(name, "nft", "delete", "table", "inet", CUT)

    def _nft(self, name: str, ruleset: str) -> None:
        result = subprocess.run([*self.prefix(name), "nft", "-f", "-"], input=ruleset, capture_output=True, text=True)
        if result.returncode != 0:
            raise NetError(f"nft in {self.members[name].namespace} failed: {result.stderr.strip()}")

    def describe(self) -> str:
        lines = [f"test network of {self.owner}: {self.subnet}, no route out"]
        lines += [f"  {m.name:<10} {m.address:<15} ip netns exec {m.namespace} ..." for m in self.members.values()]
        lines.append(f"  {'(this host)':<10} {self.host_address:<15} dev {self.host_link}")
        return "\n".join(lines)


def octet(name: str) -> int:
    """The last octet of a participant's address: the server .1, site-N .(10+N)."""
    if name == "server":
        return SERVER_OCTET
    match = re.fullmatch(r"site-(\d+)", name)
    if match is None or not 1 <= int(match.group(1)) <= 200:
        raise NetError(f"participant {name!r}: the names are server and site-1 .. site-200")
    return 10 + int(match.group(1))


def free_subnet() -> ipaddress.IPv4Network:
    """The first /24 of SUPERNET that no address or route of this machine overlaps (the default route aside)."""
    taken = []
    for entry in json.loads(run("ip", "-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = entry.get("dst", "default")
        if dst != "default":
            taken.append(ipaddress.ip_network(dst, strict=False))
    for link in json.loads(run("ip", "-j", "-4", "addr").stdout or "[]"):
        for info in link.get("addr_info", []):
            taken.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for subnet in SUPERNET.subnets(new_prefix=24):
        if not any(subnet.overlaps(other) for other in taken):
            return subnet
    raise NetError(f"no free /24 left in {SUPERNET} on this machine")


def _add_namespace(namespace: str) -> None:
    run("ip", "netns", "add", namespace)
    # No IPv6 at all: no link-local chatter, no router solicitations, nothing to route anywhere.
    run("ip", "netns", "exec", namespace, "sysctl", "-q", "-w",
        "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
    run("ip", "-n", namespace, "link", "set", "lo", "up")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One network is made at a time on this machine, so that two runs never pick the same subnet."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# ---------------------------------------------------------------------- finding and removing networks


def networks() -> dict[int, list[str]]:
    """The test networks on this machine: owner -> its namespaces (a network may have only its host link)."""
    found: dict[int, list[str]] = {}
    for line in run("ip", "netns", "list").stdout.splitlines():
        match = re.match(rf"({PREFIX}(\d+)-\S+)", line)
        if match:
            found.setdefault(int(match.group(2)), []).append(match.group(1))
    for link in json.loads(run("ip", "-j", "link", "show").stdout or "[]"):
        match = re.fullmatch(rf"{PREFIX}(\d+)", link.get("ifname", ""))
        if match:
            found.setdefault(int(match.group(1)), [])
    return found


def remove(owner: int) -> None:
    """Remove the network of `owner`: end what still runs in its namespaces, delete them and its host link."""
    namespaces = networks().get(owner, [])
    run("ip", "link", "del", f"{PREFIX}{owner}", check=False)
    pids: set[int] = set()
    for namespace in namespaces:
        pids |= {int(p) for p in run("ip", "netns", "pids", namespace, check=False).stdout.split()}
    _end(pids)
    for namespace in namespaces:
        run("ip", "netns", "del", namespace, check=False)
    left = networks().get(owner)
    if left:
        raise NetError(f"the test network of {owner} could not be removed: {', '.join(left)} remain")


def _end(pids: set[int]) -> None:
    """SIGTERM the processes left inside a network's namespaces, SIGKILL those still there after 5 s."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = {pid for pid in pids if owner_alive(pid) and not _zombie(pid)}
            time.sleep(0.1)
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def clean(everything: bool = False) -> list[int]:
    """Remove the networks whose owner process is gone (every test network with `everything`)."""
    removed = []
    for owner in sorted(networks()):
        if everything or not owner_alive(owner):
            remove(owner)
            removed.append(owner)
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="make a network owned by the calling shell and print its layout")
    up.add_argument("--sites", type=int, default=2)
    up.add_argument("--owner", type=int, default=os.getppid(), help="its owner's PID (default: the calling shell)")
    down = commands.add_parser("down", help="remove the network of the calling shell (or --owner)")
    down.add_argument("--owner", type=int, default=os.getppid())
    commands.add_parser("list", help="the test networks on this machine")
    cleaner = commands.add_parser("clean", help="remove the networks whose owner is gone")
    cleaner.add_argument("--all", action="store_true", help="remove every test network, owner running or not")
    args = parser.parse_args(argv)

    if args.command in ("up", "clean", "down") and (reason := available()):
        print(f"error: {reason}", file=sys.stderr)
        return 1
    try:
        if args.command == "up":
            net = TestNet.create(["server", *(f"site-{i}" for i in range(1, args.sites + 1))], owner=args.owner)
            print(net.describe())
        elif args.command == "down":
            remove(args.owner)
        elif args.command == "list":
            for owner, namespaces in sorted(networks().items()):
                state = "running" if owner_alive(owner) else "gone (scripts/netns.py clean removes it)"
                print(f"{owner}: owner {state}; {' '.join(namespaces) or 'host link only'}")
        else:
            for owner in clean(args.all):
                print(f"removed the test network of {owner}")
    except NetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
