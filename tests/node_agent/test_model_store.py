"""The node's model store: folders used in place, copies from peers, disk room and eviction.

Real files, real hashing and real copies: peers are a real file server (its own process) with
certificates from a fleet CA made for the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator.pki import FleetPki
from mlxfleet.manifest import Manifest, ManifestFile
from mlxfleet.v1 import fleet_pb2 as pb
from node_agent.coordinator_client import Session, load_request, status_to_pb
from node_agent.file_server import FileServerProcess
from node_agent.holdings import RECORD, Holding, write_json
from node_agent.identity import make_csr
from node_agent.manifest import build_manifest
from node_agent.model_store import ModelStore, ModelUnavailable, folder_name
from node_agent.peer_copy import Holder, client_context
from tests.certs import write_key
from tests.conftest import file_hashes
from tests.node_agent.test_metrics import FACTS, READING

MIB = 2**20


def model_files(seed: int, size: int) -> dict[str, bytes]:
    """A model's files: a config and `size` bytes of weights (made from `seed`)."""
    weights = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    return {"config.json": json.dumps({"seed": seed}).encode(), "model.safetensors": weights[:size]}


def write_model(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        (folder / path).write_bytes(data)
    return folder


def seed_store(root: Path, source: str, files: dict[str, bytes], last_used: float) -> Manifest:
    """A model in the store as an earlier run left it: its folder and record."""
    staging = write_model(root / "seeding", files)
    manifest = build_manifest(source, staging)
    folder = root / folder_name(source, manifest.digest)
    os.replace(staging, folder)
    write_json(folder / RECORD, Holding(source, folder, manifest, False, last_used).record())
    return manifest


class Peer:
    """A fleet node holding model files: a real file server process with a certificate from
    the test's fleet CA; `client_tls` is another member's, to copy with."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        pki = FleetPki.load_or_create(root / "fleet")
        self.ca = root / "fleet-ca.crt"
        self.ca.write_bytes(pki.ca_cert_pem)
        for node in ("holder", "me"):
            write_key(root / f"{node}.key")
            csr = make_csr((root / f"{node}.key").read_bytes())
            (root / f"{node}.crt").write_bytes(pki.issue_node_certificate(node, csr))
        self.client_tls = client_context(root / "me.crt", root / "me.key", pki.ca_cert_pem)
        self.index = root / "index.json"
        self._models: dict[str, dict[str, object]] = {}
        self.server: FileServerProcess | None = None

    async def start(self, rate_mib_s: float = 0) -> None:
        """Serve (again), at most `rate_mib_s` (0: no cap)."""
        if self.server is not None:
            await self.server.stop()
        self.server = await FileServerProcess.start(
            self.index,
            self.root / "holder.crt",
            self.root / "holder.key",
            self.ca,
            "127.0.0.1",
            rate_mib_s=rate_mib_s,
            log_path=self.root / "file-server.log",
        )

    def folder_of(self, manifest: Manifest) -> Path:
        return Path(str(self._models[manifest.digest]["folder"]))

    async def offer(self, source: str, files: dict[str, bytes]) -> tuple[Manifest, list[Holder]]:
        """Hold a model's files and serve them: their manifest, and this node as the holder."""
        assert self.server is not None
        folder = write_model(self.root / f"model-{len(self._models)}", files)
        manifest = build_manifest(source, folder)
        files_list = [[f.path, f.size, f.sha256] for f in manifest.files]
        self._models[manifest.digest] = {"folder": str(folder), "files": files_list}
        write_json(self.index, {"models": self._models})
        return manifest, self.holders()

    def holders(self) -> list[Holder]:
        assert self.server is not None
        return [Holder("holder", f"https://127.0.0.1:{self.server.port}")]


@pytest.fixture
async def peer(tmp_path: Path) -> AsyncIterator[Peer]:
    """Needs a process: the file server runs in its own, as on a node."""
    p = Peer(tmp_path / "peer")
    await p.start()
    yield p
    assert p.server is not None
    await p.server.stop()


@pytest.fixture
async def store(tmp_path: Path, peer: Peer) -> AsyncIterator[ModelStore]:
    s = ModelStore(tmp_path / "models", reserve_bytes=0)
    s.peer_tls = peer.client_tls
    yield s
    await s.close()


async def test_a_local_folder_is_used_in_place_and_never_counted_nor_evicted(
    tmp_path: Path, store: ModelStore
) -> None:
    folder = write_model(tmp_path / "mine", model_files(1, 5 * MIB))
    store.budget_bytes = 100 * MIB
    assert store.disk_room() == 100 * MIB
    got = await store.ensure(str(folder))
    assert got == folder
    await store.settle()  # hashed in the background
    manifest = build_manifest(str(folder), folder)
    [held] = store.held()
    assert (held.source, held.digest, held.bytes) == (str(folder), manifest.digest, 5 * MIB + 11)
    assert held.in_use and not held.evictable
    assert store.manifests() == [manifest]
    index = json.loads(store.index_path.read_text())
    assert index == {
        "models": {
            manifest.digest: {
                "folder": str(folder),
                "files": [[f.path, f.size, f.sha256] for f in manifest.files],
            }
        }
    }
    assert store.disk_room() == 100 * MIB  # not in the budget, not evictable
    store.release(got)
    assert not store.held()[0].in_use


async def test_store_models_are_found_again_and_a_broken_one_is_deleted(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    good = seed_store(root, "/fleet/good", model_files(1, MIB), last_used=100.0)
    broken = seed_store(root, "/fleet/broken", model_files(2, MIB), last_used=100.0)
    broken_folder = root / folder_name("/fleet/broken", broken.digest)
    with (broken_folder / "model.safetensors").open("r+b") as f:
        f.truncate(1000)  # cut short: a store folder is complete or nothing
    store = ModelStore(root, reserve_bytes=0)
    try:
        assert [(h.source, h.digest, h.evictable) for h in store.held()] == [
            ("/fleet/good", good.digest, True)
        ]
        assert not broken_folder.exists()
        folder = await store.ensure("/fleet/good")  # no copy, no hub: the store has it
        assert folder == root / folder_name("/fleet/good", good.digest)
        assert store.held()[0].in_use
        # Another revision asked for: the store's files are not those.
        other = Manifest.of("/fleet/good", [*good.files[:1]])
        with pytest.raises(ModelUnavailable, match="no node holds /fleet/good and it is not"):
            await store.ensure("/fleet/good", other)
    finally:
        await store.close()


async def test_room_is_free_disk_within_the_budget_with_unused_models_counted_free(
    tmp_path: Path,
) -> None:
    root = tmp_path / "models"
    root.mkdir()
    seed_store(root, "/fleet/a", model_files(1, 3 * MIB), last_used=100.0)
    seed_store(root, "/fleet/b", model_files(2, 2 * MIB), last_used=200.0)
    sizes = {"/fleet/a": 3 * MIB + 11, "/fleet/b": 2 * MIB + 11}
    store = ModelStore(root, budget_bytes=10 * MIB, reserve_bytes=0)
    try:
        # budget - stored + evictable: all of the budget while nothing is in use
        assert store.disk_room() == 10 * MIB
        folder = await store.ensure("/fleet/a")
        assert store.disk_room() == 10 * MIB - sizes["/fleet/a"]
        store.release(folder)
        assert store.disk_room() == 10 * MIB
        # Without a budget the disk is the limit, less the reserve.
        unbounded = ModelStore(root, reserve_bytes=2**30)
        free = shutil.disk_usage(root).free
        assert abs(unbounded.disk_room() - (free - 2**30 + sum(sizes.values()))) < 64 * MIB
        await unbounded.close()
    finally:
        await store.close()


async def test_a_copy_evicts_the_least_recently_used_models_no_engine_uses(
    tmp_path: Path, peer: Peer
) -> None:
    root = tmp_path / "models"
    root.mkdir()
    seed_store(root, "/fleet/a", model_files(1, 3 * MIB), last_used=100.0)
    seed_store(root, "/fleet/b", model_files(2, 3 * MIB), last_used=200.0)
    seed_store(root, "/fleet/c", model_files(3, 3 * MIB), last_used=50.0)  # oldest, but in use
    store = ModelStore(root, budget_bytes=10 * MIB + 100, reserve_bytes=0)
    store.peer_tls = peer.client_tls
    try:
        in_use = await store.ensure("/fleet/c")
        manifest_d, holders = await peer.offer("/fleet/d", model_files(4, 4 * MIB))
        d = await store.ensure("/fleet/d", manifest_d, holders)
        assert sorted(h.source for h in store.held()) == ["/fleet/b", "/fleet/c", "/fleet/d"]
        assert file_hashes(d) == file_hashes(peer.folder_of(manifest_d))
        # b (3 MiB) is all that could go now: 5 MiB does not fit, and nothing is evicted.
        manifest_e, holders = await peer.offer("/fleet/e", model_files(5, 5 * MIB))
        with pytest.raises(ModelUnavailable) as failed:
            await store.ensure("/fleet/e", manifest_e, holders)
        assert str(failed.value) == "needs 5.0 MiB of disk, this node has 3.0 MiB free"
        assert sorted(h.source for h in store.held()) == ["/fleet/b", "/fleet/c", "/fleet/d"]
        # Once d's engine is gone, b then d go (least recently used first); c stays.
        store.release(d)
        e = await store.ensure("/fleet/e", manifest_e, holders)
        assert sorted((h.source, h.in_use) for h in store.held()) == [
            ("/fleet/c", True),
            ("/fleet/e", True),
        ]
        assert in_use.is_dir() and file_hashes(e) == file_hashes(peer.folder_of(manifest_e))
        assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == sorted(
            [in_use.name, e.name]
        )
    finally:
        await store.close()


async def test_a_peer_copy_lands_verified_in_the_store(store: ModelStore, peer: Peer) -> None:
    files = model_files(7, 3 * MIB)
    manifest, holders = await peer.offer("/fleet/m", files)
    folder = await store.ensure("/fleet/m", manifest, holders)
    assert folder == store.root / folder_name("/fleet/m", manifest.digest)
    assert file_hashes(folder) == {p: hashlib.sha256(d).hexdigest() for p, d in files.items()}
    assert [(h.source, h.digest, h.in_use, h.evictable) for h in store.held()] == [
        ("/fleet/m", manifest.digest, True, True)
    ]
    assert store.manifests() == [manifest]
    assert store.fetched_bytes() == {"peer": manifest.total_bytes}
    assert list((store.root / ".partial").iterdir()) == []
    assert manifest.digest in json.loads(store.index_path.read_text())["models"]
    # Held now: a second load copies nothing.
    assert await store.ensure("/fleet/m", manifest, holders) == folder
    assert store.fetched_bytes() == {"peer": manifest.total_bytes}


async def test_a_copy_stopped_by_a_restart_resumes_where_it_stopped(
    tmp_path: Path, peer: Peer
) -> None:
    await peer.start(rate_mib_s=4)
    manifest, holders = await peer.offer("/fleet/m", model_files(6, 8 * MIB))
    first = ModelStore(tmp_path / "models", reserve_bytes=0)
    first.peer_tls = peer.client_tls
    copying = asyncio.create_task(first.ensure("/fleet/m", manifest, holders))
    for _ in range(500):
        if first.fetched_bytes().get("peer", 0) >= 3 * MIB:
            break
        await asyncio.sleep(0.01)
    await first.close()  # the agent stops mid-copy
    with pytest.raises(asyncio.CancelledError):
        await copying
    before = first.fetched_bytes()["peer"]
    assert 3 * MIB <= before < manifest.total_bytes
    await peer.start()  # no cap now (and another port)
    again = ModelStore(tmp_path / "models", reserve_bytes=0)
    again.peer_tls = peer.client_tls
    try:
        folder = await again.ensure("/fleet/m", manifest, peer.holders())
        after = again.fetched_bytes()["peer"]
        assert after < manifest.total_bytes - before + 2 * MIB  # not from the start
        assert file_hashes(folder) == file_hashes(peer.folder_of(manifest))
    finally:
        await again.close()


async def test_two_loads_of_one_source_at_once_share_one_copy(
    store: ModelStore, peer: Peer
) -> None:
    manifest, holders = await peer.offer("/fleet/m", model_files(8, 4 * MIB))
    first, second = await asyncio.gather(
        store.ensure("/fleet/m", manifest, holders), store.ensure("/fleet/m", manifest, holders)
    )
    assert first == second
    assert store.fetched_bytes() == {"peer": manifest.total_bytes}  # once, not twice
    store.release(first)
    assert store.held()[0].in_use  # the second load still holds it
    store.release(second)
    assert not store.held()[0].in_use


async def test_a_bad_file_at_the_holder_fails_the_copy_and_stores_nothing(
    store: ModelStore, peer: Peer
) -> None:
    manifest, holders = await peer.offer("/fleet/m", model_files(9, 2 * MIB))
    weights = peer.folder_of(manifest) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[MIB] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelUnavailable) as failed:
        await store.ensure("/fleet/m", manifest, holders)
    message = str(failed.value)
    assert message.startswith("copy of /fleet/m failed: ") and "\n" not in message
    assert "model.safetensors" in message
    assert store.held() == []


async def test_a_source_that_is_no_folder_here_and_has_no_holder_fails_in_one_line(
    store: ModelStore,
) -> None:
    with pytest.raises(ModelUnavailable) as failed:
        await store.ensure("/no/such/model")
    assert str(failed.value) == "no node holds /no/such/model and it is not a folder here"


HUB_SCRIPT = """
import asyncio, sys
from pathlib import Path
from node_agent.model_store import ModelStore, ModelUnavailable

async def main():
    store = ModelStore(Path(sys.argv[1]), reserve_bytes=0)
    print(await store.ensure("org/cached"))
    try:
        await store.ensure("org/elsewhere")
    except ModelUnavailable as exc:
        print(exc)
    await store.close()
    print(sorted(m for m in sys.modules if m == "mlx" or m.startswith(("mlx.", "mlx_lm"))))

asyncio.run(main())
"""


def test_hub_ids_come_from_the_hub_cache_else_fail_in_one_line_when_offline(
    tmp_path: Path,
) -> None:
    """Needs a process of its own: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is
    imported. A model in the Hugging Face cache is used in place (no hub call); another fails
    with the hub's reason in one line; MLX is never imported."""
    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / "models--org--cached"
    snapshot = write_model(repo / "snapshots" / "0123abcd", model_files(1, 1000))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, str(tmp_path / "models")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    folder, failure, mlx = done.stdout.strip().splitlines()
    assert folder == str(snapshot)
    assert failure.startswith("no node holds org/elsewhere and the hub failed: ")
    assert "offline" in failure.lower()
    assert mlx == "[]"


# The store on the wire: heartbeats, Hello, manifests, load commands.


async def test_heartbeats_carry_room_holdings_and_copies_and_manifests_go_once(
    tmp_path: Path, peer: Peer
) -> None:
    root = tmp_path / "models"
    root.mkdir()
    held = seed_store(root, "/fleet/a", model_files(1, MIB), last_used=100.0)
    store = ModelStore(root, budget_bytes=8 * MIB, reserve_bytes=0)
    store.peer_tls = peer.client_tls
    try:
        status = status_to_pb(1, READING, {}, store)
        assert status.disk_room_bytes == 8 * MIB
        assert [
            (h.source, h.manifest_sha256, h.bytes, h.in_use, h.evictable)
            for h in status.held_models
        ] == [("/fleet/a", held.digest, MIB + 11, False, True)]
        assert list(status.copies) == []
        # A copy under way shows in the heartbeat, with where it comes from.
        await peer.start(rate_mib_s=2)  # 4 MiB take 2 s
        manifest, holders = await peer.offer("/fleet/b", model_files(2, 4 * MIB))
        copying = asyncio.create_task(store.ensure("/fleet/b", manifest, holders))
        for _ in range(300):
            if any(c.bytes_done for c in store.copies()):
                break
            await asyncio.sleep(0.01)
        [copy] = status_to_pb(2, READING, {}, store).copies
        assert (copy.source, copy.bytes_total, copy.origin) == ("/fleet/b", 4 * MIB + 11, "peer")
        assert list(copy.from_nodes) == ["holder"]
        assert 0 < copy.bytes_done < copy.bytes_total
        # Its bytes are set aside within the budget (a, unused, still counts as free).
        assert status_to_pb(3, READING, {}, store).disk_room_bytes == 8 * MIB - copy.bytes_total
        await copying
        assert store.copies() == []

        session = Session(
            "127.0.0.1:1",
            None,  # type: ignore[arg-type]  # Hello needs no identity
            FACTS,
            lambda: READING,
            lambda: [],
            lambda: {},
            store=store,
            files_url="https://10.0.0.2:40123",
        )
        first = await anext(session._requests())
        assert first.hello.files_url == "https://10.0.0.2:40123"
        session._send_manifests()
        session._send_manifests()  # once per connection: nothing new the second time
        sent = [session.outbound.get_nowait().manifest for _ in range(session.outbound.qsize())]
        assert sorted(Manifest.from_pb(m).digest for m in sent) == sorted(  # type: ignore[union-attr]
            [held.digest, manifest.digest]
        )
    finally:
        await store.close()


def test_a_load_command_carries_the_manifest_and_the_holders() -> None:
    manifest = Manifest.of("org/m", [ManifestFile("config.json", 2, "a" * 64)])
    message = pb.LoadModel(
        engine_id="e1",
        model="m",
        source="org/m",
        tier=pb.TIER_BATCH,
        context_length=512,
        manifest=manifest.to_pb(),
        holders=[pb.FileHolder(node_id="vm-1", url="https://10.0.0.1:4000")],
    )
    request = load_request(message)
    assert request.manifest == manifest
    assert request.holders == (Holder("vm-1", "https://10.0.0.1:4000"),)
    bare = load_request(pb.LoadModel(engine_id="e1", source="org/m", tier=pb.TIER_BATCH))
    assert (bare.manifest, bare.holders) == (None, ())
    # A manifest that cannot be trusted is dropped: no peer copy without one.
    bad = pb.ModelManifest(
        source="org/m", files=[pb.ModelFile(path="../x", size=1, sha256="a" * 64)]
    )
    message.manifest.CopyFrom(bad)
    assert load_request(message).manifest is None


async def test_an_engine_whose_files_are_being_copied_is_listed_as_starting(
    tmp_path: Path, store: ModelStore, peer: Peer
) -> None:
    """A Hello sent while an engine's files are still copying (the stream broke and came
    back) must list that engine, or the coordinator forgets it and places it again."""
    from node_agent.probes import local_probe
    from node_agent.supervisor import LoadRequest, Supervisor

    await peer.start(rate_mib_s=1)
    manifest, holders = await peer.offer("/fleet/slow", model_files(12, 3 * MIB))
    supervisor = Supervisor(local_probe(), lambda event: None, tmp_path / "logs", store=store)
    request = LoadRequest(
        "e-1", "m", "/fleet/slow", "interactive", 512, {}, manifest=manifest, holders=tuple(holders)
    )
    load = asyncio.create_task(supervisor.load(request))
    for _ in range(200):
        if store.copies():
            break
        await asyncio.sleep(0.02)
    assert [(i.engine_id, i.model, i.state) for i in supervisor.infos()] == [
        ("e-1", "m", "starting")
    ]
    assert supervisor.rss() == {}  # no process yet
    load.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await load
    assert supervisor.infos() == []
