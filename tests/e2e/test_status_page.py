"""The status page in a real browser: headless Chromium driven over the DevTools protocol.

Real processes on 127.0.0.1 (coordinator, agent, engine with the demo model), real streamed
requests through the gateway, and a real browser running the page's own script: the charts
must grow from what the gateway measured.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import REPO, start_coordinator, wait_for
from tests.coordinator.test_status_page import group_page
from tests.e2e.fleet import Fleet, model_toml, running_fleet

pytestmark = pytest.mark.e2e

MODEL = "demo"
CHART_TIMEOUT_S = 30.0  # a sample every 2 s, a poll every 2 s: a point shows within ~4 s
CHROMIUM = Path("/usr/bin/chromium")
CDP_TIMEOUT_S = 30.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VIEWPORT = {"width": 1280, "height": 1100}
# A mark, not a skip in the fixture: the module's fleet would start before a fixture could skip.
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no browser at {CHROMIUM} (Debian package chromium)"
)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Fleet]:
    config = model_toml(demo_model, MODEL, context_length=2048)
    with running_fleet(tmp_path_factory, config) as fleet:
        yield fleet


def devtools_port(profile: Path) -> str | None:
    """Chromium writes its real port (asked 0) on the first line of this file."""
    try:
        port, newline, _path = (profile / "DevToolsActivePort").read_text().partition("\n")
    except OSError:
        return None
    return port.strip() if newline else None  # a line still being written has no newline


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[int]:
    """Headless Chromium with a fresh profile; yields its DevTools port."""
    profile = tmp_path / "profile"
    log = (tmp_path / "chromium.log").open("wb")
    browser = subprocess.Popen(
        [
            str(CHROMIUM),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        try:
            port = int(wait_for(lambda: devtools_port(profile), 30, "Chromium's DevTools port"))
        except AssertionError:
            print("--- chromium log ---\n" + (tmp_path / "chromium.log").read_text()[-4000:])
            raise
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(browser.pid, signal.SIGKILL)
        browser.wait()
        log.close()
        shutil.rmtree(profile, ignore_errors=True)


@dataclass
class Page:
    """One browser tab over its DevTools websocket; page errors are kept for the test."""

    ws: aiohttp.ClientWebSocketResponse
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    errors: list[str] = field(default_factory=list)
    loads: int = 0  # Page.loadEventFired seen

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json(timeout=CDP_TIMEOUT_S)
            if message.get("id") == call_id:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]  # type: ignore[no-any-return]
            self._event(message)

    async def navigate(self, url: str) -> None:
        """Open `url` and wait for its load event (evaluating earlier may hit the old page)."""
        loads = self.loads
        result = await self.call("Page.navigate", url=url)
        assert "errorText" not in result, f"{url}: {result['errorText']}"
        while self.loads == loads:
            self._event(await self.ws.receive_json(timeout=CDP_TIMEOUT_S))

    def _event(self, message: dict[str, Any]) -> None:
        params = message.get("params", {})
        if message.get("method") == "Page.loadEventFired":
            self.loads += 1
        elif message.get("method") == "Runtime.exceptionThrown":
            self.errors.append(json.dumps(params["exceptionDetails"])[:1000])
        elif message.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(params["entry"]["text"])

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, f"{expression}: {result['exceptionDetails']}"
        return result["result"].get("value")

    async def wait(self, expression: str, timeout_s: float, what: str) -> Any:
        """Evaluate until the value is truthy (the page polls every 2 s), bounded."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.25)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def stream_chats(fleet: Fleet, count: int) -> int:
    """Streamed chats through the gateway (the TTFT histogram counts streams only)."""
    client = fleet.client()
    chunks = 0
    for i in range(count):
        for chunk in client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Tell me about Macs, part {i}"}],
            max_tokens=16,
            temperature=0,
            stream=True,
        ):
            chunks += bool(chunk.choices and chunk.choices[0].delta.content)
    return chunks


@contextlib.asynccontextmanager
async def open_page(devtools_port: int, url: str) -> AsyncIterator[Page]:
    """A new tab showing `url`, once the page has rendered its first /ui/status."""
    async with aiohttp.ClientSession() as session:
        async with session.put(f"http://127.0.0.1:{devtools_port}/json/new?about:blank") as r:
            target = await r.json()
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            for domain in ("Runtime", "Log", "Page"):
                await page.call(f"{domain}.enable")
            await page.call(
                "Emulation.setDeviceMetricsOverride", **VIEWPORT, deviceScaleFactor=1, mobile=False
            )
            await page.navigate(url)
            await page.wait("document.getElementById('updated').dataset.time", 15, "a render")
            yield page


def table(name: str) -> str:
    return f"document.getElementById('{name}').tBodies[0].innerText"


def chart(name: str, attribute: str) -> str:
    return f"Number(document.getElementById('chart-{name}').dataset.{attribute})"


@needs_chromium
async def test_status_page_shows_the_fleet_and_charts_live_requests(
    chromium: int, fleet: Fleet
) -> None:
    node_id = fleet.node_id(fleet.agent)
    async with open_page(chromium, f"{fleet.base}/ui") as page:
        nodes = await page.evaluate(table("nodes"))
        assert node_id in nodes and "live" in nodes
        models = await page.evaluate(table("models"))
        assert MODEL in models and "ready" in models and "interactive" in models
        tiers = await page.evaluate(table("tiers"))
        assert "interactive" in tiers and "batch" in tiers
        assert await page.evaluate("document.getElementById('conn').textContent") == "live"
        before = await page.evaluate(chart("ttft", "points"))

        assert await asyncio.to_thread(stream_chats, fleet, 6) > 0
        grown = f"{chart('ttft', 'points')} > {before} && {chart('tps', 'max')} > 0"
        await page.wait(grown, CHART_TIMEOUT_S, "the charts to show the streamed requests")
        after = await page.evaluate(chart("ttft", "points"))
        assert after > before
        assert await page.evaluate(chart("tps", "points")) > 0
        assert await page.evaluate(chart("ttft", "max")) > 0

        shot = await page.call("Page.captureScreenshot", format="png")
        assert page.errors == []

    png = base64.b64decode(shot["data"])
    assert png.startswith(PNG_SIGNATURE) and len(png) > 20_000
    path = REPO / "artifacts" / "status_page.png"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(png)
    print(f"status page screenshot: {path} ({len(png)} bytes, {after} TTFT points)")


@needs_chromium
async def test_status_page_of_a_fleet_without_nodes_says_why_nothing_runs(
    chromium: int, tmp_path: Path, demo_model: Path
) -> None:
    """A coordinator alone (no agent): the empty states render, without a script error."""
    config = tmp_path / "fleet.toml"
    config.write_text(f'[[models]]\nname = "{MODEL}"\nsource = "{demo_model}"\n')
    coordinator, runtime = start_coordinator(tmp_path, config, tmp_path / "coordinator.log")
    try:
        url = f"http://127.0.0.1:{runtime['gateway_port']}/ui"
        async with open_page(chromium, url) as page:
            assert await page.evaluate(table("nodes")) == "no node has connected yet"
            assert await page.evaluate(table("events")) == "no events yet"
            await page.wait(f"{table('models')}.includes('pending')", 15, "the unit pending")
            [row] = await page.evaluate(
                "[...document.getElementById('models').tBodies[0].rows]"
                ".map((r) => [...r.cells].map((c) => c.innerText))"
            )
            assert row[:3] == [MODEL, "interactive", "pending"]
            assert row[5]  # why it is pending
            assert await page.evaluate(chart("ttft", "points")) == 0
            assert page.errors == []
    finally:
        coordinator.stop()


@needs_chromium
async def test_status_page_shows_a_groups_members(chromium: int, tmp_path: Path) -> None:
    """A group needs several nodes (tests/multihost runs real ones): here the browser runs the
    page's script over a real StatusPage whose reconciler placed a group of two in memory."""
    page_server, reconciler = group_page(tmp_path)
    deadline = time.monotonic() + 10
    while not reconciler.groups.groups:  # on a running loop, sizing reads the files off it
        assert time.monotonic() < deadline, reconciler.pending
        await asyncio.sleep(0.05)
        reconciler.step()
    app = web.Application()
    page_server.add_routes(app)
    async with (
        TestServer(app, host="127.0.0.1") as server,
        open_page(chromium, str(server.make_url("/ui"))) as page,
    ):
        rows = await page.evaluate(
            "[...document.getElementById('groups').tBodies[0].rows]"
            ".map((r) => [...r.cells].map((c) => c.innerText))"
        )
        assert page.errors == []
    [rank_0, rank_1] = rows
    assert rank_0[:2] == rank_1[:2] == ["big", "interactive"]
    assert rank_0[2] == rank_1[2] and rank_0[2].startswith("big-i-")  # the group's id
    assert rank_0[3:6] == ["0 (serves)", "studio-1", "16-31"]
    assert rank_1[3:6] == ["1", "studio-2", "0-15"]
    assert rank_0[6] == rank_1[6] and rank_0[6].endswith(" GiB")
    assert 20 < float(rank_0[6].removesuffix(" GiB")) < 40  # half the layers, the shared part


def test_status_is_unauthenticated_and_carries_no_key_or_token(fleet: Fleet) -> None:
    page = httpx.get(f"{fleet.base}/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    status = httpx.get(f"{fleet.base}/ui/status")
    assert status.status_code == 200
    body = status.json()
    assert [n["id"] for n in body["nodes"]] == [fleet.node_id(fleet.agent)]
    assert {(m["model"], m["tier"]) for m in body["models"]} == {(MODEL, "interactive")}
    admin_token = (fleet.home / "admin_token").read_text().strip()
    for secret in (fleet.key, admin_token):
        assert secret not in status.text
    assert "secret" not in status.text
