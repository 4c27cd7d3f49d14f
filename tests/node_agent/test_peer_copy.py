"""Peer copy: real file server processes as holders, real TLS, real files on disk.

Spans are shrunk to 256 KiB so that a few MiB give holders work to share; servers capped at a
few MiB/s make a copy last long enough to interrupt it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from mlxfleet.manifest import Manifest
from node_agent import peer_copy
from node_agent.file_server import FileServerProcess
from node_agent.peer_copy import CopyFailed, CopyProgress, Holder, client_context, copy_files
from tests.node_agent.test_file_server import Certs, make_certs, serve, write_index, write_model

MIB = 2**20
SIZES = {
    "config.json": 700,
    "model-00001.safetensors": 3 * MIB,
    "sub/model-00002.safetensors": 2 * MIB + 5,
}
TOTAL = sum(SIZES.values())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(autouse=True)
def small_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peer_copy, "CHUNK_BYTES", 256 * 1024)


class Holders:
    """Holder processes over copies of one model; each node has its own folder and index."""

    def __init__(self, root: Path, certs: Certs) -> None:
        self.root, self.certs = root, certs
        self.manifest = write_model(root / "original", SIZES)
        self.servers: dict[str, FileServerProcess] = {}

    def folder(self, node: str) -> Path:
        return self.root / node / "model"

    async def start(
        self, node: str, rate_mib_s: float = 0, port: int = 0, cert: str = ""
    ) -> Holder:
        if not self.folder(node).exists():
            shutil.copytree(self.root / "original", self.folder(node))
            write_index(self.root / node / "index.json", (self.manifest, self.folder(node)))
        self.servers[node] = await serve(
            self.certs, cert or node, self.root / node / "index.json", port, rate_mib_s
        )
        return Holder(node, f"https://127.0.0.1:{self.servers[node].port}")

    async def stop(self, node: str) -> None:
        await self.servers.pop(node).stop()

    async def close(self) -> None:
        for node in list(self.servers):
            await self.stop(node)


@pytest.fixture
async def holders(tmp_path: Path, certs: Certs) -> AsyncIterator[Holders]:
    h = Holders(tmp_path / "holders", certs)
    yield h
    await h.close()


def tls(certs: Certs) -> peer_copy.ssl.SSLContext:
    return client_context(certs.cert("node-c"), certs.key("node-c"), certs.ca_pem)


def assert_copied(dest: Path, manifest: Manifest) -> None:
    """Every file byte-identical (its hash), nothing else left in the staging folder."""
    for f in manifest.files:
        assert hashlib.sha256((dest / f.path).read_bytes()).hexdigest() == f.sha256, f.path
    left = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert left == sorted(f.path for f in manifest.files)


async def when(check: Callable[[], bool], timeout_s: float = 20) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.02)


async def test_a_copy_from_one_holder_is_byte_identical(
    holders: Holders, certs: Certs, tmp_path: Path
) -> None:
    a = await holders.start("node-a")
    progress = CopyProgress()
    await copy_files(holders.manifest, [a], tmp_path / "dest", tls(certs), progress)
    assert_copied(tmp_path / "dest", holders.manifest)
    assert (progress.bytes_total, progress.bytes_done, progress.bytes_fetched) == (
        TOTAL,
        TOTAL,
        TOTAL,
    )
    assert progress.from_nodes == ["node-a"]
    assert progress.rate() > 0
    # A second call finds everything in place and fetches nothing.
    again = CopyProgress()
    await copy_files(holders.manifest, [a], tmp_path / "dest", tls(certs), again)
    assert (again.bytes_done, again.bytes_fetched) == (TOTAL, 0)


async def test_two_holders_share_the_work(holders: Holders, certs: Certs, tmp_path: Path) -> None:
    # Capped so that neither can take every span before the other has started.
    both = [
        await holders.start("node-a", rate_mib_s=4),
        await holders.start("node-b", rate_mib_s=4),
    ]
    progress = CopyProgress()
    await copy_files(holders.manifest, both, tmp_path / "dest", tls(certs), progress)
    assert_copied(tmp_path / "dest", holders.manifest)
    assert sorted(progress.from_nodes) == ["node-a", "node-b"]  # each sent bytes
    assert progress.bytes_fetched == TOTAL


async def test_a_holder_that_goes_away_mid_copy_is_resumed_at_the_byte(
    holders: Holders, certs: Certs, tmp_path: Path
) -> None:
    a = await holders.start("node-a", rate_mib_s=4)
    port = holders.servers["node-a"].port
    progress = CopyProgress()
    copy = asyncio.create_task(
        copy_files(holders.manifest, [a], tmp_path / "dest", tls(certs), progress, stall_s=1)
    )
    await when(lambda: progress.bytes_done > TOTAL // 3)
    await holders.stop("node-a")
    stopped_at = progress.bytes_done
    await asyncio.sleep(0.5)  # the copy retries into a closed port meanwhile
    assert not copy.done()
    await holders.start("node-a", rate_mib_s=4, port=port)
    await asyncio.wait_for(copy, 30)
    assert_copied(tmp_path / "dest", holders.manifest)
    assert stopped_at > 0
    assert progress.bytes_fetched < 1.2 * TOTAL
    assert progress.bytes_done == TOTAL


async def test_a_stalled_holder_is_dropped_and_another_takes_its_spans(
    holders: Holders,
    certs: Certs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """node-a freezes mid-span (SIGSTOP: its connections stay open, no byte comes); spans of
    2 MiB at 2 MiB/s a holder, so that they are still being sent when it freezes."""
    monkeypatch.setattr(peer_copy, "CHUNK_BYTES", 2 * MIB)
    a = await holders.start("node-a", rate_mib_s=2)
    b = await holders.start("node-b", rate_mib_s=2)
    progress = CopyProgress()
    caplog.set_level("INFO", "node_agent.peer_copy")
    copy = asyncio.create_task(
        copy_files(holders.manifest, [a, b], tmp_path / "dest", tls(certs), progress, stall_s=1)
    )
    frozen = holders.servers["node-a"].pid
    try:
        await when(lambda: "node-a" in progress.from_nodes)
        os.kill(frozen, signal.SIGSTOP)
        stopped_at = progress.bytes_done
        await asyncio.wait_for(copy, 20)
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert_copied(tmp_path / "dest", holders.manifest)
    assert stopped_at < TOTAL // 2  # most bytes came after node-a froze: from node-b
    assert "node-a: The read operation timed out; retrying" in caplog.messages
    assert progress.bytes_fetched < 1.2 * TOTAL


async def test_a_cancelled_copy_continues_in_a_later_call(
    holders: Holders, certs: Certs, tmp_path: Path
) -> None:
    a = await holders.start("node-a", rate_mib_s=4)
    first = CopyProgress()
    copy = asyncio.create_task(
        copy_files(holders.manifest, [a], tmp_path / "dest", tls(certs), first)
    )
    await when(lambda: first.bytes_done > TOTAL // 2)
    copy.cancel()
    with pytest.raises(asyncio.CancelledError):
        await copy
    record = json.loads((tmp_path / "dest" / peer_copy.RECORD_FILE).read_text())
    recorded = sum(
        f["size"] if f["verified"] else sum(end - start for start, end in f["done"])
        for f in record["files"].values()
    )
    assert recorded == first.bytes_done > TOTAL // 2
    second = CopyProgress()
    await copy_files(holders.manifest, [a], tmp_path / "dest", tls(certs), second)
    assert_copied(tmp_path / "dest", holders.manifest)
    assert second.bytes_done == TOTAL
    assert first.bytes_fetched + second.bytes_fetched == TOTAL  # not one byte twice


async def test_a_corrupt_file_is_fetched_again_from_another_holder(
    holders: Holders, certs: Certs, tmp_path: Path
) -> None:
    # node-a is bad in every span of a file and faster: it certainly serves some of them.
    a, b = await holders.start("node-a"), await holders.start("node-b", rate_mib_s=2)
    for offset in range(7, 3 * MIB, 256 * 1024):
        flip(holders.folder("node-a") / "model-00001.safetensors", offset)
    progress = CopyProgress()
    await copy_files(holders.manifest, [a, b], tmp_path / "dest", tls(certs), progress)
    assert_copied(tmp_path / "dest", holders.manifest)
    assert progress.bytes_fetched > TOTAL  # the bad file came twice at least
    assert progress.bytes_done == TOTAL


async def test_when_every_holder_sends_bad_bytes_the_copy_fails_saying_so(
    holders: Holders, certs: Certs, tmp_path: Path
) -> None:
    a, b = await holders.start("node-a"), await holders.start("node-b")
    for node in ("node-a", "node-b"):
        flip(holders.folder(node) / "sub/model-00002.safetensors", 100)
    with pytest.raises(CopyFailed) as failed:
        await copy_files(holders.manifest, [a, b], tmp_path / "dest", tls(certs))
    assert str(failed.value) == "sub/model-00002.safetensors: hash mismatch from node-a, node-b"
    # The good files are kept for the next try; the bad one is not.
    assert (tmp_path / "dest/config.json").read_bytes() == (
        holders.folder("node-b") / "config.json"
    ).read_bytes()
    assert not (tmp_path / "dest/sub/model-00002.safetensors").exists()


async def test_a_holder_outside_the_fleet_is_refused(
    holders: Holders, certs: Certs, tmp_path: Path
) -> None:
    """It claims node-a's name, with a certificate from another CA."""
    stranger = await holders.start("node-a", cert="stranger")
    with pytest.raises(CopyFailed) as failed:
        await copy_files(holders.manifest, [stranger], tmp_path / "dest", tls(certs))
    assert str(failed.value).startswith("no holder usable: node-a: not a fleet member (")
    # With a member beside it, the copy comes from the member only.
    b = await holders.start("node-b")
    progress = CopyProgress()
    await copy_files(holders.manifest, [stranger, b], tmp_path / "dest", tls(certs), progress)
    assert_copied(tmp_path / "dest", holders.manifest)
    assert progress.from_nodes == ["node-b"]


async def test_a_holder_with_another_name_is_refused(
    holders: Holders, certs: Certs, tmp_path: Path
) -> None:
    a = await holders.start("node-a")
    with pytest.raises(CopyFailed) as failed:
        await copy_files(holders.manifest, [Holder("node-b", a.url)], tmp_path / "dest", tls(certs))
    assert (
        str(failed.value)
        == "no holder usable: node-b: its certificate is for 'node-a', not 'node-b'"
    )


async def test_a_holder_without_the_model_or_with_other_sizes_is_not_used(
    holders: Holders, certs: Certs, tmp_path: Path
) -> None:
    a = await holders.start("node-a")
    write_index(holders.root / "node-a" / "index.json")  # evicted since
    with pytest.raises(CopyFailed) as failed:
        await copy_files(holders.manifest, [a], tmp_path / "dest", tls(certs))
    assert f"404 no model with manifest {holders.manifest.digest} on this node from node-a" in str(
        failed.value
    )
    # A holder that lists the file longer than the manifest says: its bytes are not taken.
    (holders.folder("node-a") / "config.json").write_bytes(b"x" * 701)
    files = [[f.path, f.size + (f.path == "config.json"), f.sha256] for f in holders.manifest.files]
    listing = {holders.manifest.digest: {"folder": str(holders.folder("node-a")), "files": files}}
    (holders.root / "node-a" / "index.json").write_text(json.dumps({"models": listing}))
    with pytest.raises(CopyFailed) as failed:
        await copy_files(holders.manifest, [a], tmp_path / "d2", tls(certs))
    assert str(failed.value) == (
        "config.json: answered 'bytes 0-699/701' (700 bytes) for 'bytes 0-699/700' from node-a"
    )


async def test_no_bytes_for_give_up_s_fails_the_copy(
    holders: Holders, certs: Certs, tmp_path: Path
) -> None:
    """A holder that accepts connections and never answers."""
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        holder = Holder("node-a", f"https://127.0.0.1:{silent.getsockname()[1]}")
        with pytest.raises(CopyFailed) as failed:
            await copy_files(
                holders.manifest, [holder], tmp_path / "dest", tls(certs), stall_s=0.3, give_up_s=1
            )
    finally:
        silent.close()
    assert str(failed.value).startswith("no bytes from any holder for 1 s (node-a: ")


def flip(path: Path, offset: int) -> None:
    """Change one byte, keeping the size (only the hash can tell)."""
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
