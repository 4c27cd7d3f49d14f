"""Model files over the LAN (issue 18): real agents on hosts in network namespaces copy a
model's files from each other over the fleet's mutual TLS, with the hub unreachable.

The model is a Hugging Face id. Host 1's agent has it in its own Hugging Face cache (as if it
had downloaded it once); the other hosts have empty caches. Every process's HF_ENDPOINT is a
listener on the bridge that counts connections and closes them: the hub is unreachable, and
the tests can tell whether anything tried it. The coordinator reads the model's config.json
from host 1's cache (sizing). The tests share one fleet and run in file order.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.pki import FleetPki
from mlxfleet.manifest import Manifest, ManifestFile
from node_agent.identity import make_csr
from tests.certs import write_key
from tests.conftest import file_hashes, run_ok, wait_for
from tests.multihost.fleet import MODEL, AgentProc, Fleet, cli, coordinator_fleet
from tests.netns import Network

HUB_ID = "mlxfleet-test/demo"
REVISION = "0123456789abcdef"
READY_TIMEOUT_S = 120.0
STOP_S = 20.0
SLOW_LINK_MBIT = 2  # the demo model's 1.9 MB take ~8 s: time to cut the link mid-copy
LINK_DOWN_S = 4.0
COPIED = "mlxfleet_agent_copy_bytes_total"  # the agent's counter of bytes it received


class HubWatch:
    """A TCP listener standing in for an unreachable hub: counts connections, closes each."""

    def __init__(self, host: str) -> None:
        self._sock = socket.create_server((host, 0))
        self.url = f"http://{host}:{self._sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._sock.close()


@dataclass
class CopyFleet:
    fleet: Fleet
    root: Path
    snapshot: Path  # host 1's Hugging Face cache copy of the model
    hub: HubWatch | None = None
    agents: dict[str, AgentProc] = field(default_factory=dict)

    def start(self, name: str, host: int, *extra: str) -> AgentProc:
        assert self.hub is not None
        env = {"HF_HOME": str(self.root / f"hf-{name}"), "HF_ENDPOINT": self.hub.url}
        agent = self.fleet.start_agent(
            name,
            self.fleet.net.hosts[host],
            self.fleet.token(),
            extra=("--role", "server", *extra),
            env=env,
        )
        self.agents[name] = agent
        wait_for(lambda: live(self.fleet, agent), READY_TIMEOUT_S, f"{name} live")
        return agent

    def stop(self, name: str) -> None:
        """SIGTERM the agent (it stops its engines) and wait for its whole session to end."""
        agent = self.agents[name]
        os.killpg(agent.proc.pid, signal.SIGTERM)
        agent.proc.wait(STOP_S)
        wait_for(lambda: not live(self.fleet, agent), 15, f"{name} to leave")


def seed_hub_cache(hf_home: Path, model: Path) -> Path:
    """The demo model in a Hugging Face cache, as a download would have left it."""
    repo = hf_home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(model, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def manifest_of(folder: Path) -> Manifest:
    files = [
        ManifestFile(path, (folder / path).stat().st_size, sha)
        for path, sha in file_hashes(folder).items()
    ]
    return Manifest.of(HUB_ID, files)


def store_folder(agent: AgentProc) -> Path | None:
    """The complete copy of the model in an agent's model store, if it has one."""
    found = [p.parent for p in agent.home.rglob("model.safetensors") if ".partial" not in p.parts]
    return found[0] if len(found) == 1 else None


def live(fleet: Fleet, agent: AgentProc) -> bool:
    row = fleet.node(agent.node_id) if agent.node_id else None
    return row is not None and row["state"] == "live"


def models_row(fleet: Fleet, model: str = MODEL) -> dict[str, Any] | None:
    body = fleet._get("/admin/v1/models", (fleet.home / "admin_token").read_text().strip())
    rows = [r for r in (body or {}).get("models", []) if r["model"] == model]
    return rows[0] if rows else None


def ready_on(fleet: Fleet, model: str = MODEL) -> set[str]:
    return {n["id"] for n in fleet.nodes() for m in n["models"] if m == f"{model} (ready)"}


def agent_metric(agent: AgentProc, name: str) -> float:
    """The sum of a metric's samples on the agent's /metrics (0 when absent)."""
    text = httpx.get(f"http://{agent.host.ip}:8402/metrics", timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


def set_replicas(fleet: Fleet, n: int, model: str = MODEL) -> None:
    run_ok(cli("models", "set", model, "--replicas", str(n), "--home", str(fleet.home)))


@pytest.fixture(scope="module")
def copy_fleet(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[CopyFleet]:
    root = tmp_path_factory.mktemp("copy")
    cf_box: list[CopyFleet] = []
    snapshot = seed_hub_cache(root / "hf-a1", demo_model)

    def coordinator_env(net: Network) -> dict[str, str]:
        hub = HubWatch(net.bridge_ip)
        cf_box.append(CopyFleet(None, root, snapshot, hub))  # type: ignore[arg-type]
        return {"HF_HOME": str(root / "hf-a1"), "HF_ENDPOINT": hub.url}

    with coordinator_fleet(root, HUB_ID, 5, "copy", coordinator_env=coordinator_env) as f:
        cf = cf_box[0]
        cf.fleet = f
        try:
            yield cf
        finally:
            assert cf.hub is not None
            cf.hub.close()


def test_a_node_copies_the_model_from_a_peer_and_serves_it_without_the_hub(
    copy_fleet: CopyFleet,
) -> None:
    cf, fleet = copy_fleet, copy_fleet.fleet
    a1 = cf.start("a1", 1)
    wait_for(lambda: ready_on(fleet) == {a1.node_id}, READY_TIMEOUT_S, "demo ready on host 1")
    wait_for(
        lambda: (models_row(fleet) or {}).get("files_on") == [a1.node_id],
        30,
        "host 1's manifest to be recorded",
    )
    a2 = cf.start("a2", 2)
    set_replicas(fleet, 2)
    wait_for(lambda: ready_on(fleet) == {a1.node_id, a2.node_id}, READY_TIMEOUT_S, "demo on host 2")
    copied = store_folder(a2)
    assert copied is not None
    assert file_hashes(copied) == file_hashes(cf.snapshot)  # byte-identical
    assert cf.hub is not None and cf.hub.connections == 0  # the hub was never contacted
    row = models_row(fleet)
    assert row is not None and sorted(row["files_on"]) == sorted([a1.node_id, a2.node_id])
    size = manifest_of(cf.snapshot).total_bytes
    assert size <= agent_metric(a2, COPIED) < 1.2 * size
    texts = set()
    for _ in range(4):
        reply = fleet.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
        )
        assert reply.choices[0].message.content
        texts.add(reply.choices[0].message.content)
    assert len(texts) == 1  # both replicas run the same weights


def test_placement_prefers_the_nodes_that_hold_the_files(copy_fleet: CopyFleet) -> None:
    """Host 3 has the most free memory (it runs nothing), so spreading would pick it; the
    nodes that hold the files win, and host 3 copies nothing."""
    cf, fleet = copy_fleet, copy_fleet.fleet
    a3 = cf.start("a3", 3)
    run_ok(
        cli("models", "add", "demo2", HUB_ID, "--context-length", "2048", "--home", str(fleet.home))
    )
    wait_for(lambda: ready_on(fleet, "demo2"), READY_TIMEOUT_S, "demo2 ready")
    assert ready_on(fleet, "demo2") <= {cf.agents["a1"].node_id, cf.agents["a2"].node_id}
    assert store_folder(a3) is None
    run_ok(cli("models", "remove", "demo2", "--home", str(fleet.home)))
    wait_for(lambda: not ready_on(fleet, "demo2"), 30, "demo2 gone")


def test_a_copy_resumes_where_it_stopped_after_the_link_went_down(copy_fleet: CopyFleet) -> None:
    cf, fleet = copy_fleet, copy_fleet.fleet
    a1, a2, a3 = (cf.agents[n] for n in ("a1", "a2", "a3"))
    for holder in (a1, a2):
        fleet.net.shape(holder.host, SLOW_LINK_MBIT)
    progress: list[str] = []
    try:
        set_replicas(fleet, 3)

        def copying() -> bool:
            row = models_row(fleet) or {}
            progress.extend(row.get("copies") or [])
            return any(c.startswith(f"{a3.node_id}: ") and "from peer" in c for c in progress)

        wait_for(copying, 60, "host 3 to be copying")
        time.sleep(1.5)
        at_cut = agent_metric(a3, COPIED)
        fleet.net.link_down(a3.host)
        time.sleep(LINK_DOWN_S)
        fleet.net.link_up(a3.host)
        wait_for(lambda: a3.node_id in ready_on(fleet), READY_TIMEOUT_S, "demo on host 3")
    finally:
        for holder in (a1, a2):
            fleet.net.unshape(holder.host)
    size = manifest_of(cf.snapshot).total_bytes
    assert 0 < at_cut < size  # the link went down in the middle of the copy
    fetched = agent_metric(a3, COPIED)
    assert size <= fetched < 1.2 * size, (fetched, size)
    copied = store_folder(a3)
    assert copied is not None and file_hashes(copied) == file_hashes(cf.snapshot)
    assert cf.hub is not None and cf.hub.connections == 0


def test_a_corrupted_file_at_the_source_is_caught_before_the_engine_starts(
    copy_fleet: CopyFleet,
) -> None:
    """Host 1's weights get one byte flipped on disk (its modification time kept, so nothing
    tells it). With host 1 the only holder, host 3's copy fails with a clear reason and no
    engine starts; once host 2 is back, the copy comes from it and the engine starts."""
    cf, fleet = copy_fleet, copy_fleet.fleet
    a3 = cf.agents["a3"]
    good = file_hashes(cf.snapshot)
    cf.stop("a2")
    cf.stop("a3")
    folder = store_folder(a3)
    assert folder is not None
    shutil.rmtree(folder)
    weights = cf.snapshot / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    at = len(data) // 2
    data[at] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    try:
        cf.start("a3", 3)

        def refused() -> str | None:
            pending = (models_row(fleet) or {}).get("pending") or ""
            return pending if "model.safetensors" in pending else None

        reason = wait_for(refused, READY_TIMEOUT_S, "the bad copy to be refused")
        assert "mismatch" in reason and cf.agents["a1"].node_id in reason
        assert a3.node_id not in ready_on(fleet)
        assert store_folder(a3) is None
        cf.start("a2", 2)
        wait_for(lambda: a3.node_id in ready_on(fleet), READY_TIMEOUT_S, "demo on host 3")
        copied = store_folder(a3)
        assert copied is not None and file_hashes(copied) == good
    finally:
        data[at] ^= 0xFF
        weights.write_bytes(bytes(data))
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_node_without_disk_room_is_never_chosen(copy_fleet: CopyFleet) -> None:
    cf, fleet = copy_fleet, copy_fleet.fleet
    a4 = cf.start("a4", 4, "--disk-budget", "0.001")  # 1 MiB: less than the model's files
    set_replicas(fleet, 4)

    def pending() -> str | None:
        reason = (models_row(fleet) or {}).get("pending") or ""
        return reason if f"{a4.node_id}: needs" in reason else None

    reason = wait_for(pending, 30, "the 4th replica to be pending for disk")
    assert "MiB of disk, has" in reason
    time.sleep(2)
    assert a4.node_id not in ready_on(fleet) and store_folder(a4) is None
    set_replicas(fleet, 3)


def _context(ca_pem: bytes, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    ctx.check_hostname = False  # holders are reached by address; their CN is their node id
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def test_the_file_server_refuses_strangers_and_files_outside_the_manifest(
    copy_fleet: CopyFleet, tmp_path: Path
) -> None:
    cf, fleet = copy_fleet, copy_fleet.fleet
    a1, a2 = cf.agents["a1"], cf.agents["a2"]
    row = fleet.node(a1.node_id)
    assert row is not None and row["files_url"].startswith("https://")
    base = f"{row['files_url']}/v1/models/{manifest_of(cf.snapshot).digest}/files"
    ca_pem = FleetPki.load_or_create(fleet.home).ca_cert_pem
    member = _context(ca_pem, a2.home / "agent" / "node.crt", a2.home / "agent" / "node.key")
    with httpx.Client(verify=member, timeout=10) as client:
        r = client.get(f"{base}/config.json")
        assert r.status_code == 200
        assert hashlib.sha256(r.content).hexdigest() == file_hashes(cf.snapshot)["config.json"]
        r = client.get(f"{base}/model.safetensors", headers={"Range": "bytes=8-15"})
        assert r.status_code == 206 and len(r.content) == 8
        for path in ("README.md", "..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"):
            r = client.get(f"{base}/{path}")
            assert r.status_code == 404, (path, r.status_code)
        r = client.get(f"{row['files_url']}/v1/models/{'0' * 64}/files/config.json")
        assert r.status_code == 404
    # No client certificate, or one from another CA: no fleet member, no bytes.
    other = FleetPki.load_or_create(tmp_path / "other")
    key_path = tmp_path / "stranger.key"
    write_key(key_path)
    cert_path = tmp_path / "stranger.crt"
    cert_path.write_bytes(other.issue_node_certificate("stranger", make_csr(key_path.read_bytes())))
    for ctx in (_context(ca_pem), _context(ca_pem, cert_path, key_path)):
        with httpx.Client(verify=ctx, timeout=10) as client, pytest.raises(httpx.TransportError):
            client.get(f"{base}/config.json")
