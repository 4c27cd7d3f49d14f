"""mDNS between separate hosts: real processes in network namespaces, real multicast."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from coordinator.discovery import DiscoveredNode, Discovery
from node_agent.advertise import MIN_UPDATE_INTERVAL_S
from tests.netns import Network

T = TypeVar("T")
PEER = Path(__file__).with_name("mdns_peer.py")
# Probing + three announcements take about 1.5 s; resolving a few hundred ms more.
MDNS_TIMEOUT_S = 15.0


async def eventually(check: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """Poll `check` on the loop until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def log_line(log: Path, prefix: str) -> Callable[[], str | None]:
    """A check: the first line of `log` that starts with `prefix`."""

    def check() -> str | None:
        text = log.read_text(errors="replace") if log.exists() else ""
        return next((line for line in text.splitlines() if line.startswith(prefix)), None)

    return check


def send(proc: subprocess.Popen[bytes], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line.encode() + b"\n")
    proc.stdin.flush()


async def test_node_on_one_host_is_discovered_updated_and_removed_from_another(
    make_network: Callable[[int], Network], tmp_path: Path
) -> None:
    """Needs namespaces: the advertiser must be another host with its own address, so the
    record crosses a real link by multicast and carries that host's IPv4."""
    net = make_network(1)
    host_a = net.hosts[0]
    log = tmp_path / "node.log"
    node = net.python(
        host_a,
        [
            str(PEER),
            "node",
            "--ip",
            host_a.ip,
            "--node-id",
            "mini-1",
            "--chip",
            "Apple M2 Pro",
            "--ram-gib",
            "32",
            "--role",
            "server",
            "--avail-gib",
            "20.04",
        ],
        log,
        stdin=subprocess.PIPE,
    )
    changes: list[int] = []
    discovery = Discovery(interfaces=[net.bridge_ip], on_change=lambda: changes.append(1))
    await discovery.start()
    try:
        await eventually(log_line(log, "ready"), MDNS_TIMEOUT_S, f"node advertiser: {log}")
        seen = await eventually(
            lambda: discovery.nodes.get("mini-1"), MDNS_TIMEOUT_S, "mini-1 discovered"
        )
        assert (seen.node_id, seen.addresses, seen.port) == ("mini-1", (host_a.ip,), 8402)
        assert (seen.chip, seen.ram_gib, seen.role) == ("Apple M2 Pro", 32, "server")
        assert (seen.avail_gib, seen.thermal, seen.version) == (20.0, "nominal", "0.1.0")
        assert changes

        send(node, "thermal serious")
        hot = await eventually(
            lambda: _node_if(discovery, "mini-1", lambda n: n.thermal == "serious"),
            MDNS_TIMEOUT_S,
            "thermal=serious to reach the other host",
        )
        assert (hot.chip, hot.avail_gib) == ("Apple M2 Pro", 20.0)

        # Inside the rate limit: goes out later, by the advertiser's own timer.
        send(node, "avail 30")
        drained = await eventually(
            lambda: _node_if(discovery, "mini-1", lambda n: n.avail_gib == 30.0),
            MIN_UPDATE_INTERVAL_S + MDNS_TIMEOUT_S,
            "rate-limited avail_gib=30.0 update",
        )
        assert drained.thermal == "serious"

        send(node, "close")
        await eventually(log_line(log, "closed"), MDNS_TIMEOUT_S, f"advertiser close: {log}")
        await eventually(
            lambda: "mini-1" not in discovery.nodes, MDNS_TIMEOUT_S, "mini-1 removed on goodbye"
        )
        assert node.wait(MDNS_TIMEOUT_S) == 0, log.read_text()
    finally:
        await discovery.close()


def _node_if(
    discovery: Discovery, node_id: str, predicate: Callable[[DiscoveredNode], bool]
) -> DiscoveredNode | None:
    node = discovery.nodes.get(node_id)
    return node if node is not None and predicate(node) else None


async def test_agent_on_one_host_finds_coordinator_on_another(
    make_network: Callable[[int], Network], tmp_path: Path
) -> None:
    """Needs namespaces: find_coordinator must return the coordinator host's own address,
    which only differs from the agent's when they are separate hosts on one link."""
    net = make_network(2)
    host_a, host_b = net.hosts
    coord_log, find_log = tmp_path / "coordinator.log", tmp_path / "find.log"
    fingerprint = "sha256:" + "ab" * 32
    net.python(
        host_a,
        [
            str(PEER),
            "coordinator",
            "--ip",
            host_a.ip,
            "--grpc",
            "9401",
            "--gw",
            "9400",
            "--fp",
            fingerprint,
        ],
        coord_log,
        stdin=subprocess.PIPE,
    )
    await eventually(log_line(coord_log, "ready"), MDNS_TIMEOUT_S, f"coordinator: {coord_log}")
    net.python(host_b, [str(PEER), "find", "--ip", host_b.ip, "--timeout", "10"], find_log)

    line = await eventually(log_line(find_log, "found "), MDNS_TIMEOUT_S, f"finder: {find_log}")
    found = json.loads(line.removeprefix("found "))
    assert found == {
        "host": host_a.ip,
        "grpc_port": 9401,
        "gateway_port": 9400,
        "fingerprint": fingerprint,
        "version": "0.1.0",
        "enroll_port": 9403,
    }


async def test_find_coordinator_gives_up_when_none_is_announced(
    make_network: Callable[[int], Network], tmp_path: Path
) -> None:
    """Needs namespaces: an empty link of our own is the only way to be sure no real
    coordinator on this machine's LAN answers."""
    net = make_network(1)
    log = tmp_path / "find.log"
    proc = net.python(
        net.hosts[0], [str(PEER), "find", "--ip", net.hosts[0].ip, "--timeout", "2"], log
    )
    line = await eventually(log_line(log, "found "), MDNS_TIMEOUT_S, f"finder: {log}")
    assert line == "found null"
    assert proc.wait(MDNS_TIMEOUT_S) == 0
