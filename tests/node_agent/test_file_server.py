"""The file server: real processes, real TLS with a fleet CA made for the test.

Only fleet members get bytes, only files listed in the index are served, and the process looks
after itself (lowered priority, exit with its agent). The helpers here are shared with
test_peer_copy.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.pki import FleetPki
from mlxfleet.manifest import Manifest, ManifestFile
from node_agent.file_server import NICE, FileServerProcess
from node_agent.identity import make_csr
from tests.certs import write_key
from tests.conftest import REPO, wait_for

MIB = 2**20
NODES = ("node-a", "node-b", "node-c")


@dataclass(frozen=True, slots=True)
class Certs:
    """A fleet CA and node certificates (CN = node id); `stranger` is from another CA."""

    folder: Path
    ca: Path
    ca_pem: bytes

    def cert(self, node: str) -> Path:
        return self.folder / f"{node}.crt"

    def key(self, node: str) -> Path:
        return self.folder / f"{node}.key"

    def client(self, node: str | None) -> ssl.SSLContext:
        """What a client dials with: the fleet CA, and `node`'s certificate when given."""
        ctx = ssl.create_default_context(cadata=self.ca_pem.decode())
        ctx.check_hostname = False  # servers are reached by address; their CN is their node id
        if node is not None:
            ctx.load_cert_chain(self.cert(node), self.key(node))
        return ctx


def make_certs(folder: Path) -> Certs:
    folder.mkdir(parents=True, exist_ok=True)
    fleet = FleetPki.load_or_create(folder / "fleet")
    other = FleetPki.load_or_create(folder / "other")
    for node, pki in [*((n, fleet) for n in NODES), ("stranger", other)]:
        write_key(folder / f"{node}.key")
        csr = make_csr((folder / f"{node}.key").read_bytes())
        # The stranger claims to be node-a: only the CA tells them apart.
        name = "node-a" if node == "stranger" else node
        (folder / f"{node}.crt").write_bytes(pki.issue_node_certificate(name, csr))
    (folder / "ca.pem").write_bytes(fleet.ca_cert_pem)
    return Certs(folder, folder / "ca.pem", fleet.ca_cert_pem)


def write_model(folder: Path, sizes: dict[str, int], seed: int = 0) -> Manifest:
    """Files of the given sizes (pseudo-random bytes made from `seed`) and their manifest."""
    files = []
    for path, size in sizes.items():
        block = hashlib.sha256(f"{seed}/{path}".encode()).digest() * 2048  # 64 KiB
        data = (block * (size // len(block) + 1))[:size]
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
        files.append(ManifestFile(path, size, hashlib.sha256(data).hexdigest()))
    return Manifest.of(str(folder), files)


def write_index(index: Path, *models: tuple[Manifest, Path]) -> None:
    """The file server's index, written as the model store does (atomically)."""
    listing = {
        m.digest: {"folder": str(folder), "files": [[f.path, f.size, f.sha256] for f in m.files]}
        for m, folder in models
    }
    tmp = index.with_name(f".{index.name}.tmp")
    tmp.write_text(json.dumps({"models": listing}))
    os.replace(tmp, index)


async def serve(
    certs: Certs, node: str, index: Path, port: int = 0, rate_mib_s: float = 0
) -> FileServerProcess:
    return await FileServerProcess.start(
        index,
        certs.cert(node),
        certs.key(node),
        certs.ca,
        "127.0.0.1",
        port,
        rate_mib_s=rate_mib_s,
        log_path=index.parent / f"{node}-files.log",
    )


def get(
    port: int, path: str, ctx: ssl.SSLContext, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One GET, the path sent as given (no client-side normalisation of `..`)."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@dataclass
class Served:
    manifest: Manifest
    folder: Path
    index: Path
    server: FileServerProcess

    def url(self, path: str, digest: str | None = None) -> str:
        return f"/v1/models/{digest or self.manifest.digest}/files/{path}"


@pytest.fixture
async def served(tmp_path: Path, certs: Certs) -> AsyncIterator[Served]:
    folder = tmp_path / "model"
    manifest = write_model(folder, {"config.json": 300, "weights/model.safetensors": 3 * MIB})
    (folder / "secret.txt").write_text("not in the manifest")
    write_index(tmp_path / "index.json", (manifest, folder))
    server = await serve(certs, "node-a", tmp_path / "index.json")
    yield Served(manifest, folder, tmp_path / "index.json", server)
    await server.stop()


async def test_serves_ranges_and_whole_files(served: Served, certs: Certs) -> None:
    data = (served.folder / "weights/model.safetensors").read_bytes()
    size = len(data)

    async def fetch(path: str, span: str | None) -> tuple[int, dict[str, str], bytes]:
        headers = {"Range": span} if span else {}
        member = certs.client("node-b")
        return await asyncio.to_thread(get, served.server.port, served.url(path), member, headers)

    path = "weights/model.safetensors"
    status, headers, body = await fetch(path, "bytes=1000-1999")
    assert (status, headers["Content-Range"], body) == (
        206,
        f"bytes 1000-1999/{size}",
        data[1000:2000],
    )
    status, headers, body = await fetch(path, f"bytes={size - 10}-")
    assert (status, headers["Content-Range"], body) == (
        206,
        f"bytes {size - 10}-{size - 1}/{size}",
        data[-10:],
    )
    assert (await fetch(path, "bytes=-5"))[::2] == (206, data[-5:])
    status, headers, body = await fetch(path, None)
    assert (status, int(headers["Content-Length"]), body) == (200, size, data)
    # Percent-encoded paths are the same file; a range past the end is unsatisfiable.
    assert (await fetch("weights%2Fmodel.safetensors", "bytes=0-3"))[::2] == (206, data[:4])
    status, headers, _ = await fetch(path, f"bytes={size}-")
    assert (status, headers["Content-Range"]) == (416, f"bytes */{size}")


async def test_only_files_listed_in_the_manifest_are_served(served: Served, certs: Certs) -> None:
    member = certs.client("node-b")
    port = served.server.port
    for path in (
        "secret.txt",  # in the folder, not in the manifest
        "../index.json",
        "weights/../config.json",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        str(served.folder / "config.json"),
    ):
        status, headers, body = await asyncio.to_thread(get, port, served.url(path), member)
        assert status == 404, path
        assert headers["Content-Type"] == "application/json"
        assert json.loads(body)["error"]["code"] == "not_found"
    status, _, body = await asyncio.to_thread(
        get, port, served.url("config.json", "0" * 64), member
    )
    assert (status, json.loads(body)["error"]["message"]) == (
        404,
        f"no model with manifest {'0' * 64} on this node",
    )
    status, _, _ = await asyncio.to_thread(get, port, "/etc/passwd", member)
    assert status == 404


async def test_a_file_whose_size_changed_is_not_served(served: Served, certs: Certs) -> None:
    with (served.folder / "config.json").open("ab") as f:
        f.write(b"more")
    status, _, body = await asyncio.to_thread(
        get, served.server.port, served.url("config.json"), certs.client("node-b")
    )
    assert status == 409
    assert (
        json.loads(body)["error"]["message"]
        == "config.json: 304 bytes on disk, the manifest says 300"
    )


async def test_the_index_is_read_again_when_it_changes(
    served: Served, certs: Certs, tmp_path: Path
) -> None:
    second = write_model(tmp_path / "second", {"tokenizer.json": 1234}, seed=2)
    url = f"/v1/models/{second.digest}/files/tokenizer.json"
    member = certs.client("node-b")
    assert (await asyncio.to_thread(get, served.server.port, url, member))[0] == 404
    write_index(served.index, (served.manifest, served.folder), (second, tmp_path / "second"))
    status, _, body = await asyncio.to_thread(get, served.server.port, url, member)
    assert (status, body) == (200, (tmp_path / "second/tokenizer.json").read_bytes())


async def test_clients_without_a_fleet_certificate_get_nothing(
    served: Served, certs: Certs
) -> None:
    """No client certificate, or one from another CA: the handshake fails, no bytes."""
    stranger = certs.client(None)
    stranger.load_cert_chain(certs.cert("stranger"), certs.key("stranger"))
    for ctx in (certs.client(None), stranger):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.to_thread(get, served.server.port, served.url("config.json"), ctx)
    # Members still get in.
    status, _, _ = await asyncio.to_thread(
        get, served.server.port, served.url("config.json"), certs.client("node-c")
    )
    assert status == 200


async def test_the_send_rate_cap_holds(tmp_path: Path, certs: Certs) -> None:
    folder = tmp_path / "model"
    manifest = write_model(folder, {"model.safetensors": 4 * MIB})
    write_index(tmp_path / "index.json", (manifest, folder))
    server = await serve(certs, "node-a", tmp_path / "index.json", rate_mib_s=8)
    try:
        url = f"/v1/models/{manifest.digest}/files/model.safetensors"
        started = time.monotonic()
        status, _, body = await asyncio.to_thread(get, server.port, url, certs.client("node-b"))
        elapsed = time.monotonic() - started
    finally:
        await server.stop()
    assert (status, len(body)) == (200, 4 * MIB)
    # 8 MiB/s with a burst of 1 MiB: the last 3 MiB take at least 0.375 s.
    assert elapsed >= 0.35


async def test_it_runs_at_a_lower_priority_and_ends_with_its_agent(
    tmp_path: Path, certs: Certs
) -> None:
    """An agent that dies (SIGKILL, no cleanup) must not leave its file server running: a
    stand-in agent process starts one, and is killed."""
    write_index(tmp_path / "index.json")
    agent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import asyncio, sys\n"
            "from pathlib import Path\n"
            "from tests.node_agent.test_file_server import Certs, serve\n"
            "async def main():\n"
            f"    certs = Certs(Path({str(certs.folder)!r}), Path({str(certs.ca)!r}), b'')\n"
            f"    s = await serve(certs, 'node-a', Path({str(tmp_path / 'index.json')!r}))\n"
            "    print(s.pid, flush=True)\n"
            "    await asyncio.sleep(600)\n"
            "asyncio.run(main())\n",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    try:
        assert agent.stdout is not None
        pid = int(await asyncio.to_thread(agent.stdout.readline))
        nice = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
        assert nice == NICE == 19
        if Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1":
            # Its own session's autogroup too: else nice would not count against engines.
            assert Path(f"/proc/{pid}/autogroup").read_text().endswith(f" nice {NICE}\n")
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        await asyncio.to_thread(wait_for, lambda: not _running(pid), 5, "the file server to exit")
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_sigterm_stops_it_cleanly(served: Served) -> None:
    await served.server.stop()
    assert served.server.returncode == 0
