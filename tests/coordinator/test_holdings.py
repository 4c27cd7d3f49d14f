"""Where model files are (issue 18): manifests kept per source, holders chosen best first,
placement preferring them, LoadModel carrying both, and what `mlxfleet models` and the
metrics show. The real reconciler, registry, store and gRPC conversion; no agent."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from coordinator.config import ModelSpec
from coordinator.grpc_service import command_to_pb, status_from_pb
from coordinator.holdings import FileCopy, HeldFiles, Holdings
from coordinator.registry import NodeId
from coordinator.store import Store
from mlxfleet.manifest import Manifest, ManifestFile
from mlxfleet.v1 import fleet_pb2 as pb
from tests.coordinator.test_fleet_metrics import samples, value
from tests.coordinator.test_placement_units import GIB, STATUS, Fleet, facts, model_folder

HASH_A, HASH_B = "a" * 64, "b" * 64


def manifest(source: str, sha: str = HASH_A, size: int = 3 * GIB) -> Manifest:
    return Manifest.of(source, [ManifestFile("model.safetensors", size, sha)])


def test_the_first_manifest_of_a_source_is_kept_and_outlives_a_restart(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    holdings = Holdings(store)
    holdings.note_manifest("vm-1", manifest("hub/m"))
    holdings.note_manifest("vm-2", manifest("hub/m", HASH_B))  # other files: not recorded
    assert holdings.manifest("hub/m") == manifest("hub/m")
    assert holdings.disk_bytes("hub/m") == 3 * GIB and holdings.disk_bytes("hub/other") == 0
    events = [e for e in store.events() if e.kind == "files_differ"]
    assert [(e.node_id, e.detail.split(":")[0]) for e in events] == [("vm-2", "hub/m")]
    holdings.note_manifest("vm-2", manifest("hub/m", HASH_B))  # reported once per node
    assert len([e for e in store.events() if e.kind == "files_differ"]) == 1
    again = Holdings(Store(tmp_path / "s.sqlite3"))
    assert again.manifest("hub/m") == manifest("hub/m")


def test_holders_are_live_nodes_with_matching_files_least_busy_servers_first(
    tmp_path: Path,
) -> None:
    fleet = Fleet(tmp_path)
    holdings = fleet.reconciler.holdings
    holdings.note_manifest("a", manifest("hub/m"))
    good = HeldFiles("hub/m", manifest("hub/m").digest, 3 * GIB)
    for node_id, role in (("a", "server"), ("b", "server"), ("c", "laptop"), ("d", "server")):
        fleet.join(node_id, facts(32, role=role))
        fleet.registry.nodes[NodeId(node_id)].files_url = f"https://{node_id}:1"
    nodes = fleet.registry.nodes
    for node_id in ("a", "b", "c"):
        fleet.registry.heartbeat(NodeId(node_id), replace(STATUS, held=(good,)), {})
    # d holds other files under the same source; e is copying from a.
    other = replace(good, digest=manifest("hub/m", HASH_B).digest)
    fleet.registry.heartbeat(NodeId("d"), replace(STATUS, held=(other,)), {})
    fleet.join("e", facts(32))
    copying = FileCopy("hub/m", GIB, 3 * GIB, 100e6, "peer", ("a",))
    fleet.registry.heartbeat(NodeId("e"), replace(STATUS, copies=(copying,)), {})
    assert holdings.holders("hub/m", nodes.values()) == [
        ("b", "https://b:1"),  # a server serving nothing
        ("a", "https://a:1"),  # a server serving e's copy
        ("c", "https://c:1"),  # a laptop last
    ]
    nodes[NodeId("b")].liveness = "suspect"
    assert [n for n, _ in holdings.holders("hub/m", nodes.values())] == ["a", "c"]
    files_on, copies = holdings.where("hub/m", nodes.values())
    assert files_on == ["a", "b", "c"]
    assert copies == {"e": "33% of 3.0 GiB from peer a at 95.4 MiB/s"}


def test_placement_prefers_the_holder_and_load_model_carries_manifest_and_holders(
    tmp_path: Path,
) -> None:
    source = model_folder(tmp_path, "m", 2 * GIB)
    fleet = Fleet(tmp_path, ModelSpec("m", source, "interactive"))
    files = manifest(source, size=2 * GIB)
    fleet.reconciler.holdings.note_manifest("small", files)
    fleet.join("big", facts(128))  # most headroom: spread would pick it
    fleet.join("small", facts(32))
    held = HeldFiles(source, files.digest, 2 * GIB)
    fleet.registry.heartbeat(NodeId("small"), replace(STATUS, held=(held,)), {})
    fleet.registry.nodes[NodeId("small")].files_url = "https://10.0.0.2:4000"
    fleet.reconciler.step()
    loads = fleet.loads()
    assert loads["big"] == [] and len(loads["small"]) == 1
    command = loads["small"][0]
    assert command.manifest == files
    assert command.holders == (("small", "https://10.0.0.2:4000"),)
    wire = command_to_pb(command).load
    assert Manifest.from_pb(wire.manifest) == files
    assert [(h.node_id, h.url) for h in wire.holders] == [("small", "https://10.0.0.2:4000")]


def test_a_node_without_disk_room_is_refused_with_the_reason_in_models_and_metrics(
    tmp_path: Path,
) -> None:
    source = model_folder(tmp_path, "m", 2 * GIB)
    fleet = Fleet(tmp_path, ModelSpec("m", source, "interactive"))
    fleet.reconciler.holdings.note_manifest("gone", manifest(source, size=int(41.2 * GIB)))
    fleet.join("vm-2", facts(64))
    status = replace(STATUS, disk_room_bytes=int(30.1 * GIB))
    fleet.registry.heartbeat(NodeId("vm-2"), status, {})
    fleet.reconciler.step()
    assert fleet.loads()["vm-2"] == []
    assert (
        "vm-2: needs 41.2 GiB of disk, has 30.1 GiB free"
        in fleet.reconciler.pending[("m", "interactive")]
    )
    found = samples(fleet)
    assert (
        value(
            found,
            "mlxfleet_unit_pending",
            model="m",
            tier="interactive",
            reason="insufficient_disk",
        )
        == 1
    )
    assert value(found, "mlxfleet_node_disk_room_bytes", node="vm-2") == int(30.1 * GIB)


def test_heartbeat_files_fields_cross_the_wire_and_feed_the_metrics(tmp_path: Path) -> None:
    message = pb.NodeStatus(
        available_bytes=GIB,
        disk_room_bytes=7 * GIB,
        held_models=[pb.HeldModel(source="/m", manifest_sha256=HASH_A, bytes=5, in_use=True)],
        copies=[
            pb.ModelCopy(
                source="/m",
                bytes_done=1,
                bytes_total=4,
                bytes_per_s=2.0,
                origin="peer",
                from_nodes=["a", "b"],
            )
        ],
    )
    status = status_from_pb(message)
    assert status.disk_room_bytes == 7 * GIB
    assert status.held == (HeldFiles("/m", HASH_A, 5, True, False),)
    assert status.copies == (FileCopy("/m", 1, 4, 2.0, "peer", ("a", "b")),)
    assert status_from_pb(pb.NodeStatus()).disk_room_bytes is None  # an older agent
    fleet = Fleet(tmp_path, ModelSpec("demo", "/m", "interactive"))
    fleet.join("n", facts(32))
    fleet.registry.heartbeat(NodeId("n"), status, {})
    found = samples(fleet)
    assert value(found, "mlxfleet_model_files_bytes", node="n", model="demo") == 5
    labels = {"node": "n", "model": "demo", "origin": "peer"}
    assert value(found, "mlxfleet_model_copy_bytes", **labels) == 1
    assert value(found, "mlxfleet_model_copy_size_bytes", **labels) == 4
    assert value(found, "mlxfleet_model_copy_rate_bytes_per_second", **labels) == 2.0
