"""The rank link: two agents' RankLinks on 127.0.0.1 with real mutual TLS (a fleet CA made for
the test), small asyncio servers standing in for the ranks, and once two real MLX ring ranks.

Certificates come from test_file_server's make_certs: node-a, node-b and node-c from the fleet
CA, and `stranger` from another CA (claiming to be node-a). The tests that relay and close run
on both event loops the agent may run on (uvloop by default).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop

from node_agent import rank_link
from node_agent.file_server import server_context
from node_agent.peer_copy import client_context
from node_agent.rank_link import LinkStats, Member, RankLink
from tests.node_agent.test_file_server import Certs, make_certs

LOCAL = "127.0.0.1"
LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,
}
MIB = 1 << 20


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(autouse=True)
def short_startup_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handshake for a group not open here is refused after this (30 s in the agent)."""
    monkeypatch.setattr(rank_link, "STARTUP_WAIT_S", 0.5)


def make_link(certs: Certs, node: str) -> RankLink:
    cert, key = certs.cert(node), certs.key(node)
    tls = server_context(cert, key, certs.ca), client_context(cert, key, certs.ca_pem)
    return RankLink(*tls, node, LOCAL)


async def when(check: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not check():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


@dataclass
class Rank:
    """Stands in for a rank process: listens on 127.0.0.1, greets each connection with its
    name and a newline, then echoes what it gets until the connection ends."""

    name: bytes
    port: int = 0
    accepted: int = 0
    ended: int = 0  # connections whose other end went away
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._echo, LOCAL, port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(writer)
        writer.write(self.name + b"\n")
        try:
            while data := await reader.read(MIB):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        self.ended += 1
        writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in self.writers:
            w.transport.abort()


@dataclass
class Pair:
    """Agent A (node-a, rank 0) and agent B (node-b, rank 1) with group "g" open on both, each
    with its rank; `a_to_b` is A's relay port for rank 1, `b_to_a` B's for rank 0."""

    a: RankLink
    b: RankLink
    rank_a: Rank
    rank_b: Rank
    members: list[Member]
    a_to_b: int = 0
    b_to_a: int = 0

    def link_port(self, rank: int) -> int:
        """Where the agent of `rank` takes handshakes."""
        return int(self.members[rank].address.rpartition(":")[2])

    async def close(self) -> None:
        await self.a.close()
        await self.b.close()
        self.rank_a.close()
        self.rank_b.close()


async def open_pair(certs: Certs, open_b: bool = True) -> Pair:
    a, b = make_link(certs, "node-a"), make_link(certs, "node-b")
    members = [
        Member(0, "node-a", f"{LOCAL}:{await a.start()}"),
        Member(1, "node-b", f"{LOCAL}:{await b.start()}"),
    ]
    pair = Pair(a, b, Rank(b"rank 0"), Rank(b"rank 1"), members)
    ports = await a.open_group("g", 0, members, await pair.rank_a.start())
    assert list(ports) == [1]
    pair.a_to_b = ports[1]
    if open_b:
        ports = await b.open_group("g", 1, members, await pair.rank_b.start())
        assert list(ports) == [0]
        pair.b_to_a = ports[0]
    return pair


async def dial(port: int, greeting: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect as our rank does to a relay port; the far rank's greeting must come back."""
    reader, writer = await asyncio.open_connection(LOCAL, port)
    assert await asyncio.wait_for(reader.readline(), 10) == greeting + b"\n"
    return reader, writer


async def handshake(
    port: int, tls: ssl.SSLContext, hello: dict[str, Any], source: str = LOCAL
) -> dict[str, Any] | None:
    """One handshake as a peer's agent sends it; the reply, or None when the TLS connection
    fails or ends without one."""
    try:
        reader, writer = await asyncio.open_connection(LOCAL, port, ssl=tls, local_addr=(source, 0))
    except (ssl.SSLError, ConnectionError):
        return None
    try:
        writer.write(json.dumps(hello).encode() + b"\n")
        line = await asyncio.wait_for(reader.readline(), 10)
        return json.loads(line) if line else None
    except (ssl.SSLError, ConnectionError):
        return None
    finally:
        writer.close()


async def relay_both_ways(certs: Certs) -> None:
    pair = await open_pair(certs)
    try:
        payload = b"ping" + os.urandom(3 * MIB)
        reader, writer = await dial(pair.a_to_b, b"rank 1")  # rank 0 dials rank 1
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 20) == payload
        greeted = len(b"rank 1\n")
        assert pair.a.stats("g") == LinkStats(len(payload), len(payload) + greeted, 1, 1, 0)
        assert pair.b.stats("g") == LinkStats(len(payload) + greeted, len(payload), 1, 1, 0)

        back, back_writer = await dial(pair.b_to_a, b"rank 0")  # and the other way round
        back_writer.write(b"pong")
        assert await asyncio.wait_for(back.readexactly(4), 10) == b"pong"
        assert (pair.rank_a.accepted, pair.rank_b.accepted) == (1, 1)
        writer.close()
        back_writer.close()
        await when(lambda: pair.rank_a.ended == pair.rank_b.ended == 1, "both ranks to see EOF")
        await when(lambda: pair.a.stats("g").connections == 0, "A to drop the connections")
        await when(lambda: pair.b.stats("g").connections == 0, "B to drop the connections")
        # Each agent sent and received the payload or its echo, "pong", and one greeting.
        both = len(payload) + 4 + greeted
        assert pair.a.stats("g") == LinkStats(both, both, 0, 2, 0)
        assert pair.b.stats("g") == LinkStats(both, both, 0, 2, 0)
        assert (pair.a.refused, pair.b.refused) == (0, 0)
    finally:
        await pair.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_bytes_pass_both_ways_and_are_counted(certs: Certs, loop: str) -> None:
    LOOPS[loop](relay_both_ways(certs))


async def close_group_ends_both(certs: Certs, side: str) -> None:
    pair = await open_pair(certs)
    try:
        reader, writer = await dial(pair.a_to_b, b"rank 1")
        closing = pair.a if side == "a" else pair.b
        await closing.close_group("g")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # rank 0 sees EOF
        await when(lambda: pair.rank_b.ended == 1, "rank 1 to see EOF")
        with pytest.raises(KeyError):
            closing.stats("g")
        other = pair.b if side == "a" else pair.a
        await when(lambda: other.stats("g").connections == 0, "the other agent to drop it")
        assert other.stats("g").connections_total == 1
        if side == "a":  # its relay port is gone too
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(LOCAL, pair.a_to_b)
        writer.close()
    finally:
        await pair.close()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("side", ["a", "b"])
def test_close_group_ends_its_connections_at_both_ranks(certs: Certs, loop: str, side: str) -> None:
    """Closed on the dialling agent (a) or the dialled one (b), both ranks see EOF at once."""
    LOOPS[loop](close_group_ends_both(certs, side))


async def test_a_rank_that_closes_closes_the_other_end(certs: Certs) -> None:
    pair = await open_pair(certs)
    try:
        reader, writer = await dial(pair.a_to_b, b"rank 1")
        pair.rank_b.writers[0].close()  # rank 1 goes away: rank 0 sees EOF
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        reader, writer = await dial(pair.a_to_b, b"rank 1")
        writer.close()  # rank 0 goes away: rank 1 sees EOF
        await when(lambda: pair.rank_b.ended == 2, "rank 1 to see EOF")
        await when(lambda: pair.a.stats("g").connections == 0, "A to drop the connections")
        assert pair.a.stats("g").connections_total == 2
    finally:
        await pair.close()


@pytest.mark.parametrize(
    ("node", "hello", "error", "group_refused"),
    [
        ("node-a", {"group": "nope", "from": 0, "to": 1}, "group 'nope' is not open on node-b", 0),
        ("node-a", {"group": "g", "from": 0, "to": 0}, "node-b runs rank 1 of g, not 0", 1),
        ("node-a", {"group": "g", "from": 5, "to": 1}, "rank 5 is not another member of g", 1),
        ("node-b", {"group": "g", "from": 1, "to": 1}, "rank 1 is not another member of g", 1),
        (
            "node-c",
            {"group": "g", "from": 0, "to": 1},
            "rank 0 is node-a, the certificate is 'node-c'",
            1,
        ),
        (
            "node-a",
            {"group": "g", "from": "0", "to": 1},
            "the handshake needs group (a string), from and to (ranks)",
            0,
        ),
    ],
    ids=["wrong-group", "wrong-to", "not-a-member", "from-itself", "wrong-node", "malformed"],
)
async def test_a_handshake_that_does_not_fit_is_refused(
    certs: Certs, node: str, hello: dict[str, Any], error: str, group_refused: int
) -> None:
    pair = await open_pair(certs)
    try:
        b_port = pair.link_port(1)
        assert await handshake(b_port, certs.client(node), hello) == {"error": error}
        assert pair.b.refused == 1
        assert pair.b.stats("g").refused == group_refused
        assert pair.rank_b.accepted == 0
        # A fitting one is still answered: the refusal changed nothing.
        ok = {"group": "g", "from": 0, "to": 1}
        assert await handshake(b_port, certs.client("node-a"), ok) == {"ok": True}
        assert pair.b.refused == 1
        await when(lambda: pair.rank_b.accepted == 1, "rank 1 to be connected")
    finally:
        await pair.close()


async def test_a_caller_must_come_from_its_members_address(certs: Certs) -> None:
    """Node-a's address in this group is 127.0.0.2: the same certificate from 127.0.0.1 is
    refused; A's own relay leaves from its address, so it gets through."""
    pair = await open_pair(certs, open_b=False)
    try:
        b_port = pair.link_port(1)
        a_port = pair.link_port(0)
        members = [Member(0, "node-a", f"127.0.0.2:{a_port}"), pair.members[1]]
        await pair.b.open_group("g2", 1, members, await pair.rank_b.start())
        hello = {"group": "g2", "from": 0, "to": 1}
        tls = certs.client("node-a")
        reply = await handshake(b_port, tls, hello, source=LOCAL)
        assert reply == {"error": f"rank 0 is at 127.0.0.2:{a_port}, this comes from 127.0.0.1"}
        assert (pair.b.refused, pair.b.stats("g2").refused) == (1, 1)
        assert await handshake(b_port, tls, hello, source="127.0.0.2") == {"ok": True}
        ports = await pair.a.open_group("g2", 0, members, pair.rank_a.port)
        reader, writer = await dial(ports[1], b"rank 1")
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
        assert pair.b.refused == 1
        writer.close()
    finally:
        await pair.close()


@pytest.mark.parametrize("client", [None, "stranger"], ids=["no-certificate", "another-ca"])
async def test_a_caller_without_a_fleet_certificate_is_refused(
    certs: Certs, client: str | None
) -> None:
    pair = await open_pair(certs)
    try:
        b_port = pair.link_port(1)
        hello = {"group": "g", "from": 0, "to": 1}
        assert await handshake(b_port, certs.client(client), hello) is None
        await when(lambda: pair.b.refused == 1, "the refusal to be counted")
        assert pair.b.stats("g").refused == 0  # no handshake was read: no group to blame
        assert pair.rank_b.accepted == 0
    finally:
        await pair.close()


async def test_the_dialled_agent_must_be_the_member(certs: Certs) -> None:
    """A's group says rank 1 is node-b, but its address is node-c's agent: A does not send it
    a handshake, and its rank's connection ends."""
    pair = await open_pair(certs, open_b=False)
    c = make_link(certs, "node-c")
    try:
        c_port = await c.start()
        members = [pair.members[0], Member(1, "node-b", f"{LOCAL}:{c_port}")]
        ports = await pair.a.open_group("g3", 0, members, pair.rank_a.port)
        reader, writer = await asyncio.open_connection(LOCAL, ports[1])
        assert await asyncio.wait_for(reader.read(), 10) == b""
        await when(lambda: c.refused == 1, "C to count the connection without a handshake")
        assert pair.a.stats("g3") == LinkStats(0, 0, 0, 0, 0)
        writer.close()
    finally:
        await c.close()
        await pair.close()


async def test_a_handshake_waits_for_its_group_and_rank(
    certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Agents open a group at slightly different times and ranks start later still: the
    relay holds the connection until both are there (the ring's own connect retries cannot
    help: the relay port accepted at once)."""
    monkeypatch.setattr(rank_link, "STARTUP_WAIT_S", 10.0)
    pair = await open_pair(certs, open_b=False)
    try:
        reader, writer = await asyncio.open_connection(LOCAL, pair.a_to_b)
        await when(lambda: len(pair.b._tasks) == 1, "the handshake to reach B")
        port = free_port()
        await pair.b.open_group("g", 1, pair.members, port)  # rank 1 does not listen yet
        await pair.rank_b.start(port)
        assert await asyncio.wait_for(reader.readline(), 10) == b"rank 1\n"
        assert (pair.a.refused, pair.b.refused) == (0, 0)
        writer.close()
    finally:
        await pair.close()


async def test_open_group_checks_its_arguments(certs: Certs) -> None:
    pair = await open_pair(certs)
    try:
        with pytest.raises(ValueError, match="group 'g' is already open"):
            await pair.a.open_group("g", 0, pair.members, 1)
        with pytest.raises(ValueError, match="ranks"):
            await pair.a.open_group("h", 2, pair.members, 1)
        with pytest.raises(ValueError, match="ranks"):
            await pair.a.open_group("h", 0, [pair.members[0], pair.members[0]], 1)
        with pytest.raises(ValueError, match="not host:port"):
            await pair.a.open_group("h", 0, [pair.members[0], Member(1, "node-b", "x")], 1)
        with pytest.raises(KeyError):
            pair.a.stats("h")
    finally:
        await pair.close()


MLX_RANK = """
import json
import mlx.core as mx
group = mx.distributed.init(backend="ring", strict=True)
x = mx.distributed.all_sum(mx.full((1 << 20,), group.rank() + 1.0))  # 4 MiB
print(json.dumps({"rank": group.rank(), "size": group.size(), "sum": x.sum().item()}))
"""


async def test_two_mlx_ring_ranks_all_sum_through_the_links(certs: Certs, tmp_path: Any) -> None:
    """Two real MLX processes (ring backend) whose only way to each other is the two links:
    each listens on its own 127.0.0.1 port, the other rank's entry is its agent's relay."""
    pair = await open_pair(certs, open_b=False)
    procs: list[asyncio.subprocess.Process] = []
    try:
        own = [free_port(), free_port()]
        relay_a = await pair.a.open_group("ring", 0, pair.members, own[0])
        relay_b = await pair.b.open_group("ring", 1, pair.members, own[1])
        hostfiles = [[[f"{LOCAL}:{own[0]}"], [f"{LOCAL}:{relay_a[1]}"]]]
        hostfiles.append([[f"{LOCAL}:{relay_b[0]}"], [f"{LOCAL}:{own[1]}"]])
        for rank, hosts in enumerate(hostfiles):
            path = tmp_path / f"hosts-{rank}.json"
            path.write_text(json.dumps(hosts))
            env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(path)}
            procs.append(
                await asyncio.create_subprocess_exec(
                    *(sys.executable, "-c", MLX_RANK),
                    env=env,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                )
            )
        async with asyncio.timeout(120):
            outputs = [(await p.communicate())[0].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
        assert results == [{"rank": r, "size": 2, "sum": 3.0 * (1 << 20)} for r in (0, 1)]
        a, b = pair.a.stats("ring"), pair.b.stats("ring")
        assert (a.bytes_sent, a.bytes_received) == (b.bytes_received, b.bytes_sent)
        assert a.bytes_sent >= 2 * MIB and b.bytes_sent >= 2 * MIB  # each sends its half
        assert (a.connections_total, b.connections_total) == (2, 2)  # each rank dials once
        await when(lambda: pair.a.stats("ring").connections == 0, "A to drop the connections")
        assert (pair.a.refused, pair.b.refused) == (0, 0)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await pair.close()
