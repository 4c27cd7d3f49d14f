"""The gateway's HTTPS port in-process, on both event loops the coordinator runs on: TLS to the
app, a clear 400 to plain HTTP, nothing left listening after the runner stops."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvloop
from aiohttp import web

from coordinator.gateway.tls_site import TlsSite
from coordinator.pki import FleetPki

LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,
}


async def ping(request: web.Request) -> web.Response:
    return web.json_response({"path": request.path, "bytes": len(await request.read())})


async def serve_and_call(home: Path) -> None:
    pki = FleetPki.load_or_create(home)
    cert, key = pki.gateway_certificate(home, ("127.0.0.1",))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    app = web.Application()
    app.router.add_route("*", "/v1/ping", ping)
    runner = web.AppRunner(app)
    await runner.setup()
    site = TlsSite(runner, "127.0.0.1", 0, context)
    await site.start()
    port = site.port
    trusted = ssl.create_default_context(cadata=pki.ca_cert_pem.decode())
    try:
        async with httpx.AsyncClient(verify=trusted) as client:
            for _ in range(3):  # one kept-alive connection
                reply = await client.get(f"https://127.0.0.1:{port}/v1/ping")
                assert reply.json() == {"path": "/v1/ping", "bytes": 0}
        with socket.create_connection(("127.0.0.1", port)):
            pass  # connected and gone without a byte: the site goes on
        async with httpx.AsyncClient() as plain:
            reply = await plain.post(f"http://127.0.0.1:{port}/v1/ping?x=1", json={"a": "b" * 5000})
        assert reply.status_code == 400
        assert reply.json() == {
            "error": {
                "message": f"this port serves HTTPS: use https://127.0.0.1:{port}/v1/ping?x=1",
                "type": "invalid_request_error",
                "param": None,
                "code": "https_required",
            }
        }
        assert reply.headers["connection"] == "close"
    finally:
        await runner.cleanup()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.parametrize("loop", LOOPS)
def test_tls_to_the_app_and_a_400_to_plain_http(tmp_path: Path, loop: str) -> None:
    LOOPS[loop](serve_and_call(tmp_path))
