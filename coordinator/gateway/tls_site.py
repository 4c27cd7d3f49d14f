"""The gateway's HTTPS port: its certificate, TLS for clients that speak it, and a clear
answer to plain HTTP.

A TLS server alone answers an `http://` request to its port by closing the connection, which
clients report as "server disconnected". This site peeks at each connection's first byte: a
TLS handshake goes on through TLS to aiohttp, anything else gets one OpenAI-shaped 400 that
names the https:// URL to use (what nginx does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from coordinator.errors import ConfigError
from coordinator.pki import FleetPki
from coordinator.tls import TlsConfig, host_name
from mlxfleet.mdns import local_ipv4_addresses
from mlxfleet.openai.responses import error_body

logger = logging.getLogger(__name__)

TLS_HANDSHAKE_RECORD = b"\x16"  # the first byte of every TLS connection
FIRST_BYTE_TIMEOUT_S = 30.0  # a connection that sends nothing this long is closed
HANDSHAKE_TIMEOUT_S = 30.0
PLAIN_READ_TIMEOUT_S = 5.0  # to read a plain request before answering it
PLAIN_BODY_MAX_BYTES = 1 << 20  # a plain request's body read before the answer (else: reset)
ACCEPT_RETRY_S = 0.1  # after accept failed (out of descriptors) before the next try
BACKLOG = 128
WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # listening on every address


def gateway_names(host: str, extra: Sequence[str]) -> tuple[str, ...]:
    """What clients may call the gateway: localhost and the loopback addresses, this host's
    name with its `.local` name (how Macs are reached on a LAN), the listen address (every
    IPv4 address of the host when it listens on all of them) and the configured extra names."""
    hostname = socket.gethostname()
    short = hostname.split(".")[0]
    names = ["localhost", "127.0.0.1", "::1", hostname, short, f"{short}.local", *extra]
    names += local_ipv4_addresses() if host in WILDCARD_HOSTS else [host]
    return tuple(sorted({n for n in map(host_name, names) if n is not None}))


def server_context(
    tls: TlsConfig, host: str, pki: FleetPki, home: Path
) -> tuple[ssl.SSLContext, Path] | None:
    """The gateway's TLS context and the certificate file it serves (None: plain HTTP);
    ConfigError, one line, for a certificate or key it cannot serve."""
    if tls.mode == "off":
        return None
    if tls.mode == "fleet-ca":
        cert, key = pki.gateway_certificate(home, gateway_names(host, tls.names))
    else:
        assert tls.cert is not None and tls.key is not None
        cert, key = tls.cert, tls.key
        check_pair(cert, key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS certificate {cert} with key {key}: {exc}") from None
    return context, cert


def check_pair(cert: Path, key: Path) -> None:
    """ConfigError naming the file that is missing, not PEM, an encrypted key, or a key that
    belongs to another certificate (OpenSSL's own errors name neither file)."""
    try:
        leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    except OSError as exc:
        raise ConfigError(f"TLS certificate {cert}: {exc.strerror or exc}") from None
    except ValueError:
        raise ConfigError(f"TLS certificate {cert}: not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"TLS key {key}: {exc.strerror or exc}") from None
    except TypeError:  # cryptography's word for "encrypted, and no password given"
        raise ConfigError(f"TLS key {key} is encrypted: give it unencrypted (mode 600)") from None
    except ValueError:
        raise ConfigError(f"TLS key {key}: not a PEM private key") from None
    if leaf.public_key() != private.public_key():
        raise ConfigError(f"TLS key {key} does not belong to certificate {cert}")


class TlsSite(web.BaseSite):
    """An aiohttp site on host:port (0: a free one, `port` says which) serving TLS with
    `context`. Use from the event loop; the runner stops it, and `stop` ends the connections
    still in their handshake (aiohttp owns the others)."""

    __slots__ = ("_host", "_port", "_sock", "_accepting", "_opening")

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, context: ssl.SSLContext
    ) -> None:
        super().__init__(runner, ssl_context=context, backlog=BACKLOG)
        self._host = host
        self._port = port
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._opening: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        return self._port if self._sock is None else int(self._sock.getsockname()[1])

    async def start(self) -> None:
        await super().start()
        family, _, _, _, address = socket.getaddrinfo(
            self._host or None, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self._sock = socket.create_server(address, family=family, backlog=BACKLOG)
        self._sock.setblocking(False)
        self._accepting = asyncio.create_task(self._accept(self._sock), name="gateway-accept")

    async def stop(self) -> None:
        tasks = [t for t in (self._accepting, *self._opening) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
        await super().stop()

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # out of descriptors, say: the open connections go on
                logger.warning("gateway: accept failed: %s", exc)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            conn.setblocking(False)
            task = asyncio.create_task(self._open(conn))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    async def _open(self, conn: socket.socket) -> None:
        """TLS on to aiohttp, or the plain-HTTP answer. Once a transport holds the socket,
        only the transport closes it."""
        try:
            first = await asyncio.wait_for(_peek(conn), FIRST_BYTE_TIMEOUT_S)
        except (OSError, TimeoutError):
            first = b""
        except asyncio.CancelledError:
            conn.close()
            raise
        if first == TLS_HANDSHAKE_RECORD:
            await self._handshake(conn)
        elif first:
            await _answer_plain_http(conn)
        else:
            conn.close()  # gone, or silent: nothing to answer

    async def _handshake(self, conn: socket.socket) -> None:
        server = self._runner.server
        assert server is not None
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                server, conn, ssl=self._ssl_context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:  # the client refused our certificate, say
            logger.debug("gateway: TLS handshake failed: %s", exc)


async def _peek(conn: socket.socket) -> bytes:
    """The connection's first byte, left unread: the TLS handshake still needs it."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(conn, ready)
    try:
        await readable
    finally:
        loop.remove_reader(conn)
    return conn.recv(1, socket.MSG_PEEK)


async def _answer_plain_http(conn: socket.socket) -> None:
    """Read a plain-HTTP request (all of it, so closing does not reset the answer away) and
    answer 400 with the https:// URL it should have used."""
    try:
        reader, writer = await asyncio.open_connection(sock=conn)
    except OSError:
        conn.close()
        return
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PLAIN_READ_TIMEOUT_S)
        lines = head.decode("latin-1").split("\r\n")
        fields = dict(
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        )
        length = int(fields.get("content-length") or 0)
        if 0 < length <= PLAIN_BODY_MAX_BYTES:
            await asyncio.wait_for(reader.readexactly(length), PLAIN_READ_TIMEOUT_S)
        target = lines[0].split(" ")[1] if lines[0].count(" ") == 2 else "/"
        url = f"https://{fields.get('host', 'this-host')}{target}"
        writer.write(_bad_request(f"this port serves HTTPS: use {url}"))
        await writer.drain()
    except (OSError, TimeoutError, ValueError, EOFError, asyncio.LimitOverrunError):
        pass  # not HTTP after all, or gone: nothing to answer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _bad_request(message: str) -> bytes:
    body = json.dumps(error_body(message, code="https_required")).encode()
    head = (
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body
