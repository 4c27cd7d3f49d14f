"""Carries an MLX distributed group's connections between nodes, over the fleet's mutual TLS.

A rank never touches the network: it listens on 127.0.0.1:rank_port, and its hostfile points each
other rank at a relay port of this agent on 127.0.0.1 (`open_group` returns them). A connection
to the relay port for rank j is dialled to member j's agent, which checks it and splices it
into its own rank's port:

    rank i --tcp--> agent i (relay port for j) ==TLS==> agent j (rank link server) --tcp--> rank j
                     {"group": g, "from": i, "to": j} -->  <-- {"ok": true} | {"error": "..."}

The dialling agent wants a fleet certificate naming member j's node. The server refuses (one
log line, counted in `refused`) a caller without a fleet certificate, a group not open here, a
handshake not for this node's rank, a "from" that is not a member, or a caller that is not that
member's node (certificate) or not at its address (IP).

Start-up skew: the ring retries its connects for ~30 s, but a relay port accepts at once, so the
relay absorbs the skew: a handshake waits up to STARTUP_WAIT_S for its group and its rank.

Why asyncio streams in the agent's loop: decode steps send small messages, so latency counts;
a hop is one read and one write of whatever arrived (TCP_NODELAY everywhere). On loopback a
1 KiB round trip took ~27 us direct, ~90-120 us through both relays (uvloop); protocol
callbacks instead of streams saved ~10 us of it, not worth their code.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import json
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from node_agent.file_server import common_name

logger = logging.getLogger(__name__)
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

LOOPBACK = "127.0.0.1"  # where ranks listen and relay ports are opened
READ_BYTES = 256 * 1024  # one read per hop, and the streams' buffer limit
HANDSHAKE_MAX_BYTES = 1024  # the one-line JSON handshake and its reply
HANDSHAKE_TIMEOUT_S = 5.0  # the TLS handshake, then the handshake line
CONNECT_TIMEOUT_S = 5.0  # TCP connect to a member's agent
STARTUP_WAIT_S = 30.0  # a handshake waits this long for its group to open and its rank to listen
RANK_RETRY_S = 0.05  # between connects to a rank that does not listen yet
BACKLOG = 64


@dataclass(frozen=True, slots=True)
class Member:
    """One rank of a group: the node that runs it and its agent's rank link server."""

    rank: int
    node_id: str
    address: str  # "host:port" of that node's agent's rank link server


@dataclass(frozen=True, slots=True)
class LinkStats:
    """A group's traffic as counted at this agent: payload bytes, handshakes excluded."""

    bytes_sent: int  # to other members' agents
    bytes_received: int  # from other members' agents
    connections: int  # relayed connections open now
    connections_total: int  # relayed connections since the group opened
    refused: int  # handshakes for this group refused here


class _Refused(Exception):
    """A handshake this agent will not relay; str() is the reason the caller is told."""

    def __init__(self, reason: str, group: _Group | None = None) -> None:
        super().__init__(reason)
        self.group = group


@dataclass(eq=False)
class _Group:
    id: str
    rank: int
    rank_port: int
    members: dict[int, Member]
    ips: dict[int, frozenset[str]]  # each member's address host, resolved
    source: str | None  # our own address's IP: dialled connections come from it
    servers: list[asyncio.Server] = field(default_factory=list)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    closed: bool = False
    sent: int = 0
    received: int = 0
    connections: int = 0
    connections_total: int = 0
    refused: int = 0

    def count_sent(self, n: int) -> None:
        self.sent += n

    def count_received(self, n: int) -> None:
        self.received += n


class RankLink:
    """One per agent: a mutual-TLS server that peers' agents dial, and per group local relay
    ports. Use from the event loop; it owns every task and connection it makes (`close`)."""

    def __init__(
        self,
        server_tls: ssl.SSLContext,
        client_tls: ssl.SSLContext,
        node_id: str,
        host: str,
        port: int = 0,
    ) -> None:
        self._server_tls, self._client_tls = server_tls, client_tls
        self.node_id, self._host, self._port = node_id, host, port
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._groups: dict[str, _Group] = {}
        self._opened = asyncio.Condition()  # notified by open_group: handshakes may wait for it
        self._tasks: set[asyncio.Task[Any]] = set()  # server-side connections
        self.refused = 0  # handshakes refused since start (any group, TLS failures included)

    async def start(self) -> int:
        """Listen for peers' agents; the port (port 0 picks one)."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        self._sock = socket.create_server((self._host, self._port), family=family, backlog=BACKLOG)
        self._sock.setblocking(False)
        self._accepting = asyncio.create_task(self._accept(self._sock))
        port: int = self._sock.getsockname()[1]
        logger.info("rank link on %s:%d", self._host, port)
        return port

    async def close(self) -> None:
        """Stop listening and end every group and connection."""
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
        for group_id in list(self._groups):
            await self.close_group(group_id)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def open_group(
        self, group_id: str, rank: int, members: Sequence[Member], rank_port: int
    ) -> dict[int, int]:
        """Open a relay port on 127.0.0.1 for each other member; {their rank: port}. `rank` is
        this node's, `rank_port` where its rank process listens on 127.0.0.1. ValueError for a
        group already open or members that do not hold `rank`; OSError when a member's
        address does not resolve."""
        by_rank = {m.rank: m for m in members}
        if group_id in self._groups:
            raise ValueError(f"group {group_id!r} is already open")
        if len(by_rank) != len(members) or rank not in by_rank:
            raise ValueError(f"group {group_id!r}: ranks {[m.rank for m in members]} for {rank}")
        ips = {r: await _resolve(m.address) for r, m in by_rank.items()}
        own = sorted(ips[rank])
        source = own[0] if own and not ipaddress.ip_address(own[0]).is_unspecified else None
        group = _Group(group_id, rank, rank_port, by_rank, ips, source)
        ports = {}
        try:
            for other in sorted(r for r in by_rank if r != rank):
                relay = functools.partial(self._accepted, group, by_rank[other])
                server = await asyncio.start_server(relay, LOOPBACK, 0, limit=READ_BYTES)
                group.servers.append(server)
                ports[other] = server.sockets[0].getsockname()[1]
        except OSError:
            for server in group.servers:
                server.close()
            raise
        self._groups[group_id] = group
        async with self._opened:
            self._opened.notify_all()
        logger.info("group %s open: rank %d, relay ports %s", group_id, rank, ports)
        return ports

    async def close_group(self, group_id: str) -> None:
        """Close the group's relay ports and every relayed connection at once: both ranks see
        them end. A group not open is a no-op."""
        group = self._groups.pop(group_id, None)
        if group is None:
            return
        group.closed = True
        for server in group.servers:
            server.close()
        for writer in list(group.writers):
            writer.transport.abort()  # not a graceful close: a blocked rank must see it now
        for task in list(group.tasks):
            task.cancel()
        await asyncio.gather(*group.tasks, return_exceptions=True)
        logger.info(
            "group %s closed (sent %d bytes, received %d)", group_id, group.sent, group.received
        )

    def stats(self, group_id: str) -> LinkStats:
        """The group's counters now; KeyError for a group not open."""
        g = self._groups[group_id]
        return LinkStats(g.sent, g.received, g.connections, g.connections_total, g.refused)

    # --- the server: peers' agents dial in --------------------------------------------------

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(sock)
            except OSError as exc:  # out of descriptors, say: the next accept may do
                logger.warning("rank link: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._serve(conn, _ip(address[0])))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket, ip: str) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_BYTES)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                sock,
                ssl=self._server_tls,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as exc:  # the loop closed the socket
            self._refuse(_Refused(f"TLS handshake failed: {_reason(exc)}"), ip, "")
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            await self._answer(reader, writer, ip)
        except BaseException:  # cancelled (close): no goodbye owed
            writer.transport.abort()
            raise

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip: str
    ) -> None:
        """Check the handshake; refuse it, or connect to our rank and splice."""
        cn = common_name(writer.get_extra_info("peercert"))
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                hello = _parse(await reader.readline())
            deadline = asyncio.get_running_loop().time() + STARTUP_WAIT_S
            group = await self._admit(hello, ip, cn, deadline)
        except _Refused as refusal:
            self._refuse(refusal, ip, cn)
            await _reply(writer, {"error": str(refusal)})
            writer.close()
            return
        except (OSError, TimeoutError, ValueError) as exc:
            self._refuse(_Refused(f"no handshake: {_reason(exc)}"), ip, cn)
            writer.close()
            return
        self._join(group, writer)
        try:
            rank = await _connect_rank(group.rank_port, deadline)
        except (OSError, TimeoutError) as exc:
            why = f"rank {group.rank} does not listen on port {group.rank_port}: {_reason(exc)}"
            logger.warning("group %s: not relaying %s (%s): %s", group.id, cn, ip, why)
            await _reply(writer, {"error": why})
            self._leave(group, writer)
            return
        await _reply(writer, {"ok": True})
        await self._splice(group, rank, (reader, writer))

    async def _admit(self, hello: dict[str, Any], ip: str, cn: str, deadline: float) -> _Group:
        """The group a handshake is for, once it passes every check; _Refused if not. A group
        not open yet is waited for until `deadline` (the loop's clock)."""
        group_id, src, dst = hello.get("group"), hello.get("from"), hello.get("to")
        if not isinstance(group_id, str) or not isinstance(src, int) or not isinstance(dst, int):
            raise _Refused("the handshake needs group (a string), from and to (ranks)")
        try:
            async with self._opened, asyncio.timeout_at(deadline):
                await self._opened.wait_for(lambda: group_id in self._groups)
        except TimeoutError:
            raise _Refused(f"group {group_id!r} is not open on {self.node_id}") from None
        group = self._groups[group_id]
        member = group.members.get(src)
        if dst != group.rank:
            raise _Refused(f"{self.node_id} runs rank {group.rank} of {group_id}, not {dst}", group)
        if member is None or src == group.rank:
            raise _Refused(f"rank {src} is not another member of {group_id}", group)
        if cn != member.node_id:
            raise _Refused(f"rank {src} is {member.node_id}, the certificate is {cn!r}", group)
        if ip not in group.ips[src]:
            raise _Refused(f"rank {src} is at {member.address}, this comes from {ip}", group)
        return group

    def _refuse(self, refusal: _Refused, ip: str, cn: str) -> None:
        self.refused += 1
        if refusal.group is not None:
            refusal.group.refused += 1
        logger.warning("rank link: refused %s (%s): %s", cn or "a caller", ip, refusal)

    # --- the relay ports: our rank dials out -----------------------------------------------

    def _accepted(
        self,
        group: _Group,
        member: Member,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Our rank connected to the relay port for `member`. A task of our own relays it, not
        start_server's, which must not be cancelled (Python 3.11 logs that as an error)."""
        _nodelay(writer)
        if group.closed:  # accepted as the group closed
            writer.transport.abort()
            return
        group.writers.add(writer)
        task = asyncio.create_task(self._relay(group, member, (reader, writer)))
        group.tasks.add(task)
        task.add_done_callback(group.tasks.discard)

    async def _relay(self, group: _Group, member: Member, local: Streams) -> None:
        """Dial `member`'s agent, handshake, splice."""
        try:
            remote = await self._dial(group, member)
        except (OSError, TimeoutError, _Refused) as exc:
            logger.warning(
                "group %s: no link to rank %d (%s at %s): %s",
                *(group.id, member.rank, member.node_id, member.address, _reason(exc)),
            )
            self._leave(group, local[1])
            return
        await self._splice(group, local, remote)

    async def _dial(self, group: _Group, member: Member) -> Streams:
        """A TLS connection to `member`'s agent that accepted our handshake."""
        tls_open = functools.partial(
            asyncio.open_connection,
            *_split(member.address),
            ssl=self._client_tls,
            server_hostname=member.node_id if self._client_tls.check_hostname else None,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
            limit=READ_BYTES,
        )
        source = group.source
        async with asyncio.timeout(CONNECT_TIMEOUT_S + HANDSHAKE_TIMEOUT_S):
            # The server checks where we come from: leave from our own address when it is
            # ours (a node on Wi-Fi and Ethernet could otherwise leave by the other one).
            try:
                reader, writer = await tls_open(local_addr=(source, 0) if source else None)
            except OSError as exc:
                if source is None or exc.errno != errno.EADDRNOTAVAIL:
                    raise
                reader, writer = await tls_open()
        _nodelay(writer)
        group.writers.add(writer)
        cn = common_name(writer.get_extra_info("peercert"))
        if cn != member.node_id:
            self._leave(group, writer)
            raise _Refused(f"its certificate is for {cn!r}, not {member.node_id!r}")
        hello = {"group": group.id, "from": group.rank, "to": member.rank}
        writer.write(json.dumps(hello).encode() + b"\n")
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S + STARTUP_WAIT_S):
                reply = _parse(await reader.readline())
        except (ValueError, TimeoutError) as exc:
            self._leave(group, writer)
            raise _Refused(f"no answer to the handshake: {_reason(exc)}") from None
        if reply.get("ok") is not True:
            self._leave(group, writer)
            raise _Refused(f"refused: {str(reply.get('error'))[:HANDSHAKE_MAX_BYTES]}")
        return reader, writer

    # --- both sides --------------------------------------------------------------------------

    def _join(self, group: _Group, writer: asyncio.StreamWriter) -> None:
        """The connection and the task serving it are the group's: close_group ends them."""
        group.writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            group.tasks.add(task)
            task.add_done_callback(group.tasks.discard)

    def _leave(self, group: _Group, writer: asyncio.StreamWriter) -> None:
        group.writers.discard(writer)
        writer.close()

    async def _splice(self, group: _Group, local: Streams, remote: Streams) -> None:
        """Copy both ways until either end closes or fails, then close both (what is written
        is still sent)."""
        group.connections += 1
        group.connections_total += 1
        pumps = {
            asyncio.create_task(_pump(local[0], remote[1], group.count_sent)),
            asyncio.create_task(_pump(remote[0], local[1], group.count_received)),
        }
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            group.connections -= 1
            for task in pumps:
                task.cancel()
            for writer in (local[1], remote[1]):
                self._leave(group, writer)
            await asyncio.gather(*pumps, return_exceptions=True)


async def _pump(
    src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: Callable[[int], None]
) -> None:
    """Copy until `src` ends or either side fails. The bytes are opaque (prompts,
    activations): never logged."""
    with contextlib.suppress(OSError):  # reset, TLS error: the connection is over either way
        while data := await src.read(READ_BYTES):
            dst.write(data)
            count(len(data))
            await dst.drain()


async def _connect_rank(port: int, deadline: float) -> Streams:
    """Our rank's port, tried until `deadline` (the loop's clock): it may not listen yet."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            reader, writer = await asyncio.open_connection(LOOPBACK, port, limit=READ_BYTES)
        except ConnectionRefusedError:
            if loop.time() + RANK_RETRY_S > deadline:
                raise
            await asyncio.sleep(RANK_RETRY_S)
            continue
        _nodelay(writer)
        return reader, writer


async def _reply(writer: asyncio.StreamWriter, body: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        writer.write(json.dumps(body).encode() + b"\n")
        await writer.drain()


def _parse(line: bytes) -> dict[str, Any]:
    """One handshake line as a JSON object; ValueError for anything else."""
    if not line:
        raise ValueError("the connection ended")
    if not line.endswith(b"\n") or len(line) > HANDSHAKE_MAX_BYTES:
        raise ValueError(f"not one line of at most {HANDSHAKE_MAX_BYTES} bytes")
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _nodelay(writer: asyncio.StreamWriter) -> None:
    """Small messages leave at once (decode steps wait on them)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _split(address: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port"; ValueError for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


async def _resolve(address: str) -> frozenset[str]:
    """The IP addresses an address's host stands for."""
    host, port = _split(address)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return frozenset(_ip(str(info[4][0])) for info in infos)


def _ip(text: str) -> str:
    """An IP address as one spelling: IPv4-mapped IPv6 as IPv4, no scope."""
    ip = ipaddress.ip_address(text.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _reason(exc: BaseException) -> str:
    """An error in a few words, for one log line (never a payload)."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return str(exc) or type(exc).__name__
