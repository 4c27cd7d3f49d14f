"""Several hosts on one Linux machine: network namespaces on a bridge, for multi-host tests.

Layout: a bridge in the root namespace holds 10.231.N.254/24 (so the test process reaches every
host); host i is a namespace whose `eth0` (one end of a veth pair, the other on the bridge) holds
10.231.N.i/24. N is the first /24 no other interface here uses, so parallel runs do not collide.
Only addresses made here are ever used: 10.231.N.0/24 and 127.0.0.0/8. IPv6 is off inside.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SUBNET_PREFIX = "10.231"
BRIDGE_HOST = 254
NS_PREFIX = "mlxfleet"
# Held while choosing a subnet and creating it, so two runs never pick the same one.
LOCK_PATH = Path("/run/mlxfleet-netns.lock")
IP_TIMEOUT_S = 10.0
SHAPE_LATENCY_MS = 20  # tbf: how long a packet may wait in the queue before it is dropped
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Host:
    """One simulated machine: a namespace with `eth0` on the bridge."""

    name: str  # the namespace
    ip: str
    veth: str  # the root-namespace end of its link


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can (root and `ip` present)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    return None


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run one `ip` command (inside `netns` when given); raise with its stderr on failure."""
    return _run("ip", args, netns, check)


def tc(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run one `tc` command (inside `netns` when given); raise with its stderr on failure."""
    return _run("tc", args, netns, check)


def _run(tool: str, args: Sequence[str], netns: str | None, check: bool) -> str:
    cmd = ["ip", "netns", "exec", netns, tool, *args] if netns else [tool, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return done.stdout


def used_subnets() -> set[int]:
    """Third octets of the 10.231.x.0/24 networks already on some root-namespace interface."""
    pattern = re.compile(rf"inet {re.escape(SUBNET_PREFIX)}\.(\d+)\.")
    return {int(m.group(1)) for m in pattern.finditer(ip("-4", "addr", "show"))}


def sweep_stale() -> None:
    """Delete namespaces and bridges left by runs whose process no longer exists."""
    for line in ip("netns", "list").splitlines():
        match = re.match(rf"({NS_PREFIX}-(\d+)-\S+)", line)
        if match and not _pid_alive(int(match.group(2))):
            ip("netns", "delete", match.group(1), check=False)
    for line in ip("-o", "link", "show", "type", "bridge").splitlines():
        match = re.match(rf"\d+: (\S+?)[:@].*\balias {NS_PREFIX}-(\d+)\b", line)
        if match and not _pid_alive(int(match.group(2))):
            ip("link", "delete", match.group(1), check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _disable_ipv6(interface: str) -> None:
    # Router solicitations and MLD reports are noise on a test LAN meant for IPv4 mDNS.
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{interface}/disable_ipv6").write_text("1")


class Network:
    """A bridge and `hosts` namespaces; built on enter, torn down on exit even after a failure.

    Processes started with run() are killed (their whole session) before the namespaces go.
    """

    def __init__(self, hosts: int) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError(f"hosts must be 1..200, got {hosts}")
        self._count = hosts
        self._tag = secrets.token_hex(3)  # interface names: "mfv" + 6 + index ≤ 15 chars
        self.bridge = f"mfb{self._tag}"
        self.hosts: list[Host] = []
        self.bridge_ip = ""
        self.subnet = ""
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Network:
        try:
            self._build()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._teardown()

    def run(
        self,
        host: Host,
        args: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        stdin: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a process inside `host` in a new session; output goes to `log_path`."""
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", host.name, *args],
                stdin=stdin,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True,
            )
        self._procs.append(proc)
        return proc

    def python(
        self, host: Host, args: Sequence[str], log_path: Path, stdin: int | None = None
    ) -> subprocess.Popen[bytes]:
        """Run this interpreter inside `host`."""
        return self.run(host, [sys.executable, *args], log_path, stdin=stdin)

    def link_down(self, host: Host) -> None:
        """Cut `host` off the bridge: its eth0 loses carrier (a partition)."""
        ip("link", "set", host.veth, "down")

    def link_up(self, host: Host) -> None:
        """Reconnect `host` to the bridge."""
        ip("link", "set", host.veth, "up")

    def shape(
        self,
        host: Host,
        rate_mbit: float,
        direction: Literal["egress", "ingress"] = "egress",
    ) -> None:
        """Cap `host`'s link at `rate_mbit` (a token bucket): egress is what it sends (its
        uplink), ingress what it receives. Shaping again replaces the cap."""
        rate_bytes_s = rate_mbit * 1e6 / 8
        # At least one GSO segment (veth hands the queue 64 KiB ones), and 4 ms at the rate.
        burst = max(128 * 1024, int(rate_bytes_s * 0.004))
        qdisc = ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst)]
        qdisc += ["latency", f"{SHAPE_LATENCY_MS}ms"]
        if direction == "egress":
            tc("qdisc", "replace", "dev", "eth0", "root", *qdisc, netns=host.name)
        else:
            tc("qdisc", "replace", "dev", host.veth, "root", *qdisc)

    def unshape(self, host: Host) -> None:
        """Take both caps off `host`'s link."""
        tc("qdisc", "delete", "dev", "eth0", "root", netns=host.name, check=False)
        tc("qdisc", "delete", "dev", host.veth, "root", check=False)

    def _build(self) -> None:
        sweep_stale()
        nf_call = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
        if nf_call.exists() and nf_call.read_text().strip() == "1":
            # Bridged frames then pass iptables FORWARD; we cannot change that host-wide setting
            # safely, so a DROP policy there would show up as peers that never see each other.
            logger.info("net.bridge.bridge-nf-call-iptables=1: bridged traffic passes iptables")
        LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        with LOCK_PATH.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            octet = next(n for n in range(256) if n not in used_subnets())
            self.subnet = f"{SUBNET_PREFIX}.{octet}.0/24"
            self.bridge_ip = f"{SUBNET_PREFIX}.{octet}.{BRIDGE_HOST}"
            # mcast_snooping 0: flood multicast to every port, no IGMP state to wait for.
            ip(
                "link",
                "add",
                self.bridge,
                "type",
                "bridge",
                "mcast_snooping",
                "0",
                "stp_state",
                "0",
            )
            ip("link", "set", self.bridge, "alias", f"{NS_PREFIX}-{os.getpid()}")
            _disable_ipv6(self.bridge)
            ip("addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        for i in range(1, self._count + 1):
            self.hosts.append(self._add_host(i, f"{SUBNET_PREFIX}.{octet}.{i}"))

    def _add_host(self, index: int, address: str) -> Host:
        host = Host(
            f"{NS_PREFIX}-{os.getpid()}-{self._tag}-h{index}", address, f"mfv{self._tag}{index}"
        )
        peer = f"mfp{self._tag}{index}"
        ip("netns", "add", host.name)
        ip("link", "add", host.veth, "type", "veth", "peer", "name", peer)
        _disable_ipv6(host.veth)
        ip("link", "set", peer, "netns", host.name)
        subprocess.run(
            ["ip", "netns", "exec", host.name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
            capture_output=True,
            timeout=IP_TIMEOUT_S,
        )
        ip("link", "set", peer, "name", "eth0", netns=host.name)
        ip("addr", "add", f"{address}/24", "dev", "eth0", netns=host.name)
        ip("link", "set", "lo", "up", netns=host.name)
        ip("link", "set", "eth0", "up", netns=host.name)
        # mDNS sends to 224.0.0.251; with no default route the kernel needs this one.
        ip("route", "add", "224.0.0.0/4", "dev", "eth0", netns=host.name)
        ip("link", "set", host.veth, "master", self.bridge)
        ip("link", "set", host.veth, "up")
        return host

    def _teardown(self) -> None:
        for proc in self._procs:
            _stop(proc)
        for host in self.hosts:
            # Deleting the veth first: a namespace's interfaces otherwise vanish asynchronously.
            ip("link", "delete", host.veth, check=False)
            ip("netns", "delete", host.name, check=False)
        ip("link", "delete", self.bridge, check=False)
        self.hosts = []


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process's session, SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
