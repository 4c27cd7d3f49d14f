"""Copies a model's files from the fleet nodes that hold them, verified and resumable.

`copy_files(manifest, holders, dest, ...)` fills the staging folder `dest` with every file of
the manifest, each checked against its SHA-256, fetched over the fleet's mutual TLS from the
holders' file servers (node_agent/file_server.py).

- Files are cut into CHUNK_BYTES spans in one queue. Each holder gets CONNECTIONS_PER_HOLDER
  connections, each a thread that takes the next span it may fetch, GETs it by HTTP Range and
  writes it at its offset into the file's `.part`: a fast holder takes more spans; a failing
  one backs off, its unfinished span back in the queue from the byte where it stopped.
- Every written MiB is recorded at once and the record (node_agent/copy_record.py) saved every
  SAVE_EVERY_S and when the call ends, so a link that comes back, or a later call, continues
  at the exact byte. A connection silent for `stall_s` is dropped and retried; no byte from
  anyone for `give_up_s` raises CopyFailed.
- A file is hashed while it arrives; one that does not match is discarded and fetched whole
  again from one holder at a time (one that did not serve it first). A holder whose whole
  file was bad is out for that file; when none is left, CopyFailed names them.
- A holder must show a certificate from the fleet CA whose CN is its node id (checked after
  the handshake: holders are dialled by IP address), or it is refused for the whole copy.

Why threads with blocking sockets, not the agent's event loop: OpenSSL reads the socket itself
and a gigabyte of TLS records never passes through the loop that carries the agent's control
stream and heartbeats; measured as fast as uvloop streams and faster than aiohttp.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mlxfleet.manifest import Manifest
from node_agent import copy_record
from node_agent.copy_record import RECORD_FILE, StagedFile
from node_agent.file_server import common_name

logger = logging.getLogger(__name__)

MIB = 1 << 20
CHUNK_BYTES = 32 * MIB  # one Range request: holders share a file's work at this grain
CONNECTIONS_PER_HOLDER = 2
READ_BYTES = MIB  # one read from the socket, one write to the file, one progress step
TICK_S = 0.2  # the driver: progress samples, hashing, checks
SAVE_EVERY_S = 1.0  # the resume record
CONNECT_TIMEOUT_S = 5.0
BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0)  # after 1, 2, ... failures in a row of one connection
HEAD_MAX_BYTES = 64 * 1024  # a response's status line and headers
IDLE_WAIT_S = 0.2  # a connection with no span it may take looks again after this
RATE_WINDOW_S = 5.0


@dataclass(frozen=True, slots=True)
class Holder:
    node_id: str  # the CN the holder's certificate must carry
    url: str  # "https://10.0.0.2:40123"


@dataclass
class CopyProgress:
    """Updated live by copy_files (from its threads: plain int updates), read by heartbeats."""

    bytes_total: int = 0
    bytes_done: int = 0  # verified-or-written bytes towards the manifest's total
    bytes_fetched: int = 0  # bytes received over the wire in total, refetches included
    from_nodes: list[str] = field(default_factory=list)
    _samples: collections.deque[tuple[float, int]] = field(
        default_factory=lambda: collections.deque(maxlen=64), init=False, repr=False
    )

    def note(self) -> None:
        """Record a rate sample (copy_files does, every TICK_S)."""
        self._samples.append((time.monotonic(), self.bytes_fetched))

    def rate(self) -> float:
        """Bytes/s received over the last RATE_WINDOW_S; 0 when nothing moves."""
        now = time.monotonic()
        recent = [s for s in self._samples if s[0] >= now - RATE_WINDOW_S]
        if len(recent) < 2:
            return 0.0
        return (recent[-1][1] - recent[0][1]) / max(now - recent[0][0], TICK_S)


class CopyFailed(Exception):
    """The files could not be copied; str() says which files and holders, in one line."""


class _Refused(Exception):
    """The holder is not a fleet member, or not the node it should be: out for the copy."""


class _NotServed(Exception):
    """The holder will not give this file (404, 409, wrong range): out for this file."""


def client_context(cert: Path, key: Path, ca_pem: bytes) -> ssl.SSLContext:
    """TLS for fetching: our node certificate; the holder's must chain to the fleet CA (its
    CN, the node id, is checked after the handshake: holders are reached by address)."""
    tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem.decode())
    tls.check_hostname = False
    tls.load_cert_chain(cert, key)
    return tls


@dataclass(eq=False)
class _Span:
    file: StagedFile
    at: int  # the next byte to fetch; advances as bytes are written
    end: int


@dataclass(eq=False)
class _Peer:
    id: str  # the holder's node id
    url: str
    host: str
    port: int
    refused: str = ""  # why it is out for the whole copy
    last_error: str = ""


class _Copy:
    """One copy_files call. Worker threads and the driver (on the event loop) share the
    files, the queue and the progress; every change to them happens under `lock`."""

    def __init__(
        self, manifest: Manifest, holders: Sequence[Holder], dest: Path, tls: ssl.SSLContext
    ) -> None:
        self.manifest, self.dest, self.tls = manifest, dest, tls
        self.progress, self.stall_s = CopyProgress(), 10.0
        self.peers = [_peer(h) for h in holders]
        self.loop = asyncio.get_running_loop()
        self.file_done = asyncio.Event()  # set from a worker: a file has all its bytes
        self.files: list[StagedFile] = []
        self.queue: collections.deque[_Span] = collections.deque()
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)
        self.stop = threading.Event()
        self.sockets: set[socket.socket] = set()
        self.last_progress = time.monotonic()

    def prepare(self) -> None:
        """Take what the staging folder holds already, queue the rest (in a thread)."""
        self.files = copy_record.load(self.dest, self.manifest)
        for f in self.files:
            for start, end in [] if f.verified else f.gaps():
                self.queue.extend(_spans(f, start, end))
        self.last_progress = time.monotonic()  # hashing what was there is no silence
        self.progress.bytes_total = self.manifest.total_bytes
        self.progress.bytes_done = sum(f.done_bytes() for f in self.files)

    def save(self) -> None:
        copy_record.save(self.dest, self.manifest, self.files, self.lock)

    # --- worker threads ------------------------------------------------------------------

    def work(self, peer: _Peer) -> None:
        """One connection to `peer`: fetch spans until the copy ends or the peer is refused."""
        sock: ssl.SSLSocket | None = None
        failures = 0
        buf = memoryview(bytearray(READ_BYTES))
        while not self.stop.is_set() and not peer.refused:
            span = self._take(peer)
            if span is None:
                continue
            try:
                if sock is None:
                    sock = self._connect(peer)
                self._fetch(sock, peer, span, buf)
                failures = 0
                continue
            except _Refused as exc:
                self._refuse(peer, str(exc))
            except _NotServed as exc:
                self._exclude(peer, span.file, str(exc))
            except (OSError, ValueError) as exc:  # reset, timed out (stall_s), TLS, garbled
                if not self.stop.is_set():
                    peer.last_error = " ".join(str(exc).split())[:200] or type(exc).__name__
                    logger.info("%s: %s; retrying", peer.id, peer.last_error)
                    failures += 1
            finally:
                if span.at < span.end:
                    self._give_back(span)
            if sock is not None:
                self._close(sock)
                sock = None
            self.stop.wait(BACKOFF_S[min(failures, len(BACKOFF_S)) - 1] if failures else 0)
        if sock is not None:
            self._close(sock)

    def _take(self, peer: _Peer) -> _Span | None:
        with self.wakeup:
            for i, span in enumerate(self.queue):
                f = span.file
                if peer.id not in f.bad and f.only in (None, peer.id):
                    del self.queue[i]
                    return span
            self.wakeup.wait(IDLE_WAIT_S)
            return None

    def _give_back(self, span: _Span) -> None:
        with self.wakeup:
            self.queue.appendleft(span)  # first: it is what holds up that file
            self.wakeup.notify_all()

    def _connect(self, peer: _Peer) -> ssl.SSLSocket:
        raw = socket.create_connection((peer.host, peer.port), min(self.stall_s, CONNECT_TIMEOUT_S))
        raw.settimeout(self.stall_s)  # every read: no byte for stall_s is a failure
        with self.lock:
            self.sockets.add(raw)  # so that shut() can end a hanging handshake
        name = peer.id if self.tls.check_hostname else None
        try:
            sock = self.tls.wrap_socket(raw, server_hostname=name)
        except ssl.SSLCertVerificationError as exc:
            raise _Refused(f"not a fleet member ({exc.verify_message})") from None
        except ssl.SSLError as exc:
            if "ALERT" in (exc.reason or ""):  # it refused our certificate
                raise _Refused(f"refused our certificate ({exc.reason})") from None
            raise
        finally:
            self._close(raw)  # a no-op once wrapped: the TLS socket took its descriptor
        with self.lock:
            self.sockets.add(sock)
        if self.stop.is_set():
            self._close(sock)
            raise ConnectionAbortedError("the copy is over")
        cn = common_name(sock.getpeercert())
        if cn != peer.id:
            self._close(sock)
            raise _Refused(f"its certificate is for {cn!r}, not {peer.id!r}")
        return sock

    def _fetch(self, sock: ssl.SSLSocket, peer: _Peer, span: _Span, buf: memoryview) -> None:
        """GET the span by Range and write it at its offset, a READ_BYTES piece at a time."""
        entry = span.file.entry
        path = urllib.parse.quote(entry.path)
        sock.sendall(
            f"GET /v1/models/{self.manifest.digest}/files/{path} HTTP/1.1\r\n"
            f"Host: {peer.host}\r\nRange: bytes={span.at}-{span.end - 1}\r\n\r\n".encode()
        )
        status, headers, filled = _read_head(sock, buf)
        length = int(headers.get("content-length", "-1"))
        if status != 206:
            size = min(max(length, 0), HEAD_MAX_BYTES)
            _read_exactly(sock, buf, filled, size)
            detail = _error_message(bytes(buf[:size]))
            if 400 <= status < 500:
                raise _NotServed(f"{status} {detail}")
            raise ConnectionError(f"{status} {detail}")
        want = f"bytes {span.at}-{span.end - 1}/{entry.size}"
        got = headers.get("content-range")
        if got != want or length != span.end - span.at or filled > length:
            raise _NotServed(f"answered {got!r} ({length} bytes) for {want!r}")
        fd = os.open(span.file.part, os.O_WRONLY)
        try:
            while span.at < span.end:
                piece = min(len(buf), span.end - span.at)
                _read_exactly(sock, buf, filled, piece)
                filled = 0
                if self.stop.is_set():  # copy_files has returned: the folder is not ours
                    raise ConnectionAbortedError("the copy is over")
                os.pwrite(fd, buf[:piece], span.at)
                self._wrote(peer, span, piece)
        finally:
            os.close(fd)

    def _wrote(self, peer: _Peer, span: _Span, n: int) -> None:
        with self.lock:
            span.file.add(span.at, span.at + n)
            span.at += n
            span.file.served_by.add(peer.id)
            self.progress.bytes_done += n
            self.progress.bytes_fetched += n
            if peer.id not in self.progress.from_nodes:
                self.progress.from_nodes.append(peer.id)
            self.last_progress = time.monotonic()
            if span.file.complete():  # hash it now, not at the next tick
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                    self.loop.call_soon_threadsafe(self.file_done.set)

    def _refuse(self, peer: _Peer, why: str) -> None:
        logger.warning("refusing holder %s (%s): %s", peer.id, peer.url, why)
        peer.refused = peer.last_error = why
        with self.wakeup:
            self.wakeup.notify_all()

    def _exclude(self, peer: _Peer, f: StagedFile, why: str) -> None:
        logger.warning("%s will not serve %s: %s", peer.id, f.entry.path, why)
        with self.wakeup:
            f.bad[peer.id] = why
            if f.only == peer.id:
                f.only = self._next_holder(f)
            self.wakeup.notify_all()

    def _close(self, sock: socket.socket) -> None:
        with self.lock:
            self.sockets.discard(sock)
        sock.close()

    # --- the driver ----------------------------------------------------------------------

    def check_complete(self) -> None:
        """Keep each complete, fully hashed file that matches; queue the others again."""
        for f in self.files:
            if f.verified or (matches := f.matches()) is None:
                continue
            if matches:
                f.keep()
                continue
            with self.wakeup:
                self._mismatch(f)
                self.wakeup.notify_all()

    def _mismatch(self, f: StagedFile) -> None:
        attempt = sorted(f.served_by)
        logger.warning("%s: hash mismatch (bytes from %s)", f.entry.path, ", ".join(attempt))
        if len(attempt) == 1:
            f.bad[attempt[0]] = "hash mismatch"
        f.refetches += 1
        if f.refetches > len(self.peers):  # every holder had its turn alone
            for node in attempt:
                f.bad.setdefault(node, "hash mismatch")
        self.progress.bytes_done -= f.entry.size
        f.discard()
        f.only = self._next_holder(f, avoid=set(attempt))
        self.queue.extendleft(reversed(_spans(f, 0, f.entry.size)))

    def _next_holder(self, f: StagedFile, avoid: set[str] | None = None) -> str | None:
        usable = [p.id for p in self.peers if not p.refused and p.id not in f.bad]
        fresh = [n for n in usable if n not in (avoid or set())]
        return next(iter(fresh or usable), None)

    def failure(self) -> str | None:
        """Why the copy cannot finish with the holders left, or None while it can."""
        if all(p.refused for p in self.peers):
            return "no holder usable: " + "; ".join(f"{p.id}: {p.refused}" for p in self.peers)
        stuck = []
        with self.lock:
            for f in self.files:
                if f.verified:
                    continue
                if any(p.refused for p in self.peers if p.id == f.only):
                    f.only = self._next_holder(f)
                    self.wakeup.notify_all()
                if not f.verified and all(p.refused or p.id in f.bad for p in self.peers):
                    stuck.append(f"{f.entry.path}: {_reasons(f, self.peers)}")
        if not stuck:
            return None
        more = f" (and {len(stuck) - 3} more files)" if len(stuck) > 3 else ""
        return "; ".join(stuck[:3]) + more

    def shut(self) -> None:
        """End the workers: they see `stop`, and blocked reads return at once."""
        self.stop.set()
        with self.wakeup:
            self.wakeup.notify_all()
            sockets = list(self.sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):  # not SSLSocket's shutdown: no TLS state
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _peer(holder: Holder) -> _Peer:
    url = urllib.parse.urlsplit(holder.url)
    if url.scheme != "https" or not url.hostname or url.port is None:
        raise CopyFailed(f"holder {holder.node_id}: {holder.url!r} is not https://host:port")
    return _Peer(holder.node_id, holder.url, url.hostname, url.port)


def _spans(f: StagedFile, start: int, end: int) -> list[_Span]:
    return [_Span(f, a, min(a + CHUNK_BYTES, end)) for a in range(start, end, CHUNK_BYTES)]


def _reasons(f: StagedFile, peers: list[_Peer]) -> str:
    """`hash mismatch from node-a, node-b`, or each holder's own reason."""
    why = {p.id: p.refused or f.bad.get(p.id, "") for p in peers}
    if len(set(why.values())) == 1:
        return f"{next(iter(why.values()))} from {', '.join(why)}"
    return ", ".join(f"{node}: {reason}" for node, reason in why.items())


def _read_head(sock: ssl.SSLSocket, buf: memoryview) -> tuple[int, dict[str, str], int]:
    """Read a response's status line and headers into `buf`: (status, headers by lower-case
    name, how many body bytes came with them, moved to the start of `buf`)."""
    filled = 0
    while (end := bytes(buf[:filled]).find(b"\r\n\r\n")) < 0:
        if filled >= HEAD_MAX_BYTES:
            raise ConnectionError("the response head is too long")
        n = sock.recv_into(buf[filled:HEAD_MAX_BYTES])
        if n == 0:
            raise ConnectionError("the connection closed before a response")
        filled += n
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise ConnectionError(f"not an HTTP response: {lines[0][:80]!r}") from None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = filled - end - 4
    buf[:body] = buf[end + 4 : filled]
    return status, headers, body


def _read_exactly(sock: ssl.SSLSocket, buf: memoryview, filled: int, size: int) -> None:
    """Fill `buf` up to `size` bytes (the first `filled` are there already)."""
    while filled < size:
        n = sock.recv_into(buf[filled:size])
        if n == 0:
            raise ConnectionError(f"the connection closed {size - filled} bytes short")
        filled += n


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")


async def copy_files(
    manifest: Manifest,
    holders: Sequence[Holder],
    dest: Path,
    ssl_context: ssl.SSLContext,
    progress: CopyProgress | None = None,
    *,
    stall_s: float = 10.0,
    give_up_s: float = 120.0,
) -> None:
    """Fill `dest` with the manifest's files, verified; resumes what an earlier call left.

    Raises CopyFailed when the holders cannot give every file (refused, bad bytes, no bytes
    for `give_up_s`). Cancelling it stops the transfers and keeps the bytes for a resume."""
    if not holders:
        raise CopyFailed("no holder to copy from")
    copy = _Copy(manifest, holders, dest, ssl_context)
    copy.progress, copy.stall_s = progress or copy.progress, stall_s
    await asyncio.to_thread(copy.prepare)
    threads = [
        threading.Thread(target=copy.work, args=(peer,), name=f"copy-{peer.id}", daemon=True)
        for peer in copy.peers
        for _ in range(CONNECTIONS_PER_HOLDER)
    ]
    for t in threads:
        t.start()
    saved_at = time.monotonic()
    try:
        while True:
            copy.progress.note()
            await asyncio.to_thread(copy_record.hash_written, copy.files, copy.lock)
            await asyncio.to_thread(copy.check_complete)
            if all(f.verified for f in copy.files):
                break
            why = copy.failure()
            if why is None and time.monotonic() - copy.last_progress > give_up_s:
                errors = "; ".join(f"{p.id}: {p.last_error or 'nothing yet'}" for p in copy.peers)
                why = f"no bytes from any holder for {give_up_s:g} s ({errors})"
            if why is not None:
                raise CopyFailed(why)
            if time.monotonic() - saved_at >= SAVE_EVERY_S:
                await asyncio.to_thread(copy.save)
                saved_at = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(copy.file_done.wait(), TICK_S)
            copy.file_done.clear()
    finally:
        copy.shut()
        await asyncio.to_thread(_join, threads, CONNECT_TIMEOUT_S + 1)
        copy.save()
    copy.progress.note()
    (dest / RECORD_FILE).unlink(missing_ok=True)  # every file is in place and verified


def _join(threads: list[threading.Thread], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
