"""A model no single node holds runs as one pipeline group over several nodes, driven step by
step on the real reconciler, registry, router and store (coordinator/group_engines.py).

The model's folder claims 5 GiB of weights (tests/coordinator/test_placement_units.py): one
interactive engine needs 9.8 GiB, 2.3 GiB of it shared by every rank, over 32 layers. Nodes of
16 and 17 GiB of RAM have 8 and 9 GiB budgets: neither holds it, the two together do.
"""

from __future__ import annotations

import types
from dataclasses import replace
from pathlib import Path

import pytest

from coordinator import group_engines, holds
from coordinator.config import Config, ModelSpec
from coordinator.grpc_service import command_to_pb, engine_from_pb, group_to_pb
from coordinator.memory import OS_RESERVE_BYTES
from coordinator.nodes import model_rows
from coordinator.pki import FleetPki
from coordinator.policy import UnitKey
from coordinator.reconcile import Reconciler
from coordinator.registry import (
    EngineId,
    GroupMemberCommand,
    LoadCommand,
    NodeId,
    Registry,
    SetKnobsCommand,
    UnloadCommand,
)
from coordinator.routing import Routing
from coordinator.store import Store
from mlxfleet.v1 import fleet_pb2 as pb
from tests.coordinator.test_placement_units import GIB, STATUS, facts, model_folder

KEY: UnitKey = ("big", "interactive")
STALL_S = 7.5  # not the default, so the commands are seen to carry the config's


class GroupFleet:
    """The coordinator's reconcile side on fake nodes whose outboxes the test reads."""

    def __init__(self, tmp_path: Path, *, pinned: bool = True, idle_unload_s: float = 180) -> None:
        source = model_folder(tmp_path, "big", 5 * GIB)
        self.spec = ModelSpec("big", source, pinned=pinned)
        self.routing = Routing(FleetPki.load_or_create(tmp_path).ca_cert_pem)
        self.registry = Registry(self.routing)
        self.config = Config(
            home=tmp_path,
            models=(self.spec,),
            idle_unload_s=idle_unload_s,
            stream_stall_s=STALL_S,
        )
        self.reconciler = Reconciler(self.config, self.registry, Store(tmp_path / "s.sqlite3"))

    def join(self, node_id: str, ram_gib: int) -> None:
        self.registry.connect(NodeId(node_id), facts(ram_gib), [])
        self.registry.nodes[NodeId(node_id)].link_address = f"10.0.0.{ram_gib}:7400"
        self.registry.heartbeat(NodeId(node_id), STATUS, {})

    def commands(self) -> dict[str, list[object]]:
        """What each node was sent since the last call."""
        sent: dict[str, list[object]] = {}
        for node_id, node in self.registry.nodes.items():
            sent[node_id] = [node.outbox.get_nowait() for _ in range(node.outbox.qsize())]
        return sent

    def step(self) -> dict[str, list[object]]:
        self.reconciler.step()
        return self.commands()

    def ready(self, engine_id: str) -> None:
        """The engine's agent reported it ready (grpc_service's `ready` event)."""
        engine = self.registry.engines[EngineId(engine_id)]
        self.registry.upsert_engine(
            replace(engine, state="ready", url=f"http://10.0.0.9:{9000 + engine.rank}")
        )
        if engine.serves:
            self.reconciler.engine_ready(KEY)

    def exited(self, engine_id: str, failed: bool = True) -> None:
        """The engine's agent reported it gone (grpc_service's exit event)."""
        self.registry.drop_engine(EngineId(engine_id))
        if failed:
            self.reconciler.engine_failed(KEY)

    def group_id(self) -> str:
        [group_id] = self.reconciler.groups.groups
        return group_id


def placed_pair(
    tmp_path: Path, *, pinned: bool = True, idle_unload_s: float = 180
) -> tuple[GroupFleet, str]:
    """Nodes a (16 GiB) and b (17 GiB), and the group one step placed over them."""
    fleet = GroupFleet(tmp_path, pinned=pinned, idle_unload_s=idle_unload_s)
    fleet.join("a", 16)
    fleet.join("b", 17)
    fleet.step()
    return fleet, fleet.group_id()


def loads(sent: dict[str, list[object]]) -> dict[str, list[LoadCommand]]:
    return {n: [c for c in cs if isinstance(c, LoadCommand)] for n, cs in sent.items() if cs}


def test_a_model_no_node_holds_is_placed_as_one_group_over_two(tmp_path: Path) -> None:
    fleet = GroupFleet(tmp_path)
    fleet.join("a", 16)
    fleet.join("b", 17)
    sent = fleet.step()

    [group_id] = fleet.reconciler.groups.groups
    placement = fleet.reconciler.groups.groups[group_id].placement
    # b has the larger budget (9 GiB to 8): it serves as rank 0 and runs the last layers,
    # 32 split 17:15 by free bytes; rank 1 runs the first ones.
    assert [(s.node_id, s.rank, s.first_layer, s.layers) for s in placement.shares] == [
        ("b", 0, 15, 17),
        ("a", 1, 0, 15),
    ]
    members = (
        GroupMemberCommand(0, "b", "10.0.0.17:7400", 15, 17),
        GroupMemberCommand(1, "a", "10.0.0.16:7400", 0, 15),
    )
    [rank0] = sent["b"]
    [rank1] = sent["a"]
    assert isinstance(rank0, LoadCommand) and isinstance(rank1, LoadCommand)
    assert rank0.engine_id == group_id and rank1.engine_id == f"{group_id}-r1"
    assert rank0.group is not None and rank1.group is not None
    assert (rank0.group.group_id, rank0.group.rank, rank0.group.stall_s) == (group_id, 0, STALL_S)
    assert (rank1.group.group_id, rank1.group.rank, rank1.group.stall_s) == (group_id, 1, STALL_S)
    assert rank0.group.members == rank1.group.members == members
    assert (rank0.model, rank0.tier) == (rank1.model, rank1.tier) == KEY

    engines = {
        e.engine_id: (e.node_id, e.state, e.group_id, e.rank, e.serves)
        for e in fleet.registry.engines.values()
    }
    assert engines == {
        group_id: ("b", "starting", group_id, 0, True),
        f"{group_id}-r1": ("a", "starting", group_id, 1, False),
    }
    assert fleet.reconciler.pending == {}

    # Rank 1 is no second replica: with room for another group on c and d, nothing more is
    # placed and nothing is trimmed.
    fleet.join("c", 16)
    fleet.join("d", 17)
    assert fleet.step() == {"a": [], "b": [], "c": [], "d": []}
    fleet.ready(group_id)
    fleet.ready(f"{group_id}-r1")
    assert fleet.step() == {"a": [], "b": [], "c": [], "d": []}
    assert list(fleet.reconciler.groups.groups) == [group_id]
    assert {e.state for e in fleet.registry.engines.values()} == {"ready"}


def test_each_member_is_charged_its_share_not_the_whole_model(tmp_path: Path) -> None:
    fleet, group_id = placed_pair(tmp_path)
    size = fleet.reconciler.size(fleet.spec)
    assert isinstance(size, int)
    shares = {s.node_id: s.bytes for s in fleet.reconciler.groups.groups[group_id].placement.shares}
    shared = 2_470_453_248  # memory.pipeline_shape: embeddings, LM head, engine overhead
    per_layer = -(-(size - shared) // 32)
    assert shares == {"b": shared + 17 * per_layer, "a": shared + 15 * per_layer}
    assert max(shares.values()) < size
    budgets = {"a": 16 * GIB - OS_RESERVE_BYTES, "b": 17 * GIB - OS_RESERVE_BYTES}
    free = {o.node_id: o.free_bytes for o in fleet.reconciler.offers()}
    assert free == {n: budgets[n] - shares[n] for n in ("a", "b")}
    # A member told to stop holds its memory until it exits.
    fleet.registry.upsert_engine(
        replace(fleet.registry.engines[EngineId(f"{group_id}-r1")], state="stopping")
    )
    assert {o.node_id: o.free_bytes for o in fleet.reconciler.offers()} == free


def test_a_member_that_exits_takes_the_group_down_and_it_is_placed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(holds, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    fleet, group_id = placed_pair(tmp_path)
    fleet.ready(group_id)
    fleet.ready(f"{group_id}-r1")
    assert fleet.routing.units() == {KEY}

    fleet.exited(f"{group_id}-r1")  # crashed on a
    assert fleet.step() == {"a": [], "b": [UnloadCommand(EngineId(group_id))]}
    assert fleet.registry.engines[EngineId(group_id)].state == "stopping"
    assert fleet.routing.units() == set()
    assert fleet.step() == {"a": [], "b": []}  # told once, not again
    assert fleet.step() == {"a": [], "b": []}
    assert list(fleet.reconciler.groups.groups) == [group_id]  # rank 0 still finishing

    fleet.exited(group_id, failed=False)  # it finished and exited cleanly
    assert fleet.step() == {"a": [], "b": []}  # backing off after the crash
    assert fleet.reconciler.groups.groups == {}
    assert fleet.reconciler.expecting(KEY)

    clock[0] += holds.RELOAD_BACKOFF_S[0]
    sent = loads(fleet.step())
    [new_group] = fleet.reconciler.groups.groups
    assert new_group != group_id
    assert {n: [c.engine_id for c in cs] for n, cs in sent.items()} == {
        "b": [new_group],
        "a": [f"{new_group}-r1"],
    }


def test_an_idle_group_is_told_through_rank_0_and_rank_1_goes_once_it_has(
    tmp_path: Path,
) -> None:
    fleet, group_id = placed_pair(tmp_path, pinned=False, idle_unload_s=0)
    fleet.ready(group_id)
    fleet.ready(f"{group_id}-r1")
    assert fleet.step() == {"a": [], "b": [UnloadCommand(EngineId(group_id))]}
    states = {e.engine_id: e.state for e in fleet.registry.engines.values()}
    assert states == {group_id: "stopping", f"{group_id}-r1": "stopping"}
    assert fleet.reconciler.is_asleep(KEY)
    assert fleet.step() == {"a": [], "b": []}  # rank 0 stops rank 1 when it is done

    fleet.exited(group_id, failed=False)
    assert fleet.step() == {"a": [UnloadCommand(EngineId(f"{group_id}-r1"))], "b": []}
    assert fleet.step() == {"a": [], "b": []}
    fleet.exited(f"{group_id}-r1", failed=False)
    assert fleet.step() == {"a": [], "b": []}  # asleep: nothing placed until a request
    assert fleet.reconciler.groups.groups == {}


def test_a_removed_groups_rank_1_is_stopped_by_rank_0_not_by_the_coordinator(
    tmp_path: Path,
) -> None:
    fleet, group_id = placed_pair(tmp_path)
    fleet.ready(group_id)
    fleet.ready(f"{group_id}-r1")
    fleet.reconciler.set_units([])
    sent = fleet.step()
    states = {e.engine_id: e.state for e in fleet.registry.engines.values()}
    assert states == {group_id: "stopping", f"{group_id}-r1": "stopping"}
    assert sent == {"a": [], "b": [UnloadCommand(EngineId(group_id))]}


def test_a_cordoned_member_moves_the_whole_group_once_its_replacement_serves(
    tmp_path: Path,
) -> None:
    fleet, group_id = placed_pair(tmp_path)
    fleet.ready(group_id)
    fleet.ready(f"{group_id}-r1")
    fleet.join("c", 16)
    fleet.join("d", 17)
    fleet.step()

    fleet.registry.set_cordoned(NodeId("a"), True)  # rank 1's node
    sent = loads(fleet.step())
    new_group = next(g for g in fleet.reconciler.groups.groups if g != group_id)
    assert {n: [(c.engine_id, c.group and c.group.rank) for c in cs] for n, cs in sent.items()} == {
        "d": [(new_group, 0)],
        "c": [(f"{new_group}-r1", 1)],
    }
    assert fleet.registry.engines[EngineId(group_id)].state == "ready"  # still serving
    assert list(fleet.routing._targets) == [group_id]
    empty: dict[str, list[object]] = {"a": [], "b": [], "c": [], "d": []}
    assert fleet.step() == empty  # the replacement is loading: the old group stays

    fleet.ready(f"{new_group}-r1")
    assert fleet.step() == empty  # rank 1 ready is not the group ready
    fleet.ready(new_group)
    assert fleet.step() == {**empty, "b": [UnloadCommand(EngineId(group_id))]}
    assert fleet.registry.engines[EngineId(f"{group_id}-r1")].state == "stopping"
    assert fleet.step() == empty
    fleet.exited(group_id, failed=False)
    assert fleet.step() == {**empty, "a": [UnloadCommand(EngineId(f"{group_id}-r1"))]}
    fleet.exited(f"{group_id}-r1", failed=False)
    assert fleet.step() == empty
    assert list(fleet.reconciler.groups.groups) == [new_group]
    assert {t.engine_id for t in fleet.routing._targets.values()} == {new_group}


def old_hellos(layout: bool, ranks: tuple[int, ...] = (0, 1)) -> dict[str, pb.EngineInfo]:
    """What the agents of nodes b (rank 0, 17 layers) and a (rank 1, 15) list after a
    coordinator restart for a group "old" of the model; `layout`: with the group's layout."""
    told = {"group_split": [17, 15], "group_nodes": ["b", "a"]} if layout else {}
    return {
        node: pb.EngineInfo(
            engine_id="old" if rank == 0 else f"old-r{rank}",
            model="big",
            tier=pb.TIER_INTERACTIVE,
            state=pb.ENGINE_STATE_READY,
            url="http://10.0.0.17:9000" if rank == 0 else "",  # only rank 0 serves
            group_id="old",
            rank=rank,
            **told,
        )
        for node, rank in (("b", 0), ("a", 1))
        if rank in ranks
    }


def restarted(tmp_path: Path, hellos: dict[str, pb.EngineInfo]) -> GroupFleet:
    """A coordinator with no record of the group, nodes a and b connected with `hellos`."""
    fleet = GroupFleet(tmp_path)
    for node_id, ram in (("a", 16), ("b", 17)):
        engines = [engine_from_pb(NodeId(node_id), hellos[node_id])] if node_id in hellos else []
        fleet.registry.connect(NodeId(node_id), facts(ram), engines)
        fleet.registry.nodes[NodeId(node_id)].link_address = f"10.0.0.{ram}:7400"
        fleet.registry.heartbeat(NodeId(node_id), STATUS, {})
    return fleet


def test_a_group_from_before_a_restart_is_taken_back_when_every_rank_reports_alike(
    tmp_path: Path,
) -> None:
    """A coordinator restart must not reload a model spread over several Macs: the ranks
    report the layout they were told; all of them alike, the group is this coordinator's."""
    fleet = restarted(tmp_path, old_hellos(layout=True))
    sent = fleet.step()
    assert not any(cs for cs in sent.values()), sent  # nothing unloaded, nothing placed
    running = fleet.reconciler.groups.groups["old"]
    assert [(s.node_id, s.rank, s.first_layer, s.layers) for s in running.placement.shares] == [
        ("b", 0, 15, 17),
        ("a", 1, 0, 15),
    ]
    assert fleet.reconciler.groups.weight(fleet.registry.engines[EngineId("old-r1")]) == (
        running.placement.shares[1].bytes
    )
    assert fleet.routing.units() == {KEY}
    assert KEY not in fleet.reconciler.pending
    assert fleet.step() == {"a": [], "b": []}


@pytest.mark.parametrize(
    "hellos",
    [old_hellos(layout=False), old_hellos(layout=True, ranks=(0,))],
    ids=["no-layout", "rank-1-missing"],
)
def test_engines_of_a_group_this_coordinator_did_not_place_are_unloaded(
    hellos: dict[str, pb.EngineInfo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a coordinator restart the agents' Hellos list the ranks of a group it has no
    record of: without its layout (an agent from before it was reported), or with a rank
    that does not come back within RESTORE_GRACE_S, it cannot be taken back, so its ranks go."""
    clock = [1000.0]
    monkeypatch.setattr(group_engines, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    fleet = restarted(tmp_path, hellos)
    assert fleet.registry.engines[EngineId("old")].group_id == "old"
    waited = fleet.step()  # a rank may still be on its way back
    assert not any(isinstance(c, UnloadCommand) for cs in waited.values() for c in cs)
    clock[0] += holds.RESTORE_GRACE_S
    sent = fleet.step()
    assert sent["b"][0] == UnloadCommand(EngineId("old"))
    ranks = {"old": "stopping"}
    if "a" in hellos:
        assert sent["a"][0] == UnloadCommand(EngineId("old-r1"))
        ranks["old-r1"] = "stopping"
    assert {e.engine_id: e.state for e in fleet.registry.engines.values()} == ranks
    assert fleet.routing.units() == set()
    assert not any(isinstance(c, UnloadCommand) for cs in fleet.step().values() for c in cs)

    # Once they have exited, the unit is placed afresh as a group of this coordinator's.
    fleet.exited("old", failed=False)
    if "a" in hellos:
        fleet.exited("old-r1", failed=False)
    placed = loads(fleet.step())
    [new_group] = fleet.reconciler.groups.groups
    assert {n: [c.engine_id for c in cs] for n, cs in placed.items()} == {
        "b": [new_group],
        "a": [f"{new_group}-r1"],
    }


def test_only_rank_0_is_routed_and_takes_knob_changes(tmp_path: Path) -> None:
    fleet, group_id = placed_pair(tmp_path)
    fleet.ready(f"{group_id}-r1")
    assert fleet.routing._targets == {}
    fleet.ready(group_id)
    assert list(fleet.routing._targets) == [group_id]
    assert fleet.routing.units() == {KEY}

    knobs = fleet.reconciler.set_tier_knobs("interactive", {"max_concurrency": 2})
    assert knobs.max_concurrency == 2
    assert fleet.commands() == {"b": [SetKnobsCommand(EngineId(group_id), knobs)], "a": []}


def test_model_rows_and_the_wire_show_each_member(tmp_path: Path) -> None:
    fleet, group_id = placed_pair(tmp_path)
    placement = fleet.reconciler.groups.groups[group_id].placement
    b_bytes, a_bytes = (s.bytes for s in placement.shares)
    [row] = model_rows(fleet.reconciler, fleet.registry, fleet.routing)
    assert row["groups"] == [
        {
            "group": group_id,
            "members": [
                {"node": "b", "rank": 0, "layers": "15-31", "bytes": b_bytes},
                {"node": "a", "rank": 1, "layers": "0-14", "bytes": a_bytes},
            ],
        }
    ]
    assert row["engines"] == ["b: starting (rank 0)", "a: starting (rank 1)"]
    assert row["state"] == "loading" and row["pending"] is None

    command = fleet.reconciler.groups.command(fleet.reconciler.groups.groups[group_id], 1)
    message = pb.EngineGroup.FromString(group_to_pb(command).SerializeToString())
    assert (message.group_id, message.rank, message.stall_s) == (group_id, 1, STALL_S)
    assert [
        (m.rank, m.node_id, m.link_address, m.first_layer, m.layers) for m in message.members
    ] == [(0, "b", "10.0.0.17:7400", 15, 17), (1, "a", "10.0.0.16:7400", 0, 15)]
    load = LoadCommand(
        EngineId(f"{group_id}-r1"),
        "big",
        fleet.spec.source,
        "interactive",
        8192,
        fleet.reconciler.knobs("interactive"),
        group=command,
    )
    wire = pb.CoordinatorMessage.FromString(command_to_pb(load).SerializeToString())
    assert wire.load.group == message
    no_group = pb.CoordinatorMessage.FromString(
        command_to_pb(replace(load, group=None)).SerializeToString()
    )
    assert not no_group.load.HasField("group")


def test_a_model_that_cannot_split_is_not_placed_as_a_group_again_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank exited with EXIT_CANNOT_SPLIT (grpc_service): placement keeps the model to
    single nodes, as sharding = "never" would; other files under the same name may split."""
    clock = [1000.0]
    monkeypatch.setattr(holds, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    fleet, group_id = placed_pair(tmp_path)
    fleet.reconciler.cannot_split(fleet.spec, "big engine: crash: mamba models keep ArraysCache")
    fleet.exited(f"{group_id}-r1")
    fleet.exited(group_id)
    clock[0] += max(holds.RELOAD_BACKOFF_S)  # past any backoff
    sent = fleet.step()
    assert loads(sent) == {} and fleet.reconciler.groups.groups == {}
    assert fleet.reconciler.sharding(fleet.spec) == "never"
    assert fleet.reconciler.pending[KEY].startswith("1 of 1 replicas unplaced: needs 9.8 GiB")
    assert fleet.reconciler.sharding(replace(fleet.spec, tier="batch")) == "never"  # same files
    other = replace(fleet.spec, source=str(model_folder(tmp_path, "other", 5 * GIB)))
    assert fleet.reconciler.sharding(other) == "auto"


def test_a_group_of_a_model_set_to_sharding_never_is_replaced_by_a_single_node(
    tmp_path: Path,
) -> None:
    """sharding = "never" at runtime: a node that holds the model alone takes it, and the
    group serves until that engine is ready, then goes (rank 0 first, the others with it)."""
    fleet, group_id = placed_pair(tmp_path)
    fleet.ready(group_id)
    fleet.ready(f"{group_id}-r1")
    fleet.join("c", 32)  # a 24 GiB budget: holds the 9.8 GiB engine alone
    fleet.reconciler.set_units([replace(fleet.spec, sharding="never")])
    sent = loads(fleet.step())
    [single] = sent["c"]
    assert single.group is None and "a" not in sent and "b" not in sent
    assert fleet.registry.engines[EngineId(group_id)].state == "ready"  # serves meanwhile
    fleet.ready(single.engine_id)
    sent = fleet.step()
    assert UnloadCommand(EngineId(group_id)) in sent["b"]
    assert fleet.routing.units() == {KEY}
