"""Serves this node's model files to fleet members, over the fleet's mutual TLS.

    python -m node_agent.file_server --index PATH --cert PATH --key PATH --ca PATH \
        --host H --port P [--rate-mib-s N] [--nice N]

prints one line, `port N`, on stdout once it listens, then answers

    GET /v1/models/{manifest digest}/files/{path}    (Range: bytes=a-b, a- or -n: 206)

with the bytes of a file listed in the index, a JSON file the agent's model store rewrites
atomically (re-read here when it changes):

    {"models": {"<digest>": {"folder": "/abs", "files": [["path", size, "sha256"], ...]}}}

Only fleet members get bytes: the TLS handshake requires a client certificate from the fleet CA.
Only listed files are served: the path is looked up in its manifest's list, never joined onto
the folder unchecked, so `../` and absolute paths are simply not found (404). A file whose size
on disk differs from the manifest is not served (409); its hash is the copier's to check.

Why a process of its own: copies must not slow the node's engines, so it runs at the lowest
CPU priority (nice 19, for its Linux autogroup too) and can cap its send rate (`--rate-mib-s`, a
token bucket shared by all connections), neither of which the agent's event loop could take.
Measured on a holder whose engine keeps its core busy (docs/benchmarks.md): at nice 10 serving
cost the engine 10-20 % of its decode speed, at nice 19 0-6 %, the copy then getting what the
engine leaves (~20 MB/s there); several holders share a copy, so a busy one serves less of it.
Why blocking threads and not aiohttp: OpenSSL then writes straight to the socket (1 MiB
`preadv` into one reused buffer, one `sendall` each), about 1.5x the throughput of an aiohttp
handler on one TLS connection when measured. One thread per connection; a copier opens
CONNECTIONS_PER_HOLDER (node_agent/peer_copy.py) per holder.

It exits on SIGTERM, and when the agent named by MLXFLEET_PARENT_PID is gone (polled every
second), so a crashed agent leaves no server behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import json
import logging
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node_agent import spawn

logger = logging.getLogger(__name__)

LISTENING_PREFIX = "port "  # the one stdout line: "port 40123"
PARENT_PID_ENV = "MLXFLEET_PARENT_PID"
PARENT_POLL_S = 1.0
NICE = 19  # the lowest: engines on this node get the CPU first (docs/benchmarks.md)
READ_BYTES = 1 << 20  # one disk read and one TLS write
CLIENT_TIMEOUT_S = 60.0  # a connection that sends or takes nothing for this long is closed
START_TIMEOUT_S = 30.0  # process start to "port N" (Python start-up and imports)
STOP_TIMEOUT_S = 5.0
SHUTDOWN_POLL_S = 0.1  # how often the accept loop looks for a stop
ROUTE = re.compile(r"^/v1/models/([0-9a-f]{64})/files/(.+)$")
RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True, slots=True)
class Listed:
    """A file the index lets us serve."""

    path: Path  # on disk
    size: int  # as the manifest says


class Index:
    """The index file, re-read when it changes (mtime, size or inode). Thread-safe."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._models: dict[str, tuple[Path, dict[str, int]]] = {}

    def lookup(self, digest: str, path: str) -> Listed | str:
        """The file to serve, or why there is none (a 404's message)."""
        models = self._current()
        model = models.get(digest)
        if model is None:
            return f"no model with manifest {digest} on this node"
        folder, sizes = model
        size = sizes.get(path)
        if size is None:
            return f"{path!r} is not in manifest {digest}"
        return Listed(folder / path, size)

    def _current(self) -> dict[str, tuple[Path, dict[str, int]]]:
        with self._lock:
            try:
                st = os.stat(self._path)
            except FileNotFoundError:
                self._stamp, self._models = None, {}
                return self._models
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp != self._stamp:
                try:
                    self._models = _parse_index(self._path.read_text())
                    self._stamp = stamp
                except (OSError, ValueError, TypeError, KeyError) as exc:
                    # Keep serving what we had: the store writes atomically, so this is rare.
                    logger.warning("cannot read the index %s: %s", self._path, exc)
            return self._models


def _parse_index(text: str) -> dict[str, tuple[Path, dict[str, int]]]:
    raw: Any = json.loads(text)
    models = {}
    for digest, model in raw["models"].items():
        files = {str(p): int(s) for p, s, _sha in model["files"]}
        models[str(digest)] = (Path(model["folder"]), files)
    return models


class RateLimit:
    """A token bucket of `rate` bytes/s shared by every connection; rate 0: no limit."""

    def __init__(self, rate_bytes_s: float) -> None:
        self.rate = rate_bytes_s
        self.burst = max(float(READ_BYTES), rate_bytes_s / 10)  # at most 0.1 s ahead
        self._tokens = self.burst
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        """Block until `n` bytes (at most one READ_BYTES) may be sent."""
        if self.rate <= 0:
            return
        with self._lock:  # one sender waits at a time: the others queue behind it, in order
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens < n:
                time.sleep((n - self._tokens) / self.rate)
                self._tokens, self._at = float(n), time.monotonic()
            self._tokens -= n


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a copier fetches many ranges per connection
    server: FileServer
    timeout = CLIENT_TIMEOUT_S

    def do_GET(self) -> None:  # noqa: N802 (BaseHTTPRequestHandler's naming)
        route = ROUTE.match(urllib.parse.urlsplit(self.path).path)
        if route is None:
            self._error(404, f"no such resource {self.path!r}", "not_found")
            return
        digest, path = route.group(1), urllib.parse.unquote(route.group(2))
        listed = self.server.index.lookup(digest, path)
        if isinstance(listed, str):
            self._error(404, listed, "not_found")
            return
        try:
            fd = os.open(listed.path, os.O_RDONLY)
        except OSError as exc:
            self._error(409, f"{path}: cannot open it here: {exc.strerror}", "file_unavailable")
            return
        try:
            self._send(fd, path, listed)
        finally:
            os.close(fd)

    def _send(self, fd: int, path: str, listed: Listed) -> None:
        size = os.fstat(fd).st_size
        if size != listed.size:
            message = f"{path}: {size} bytes on disk, the manifest says {listed.size}"
            logger.warning("not serving %s", message)
            self._error(409, message, "size_mismatch")
            return
        span = _range(self.headers.get("Range"), size)
        if span is None:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self._json_body({"error": _error_fields(f"unsatisfiable range for {path}", "range")})
            return
        start, end = span
        self.send_response(200 if self.headers.get("Range") is None else 206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if self.headers.get("Range") is not None:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        self.server.stream(self.connection, fd, start, end)
        logger.debug("sent %s bytes %d-%d to %s", path, start, end, self._peer())

    def _error(self, status: int, message: str, code: str) -> None:
        logger.info("%d for %s from %s: %s", status, self.path, self._peer(), message)
        self.send_response(status)
        self._json_body({"error": _error_fields(message, code)})

    def _json_body(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own errors (a bad request line, another method), as JSON."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self._error(code, message or explain or "bad request", "invalid_request")

    def _peer(self) -> str:
        cert = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else {}
        return common_name(cert) or str(self.client_address[0])

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        logger.debug(format, *args)


def _error_fields(message: str, code: str) -> dict[str, Any]:
    return {"message": message, "type": "invalid_request_error", "param": None, "code": code}


def _range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, end) for a Range header (one range only), the whole file without one; None
    when it cannot be satisfied."""
    if header is None:
        return 0, size
    match = RANGE.match(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # "bytes=-n": the last n bytes
        start, end = max(0, size - int(last)), size
    else:
        start = int(first)
        end = size if last == "" else min(size, int(last) + 1)
    return (start, end) if start < end else None


def common_name(cert: Any) -> str:
    """The subject CN of a peer certificate as ssl's getpeercert() gives it; "" if none."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


class FileServer(http.server.ThreadingHTTPServer):
    """A thread per connection; the TLS handshake happens in that thread, so a slow or
    hostile client cannot hold up the accept loop."""

    daemon_threads = True
    block_on_close = False

    def __init__(
        self, address: tuple[str, int], tls: ssl.SSLContext, index: Index, rate: RateLimit
    ) -> None:
        super().__init__(address, _Handler)
        self.tls, self.index, self.rate = tls, index, rate

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(CLIENT_TIMEOUT_S)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            logger.info("refused %s: %s", client_address[0], exc)
            return
        super().finish_request(conn, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A copier that went away mid-transfer (or a timeout): one line, no traceback."""
        logger.info("connection from %s ended: %s", client_address[0], sys.exc_info()[1])

    def stream(self, sock: socket.socket, fd: int, start: int, end: int) -> None:
        """Send bytes [start, end) of the file: 1 MiB reads into one buffer, paced by the
        rate limit."""
        buf = bytearray(READ_BYTES)
        view = memoryview(buf)
        at = start
        while at < end:
            want = min(READ_BYTES, end - at)
            self.rate.take(want)
            got = os.preadv(fd, [view[:want]], at)
            if got == 0:
                raise OSError(f"the file ended at byte {at}, {end} expected")
            sock.sendall(view[:got])
            at += got


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """TLS for the server: the node certificate; clients must show one from the fleet CA."""
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    tls.verify_mode = ssl.CERT_REQUIRED
    tls.load_cert_chain(cert, key)
    return tls


def _watch_parent(parent: int, stop: threading.Event) -> None:
    """Set `stop` once the agent that started us is gone."""
    under = os.getppid() == parent  # started by it directly (a wrapper would be in between)
    while not stop.wait(PARENT_POLL_S):
        if under and os.getppid() != parent:
            break
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            pass
    if not stop.is_set():
        logger.warning("parent process %d is gone: exiting", parent)
        stop.set()


def lower_priority(nice: int = NICE) -> None:
    """`nice`, and on Linux the same for our autogroup: with autogroups on (most distros), a
    process's nice only weighs against its own session's, and we run in a session of our own
    (spawn.start), so without it engines in other sessions would share the CPU with us evenly."""
    os.nice(nice)
    with contextlib.suppress(OSError):  # not Linux, or no autogroups
        Path("/proc/self/autogroup").write_text(str(nice))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve this node's model files to fleet members.")
    p.add_argument("--index", type=Path, required=True, help="the model store's index (JSON)")
    p.add_argument("--cert", type=Path, required=True, help="the node certificate")
    p.add_argument("--key", type=Path, required=True, help="its key")
    p.add_argument("--ca", type=Path, required=True, help="the fleet CA certificate (PEM)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--rate-mib-s", type=float, default=0.0, help="send rate cap; 0: none")
    p.add_argument("--nice", type=int, default=NICE, help="CPU priority (0..19, 19 the lowest)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s file-server %(message)s")
    lower_priority(args.nice)  # before any thread exists: Linux applies nice per thread
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _s, _f: stop.set())
    try:
        tls = server_context(args.cert, args.key, args.ca)
        server = FileServer(
            (args.host, args.port), tls, Index(args.index), RateLimit(args.rate_mib_s * 2**20)
        )
    except (OSError, ssl.SSLError) as exc:
        print(f"file server: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    port = server.server_address[1]
    print(f"{LISTENING_PREFIX}{port}", flush=True)
    cap = f"{args.rate_mib_s:g} MiB/s" if args.rate_mib_s > 0 else "no cap"
    logger.info("serving the files in %s on %s:%d (%s)", args.index, args.host, port, cap)
    threading.Thread(
        target=server.serve_forever, args=(SHUTDOWN_POLL_S,), name="accept", daemon=True
    ).start()
    parent = os.environ.get(PARENT_PID_ENV)
    if parent:
        threading.Thread(
            target=_watch_parent, args=(int(parent), stop), name="parent", daemon=True
        ).start()
    while not stop.wait(PARENT_POLL_S):  # a plain wait() would not wake for signal handlers
        pass
    server.shutdown()
    server.server_close()
    logger.info("stopped")
    return 0


class FileServerProcess:
    """The agent's handle on its file server process. Use from the event loop."""

    def __init__(self, process: spawn.EngineProcess, port: int) -> None:
        self._process = process
        self.port = port

    @classmethod
    async def start(
        cls,
        index: Path,
        cert: Path,
        key: Path,
        ca_pem_path: Path,
        host: str,
        port: int = 0,
        rate_mib_s: float = 0,
        log_path: Path | None = None,
    ) -> FileServerProcess:
        """Start the server and wait until it listens. RuntimeError (with its last log
        lines) when it exits first or says nothing in START_TIMEOUT_S; OSError when it
        cannot be started at all."""
        argv = [
            sys.executable,
            *("-m", "node_agent.file_server", "--index", str(index)),
            *("--cert", str(cert), "--key", str(key), "--ca", str(ca_pem_path)),
            *("--host", host, "--port", str(port), "--rate-mib-s", str(rate_mib_s)),
        ]
        env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}  # it exits if we die
        log = log_path.open("ab") if log_path is not None else None
        try:
            # posix_spawn, never fork(): gRPC's fork handlers could abort the child.
            process = await spawn.start(argv, env, log.fileno() if log else 2)  # else our stderr
        finally:
            if log is not None:
                log.close()
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_S)
        except TimeoutError:
            line = b""
        text = line.decode(errors="replace").strip()
        if not text.startswith(LISTENING_PREFIX):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            code = await process.wait()
            tail = _tail(log_path) if log_path is not None else ""
            raise RuntimeError(f"the file server did not start (exit {code}){tail}")
        return cls(process, int(text[len(LISTENING_PREFIX) :]))

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """None while it runs; 0 after a clean stop."""
        return self._process.returncode

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; returns once it has exited."""
        with contextlib.suppress(ProcessLookupError):
            self._process.terminate()
        try:
            await asyncio.wait_for(self._process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            await self._process.wait()


def _tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").strip().splitlines()[-3:]
        return ": " + " | ".join(lines) if lines else ""
    return ""


if __name__ == "__main__":
    sys.exit(main())
