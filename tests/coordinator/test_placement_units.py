"""Placement of units (model × tier) by the reconciler on the real registry, router and store.

Model folders hold a real config.json shape and a safetensors header that claims the weights'
size: sizing reads headers only, so no tensor bytes are needed (that is the point).
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from benchmarks.simulator import LLAMA3_8B
from coordinator.config import Config, ModelSpec
from coordinator.pki import FleetPki
from coordinator.reconcile import Reconciler
from coordinator.registry import (
    Engine,
    EngineId,
    LoadCommand,
    NodeId,
    NodeStatus,
    Registry,
    SetKnobsCommand,
    UnloadCommand,
)
from coordinator.routing import Routing
from coordinator.store import Store
from mlxfleet.facts import NodeFacts

GIB = 2**30
STATUS = NodeStatus(20 * GIB, 0, "normal", "nominal", "ac", False)


def model_folder(root: Path, name: str, weight_bytes: int, config: dict | None = None) -> str:
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config or LLAMA3_8B))
    header = json.dumps(
        {"w": {"dtype": "U8", "shape": [weight_bytes], "data_offsets": [0, weight_bytes]}}
    ).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return str(folder)


def facts(ram_gib: int, role: str = "server", **extra: object) -> NodeFacts:
    return NodeFacts(
        f"host-{ram_gib}",
        "Apple M2",
        "macOS",
        ram_gib * GIB,
        8,
        0,
        0.0,
        0,
        role,
        **extra,
    )  # type: ignore[arg-type]


class Fleet:
    def __init__(self, tmp_path: Path, *specs: ModelSpec, idle_unload_s: float = 180) -> None:
        self.routing = Routing(FleetPki.load_or_create(tmp_path).ca_cert_pem)
        self.registry = Registry(self.routing)
        self.store = Store(tmp_path / "s.sqlite3")
        self.config = Config(home=tmp_path, models=specs, idle_unload_s=idle_unload_s)
        self.reconciler = Reconciler(self.config, self.registry, self.store)

    def join(self, node_id: str, node_facts: NodeFacts) -> None:
        self.registry.connect(NodeId(node_id), node_facts, [])
        self.registry.heartbeat(NodeId(node_id), STATUS, {})

    def commands(self, node_id: str) -> list[object]:
        outbox = self.registry.nodes[NodeId(node_id)].outbox
        return [outbox.get_nowait() for _ in range(outbox.qsize())]

    def loads(self) -> dict[str, list[LoadCommand]]:
        return {
            n: [c for c in self.commands(n) if isinstance(c, LoadCommand)]
            for n in list(self.registry.nodes)
        }

    def ready(self, engine_id: str) -> None:
        engine = self.registry.engines[EngineId(engine_id)]
        self.registry.upsert_engine(
            Engine(
                engine.engine_id,
                engine.model,
                engine.node_id,
                engine.tier,
                "ready",
                url="http://127.0.0.1:9",
            )
        )
        self.reconciler.engine_ready((engine.model, engine.tier))  # type: ignore[arg-type]


def test_units_go_where_weights_and_kv_fit_by_tier_policy(tmp_path: Path) -> None:
    source = model_folder(tmp_path, "llama", 5 * GIB)
    fleet = Fleet(
        tmp_path, ModelSpec("llama", source, "interactive"), ModelSpec("llama", source, "batch")
    )
    # Footprints: interactive 5 GiB + KV 8192 x 4 x 128 KiB (4 GiB) + overhead = 9.4 GiB;
    # batch 5 GiB + KV for 12 sequences (12 GiB) + overhead = 17.4 GiB.
    fleet.join("mini-16", facts(16))  # budget 8 GiB: neither fits
    fleet.join("mini-32", facts(32))  # budget 24 GiB
    fleet.join("studio-128", facts(128))  # budget 120 GiB
    fleet.join("laptop-96", facts(96, role="laptop"))  # not opted in: no interactive, no batch
    fleet.reconciler.step()
    loads = fleet.loads()
    # interactive spreads to the most headroom; batch packs into the tightest server that fits
    assert [c.tier for c in loads["studio-128"]] == ["interactive"]
    assert [c.tier for c in loads["mini-32"]] == ["batch"]
    assert loads["laptop-96"] == [] and loads["mini-16"] == []
    interactive, batch = loads["studio-128"][0], loads["mini-32"][0]
    assert interactive.context_length == 8192  # the default, within what the model supports
    assert (interactive.knobs.max_concurrency, interactive.knobs.batch_window_ms) == (4, 0)
    assert (batch.knobs.max_concurrency, batch.knobs.batch_window_ms) == (12, 80)
    assert fleet.reconciler.pending == {}


def test_a_unit_that_fits_nowhere_stays_pending_naming_the_shortfall(tmp_path: Path) -> None:
    big = model_folder(tmp_path, "big", 40 * GIB)
    small = model_folder(tmp_path, "small", GIB)
    fleet = Fleet(tmp_path, ModelSpec("big", big), ModelSpec("small", small))
    fleet.join("studio", facts(48))  # budget 40 GiB: weights fit, weights + KV + overhead don't
    fleet.reconciler.step()
    reason = fleet.reconciler.pending[("big", "interactive")]
    assert reason.startswith("1 of 1 replicas unplaced: needs 4")
    assert "best node studio has 40.0 GiB free" in reason
    assert [c.model for c in fleet.loads()["studio"]] == ["small"]  # the rest still placed


def test_bad_units_are_refused_by_name_and_move_nothing(tmp_path: Path) -> None:
    good = model_folder(tmp_path, "good", GIB)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(LLAMA3_8B))
    fleet = Fleet(
        tmp_path,
        ModelSpec("good", good),
        ModelSpec("long", good, context_length=32768),
        ModelSpec("noweights", str(empty)),
        ModelSpec("three", good, "batch", replicas=3),
        ModelSpec("east", good, required_labels={"site": "east"}),
    )
    fleet.join("a", facts(64))
    fleet.join("b", facts(64))
    fleet.reconciler.step()
    pending = fleet.reconciler.pending
    assert pending[("long", "interactive")] == (
        "long: context_length 32768 is larger than the model supports (8192)"
    )
    assert "no .safetensors weights" in pending[("noweights", "interactive")]
    assert pending[("three", "batch")].startswith("1 of 3 replicas unplaced")
    assert "lacks label site=east" in pending[("east", "interactive")]
    placed = sorted(c.model for cmds in fleet.loads().values() for c in cmds)
    assert placed == ["good", "three", "three"]


def test_idle_units_unload_and_a_request_wakes_them(tmp_path: Path) -> None:
    source = model_folder(tmp_path, "m", GIB)
    fleet = Fleet(
        tmp_path, ModelSpec("m", source), ModelSpec("pin", source, pinned=True), idle_unload_s=60
    )
    fleet.join("a", facts(64))
    fleet.reconciler.step()
    for load in fleet.loads()["a"]:
        fleet.ready(load.engine_id)
    for usage in fleet.reconciler.usage.values():
        usage.last_used -= 61
    fleet.reconciler.step()
    unloads = [c for c in fleet.commands("a") if isinstance(c, UnloadCommand)]
    assert len(unloads) == 1 and unloads[0].engine_id.startswith("m-i-")  # the pinned one stays
    assert fleet.reconciler.is_asleep(("m", "interactive"))
    fleet.reconciler.step()
    assert fleet.loads()["a"] == []  # asleep: not loaded again by itself
    fleet.reconciler.wake(("m", "interactive"))
    fleet.reconciler.step()
    assert [c.model for c in fleet.loads()["a"]] == ["m"]


def test_least_recently_used_idle_unit_is_evicted_to_make_room(tmp_path: Path) -> None:
    source = model_folder(tmp_path, "m", 5 * GIB)
    fleet = Fleet(
        tmp_path,
        ModelSpec("a-old", source),
        ModelSpec("b-recent", source),
        ModelSpec("c-new", source),
    )
    fleet.join("a", facts(28))  # budget 20 GiB: two 9.4 GiB engines, not three
    fleet.reconciler.step()
    loads = fleet.loads()["a"]
    assert sorted(c.model for c in loads) == ["a-old", "b-recent"]  # same size: by name
    for load in loads:
        fleet.ready(load.engine_id)
    pending = fleet.reconciler.pending[("c-new", "interactive")]
    assert pending.startswith("1 of 1 replicas unplaced")
    fleet.reconciler.usage[("a-old", "interactive")].last_used -= 100
    fleet.reconciler.usage[("b-recent", "interactive")].last_used -= 10
    fleet.reconciler.step()
    commands = fleet.commands("a")
    evicted = [c.engine_id for c in commands if isinstance(c, UnloadCommand)]
    assert len(evicted) == 1 and evicted[0].startswith("a-old-")
    assert fleet.reconciler.is_asleep(("a-old", "interactive"))
    # Its memory counts until the engine has exited: only then does the new unit load.
    assert not any(isinstance(c, LoadCommand) for c in commands)
    fleet.registry.drop_engine(EngineId(evicted[0]))  # the agent reported the exit
    fleet.reconciler.step()
    assert [c.model for c in fleet.loads()["a"]] == ["c-new"]


def serving_on(tmp_path: Path, node: str, ram_gib: int) -> tuple[Fleet, LoadCommand]:
    """A fleet of one node whose single 1 GiB replica of "m" is loaded and ready."""
    fleet = Fleet(tmp_path, ModelSpec("m", model_folder(tmp_path, "m", GIB)))
    fleet.join(node, facts(ram_gib))
    fleet.reconciler.step()
    [first] = fleet.loads()[node]
    fleet.ready(first.engine_id)
    return fleet, first


def test_drain_moves_a_replica_only_once_its_replacement_is_ready(tmp_path: Path) -> None:
    fleet, first = serving_on(tmp_path, "a", 64)
    fleet.join("b", facts(32))
    fleet.reconciler.step()
    assert fleet.loads() == {"a": [], "b": []}  # busy (just loaded): no rebalance
    fleet.registry.nodes[NodeId("a")].cordoned = True
    fleet.reconciler.step()
    [replacement] = fleet.loads()["b"]
    assert fleet.commands("a") == []  # the old engine serves until the new one is ready
    assert fleet.routing.units() == {("m", "interactive")}
    fleet.ready(replacement.engine_id)
    fleet.reconciler.step()
    assert fleet.commands("a") == [UnloadCommand(first.engine_id)]


def test_a_joining_node_takes_an_idle_unit_the_policy_now_prefers(tmp_path: Path) -> None:
    fleet, first = serving_on(tmp_path, "small", 24)
    fleet.reconciler.usage[("m", "interactive")].last_used = time.monotonic() - 60  # idle
    fleet.join("big", facts(128))  # more headroom: interactive spreads there
    fleet.reconciler.step()
    [moved] = fleet.loads()["big"]
    assert fleet.commands("small") == []
    fleet.reconciler.step()  # the move is remembered: no second engine, no trim of the new one
    assert fleet.commands("small") == [] and fleet.loads()["big"] == []
    fleet.ready(moved.engine_id)
    fleet.reconciler.step()
    assert fleet.commands("small") == [UnloadCommand(first.engine_id)]
    assert fleet.registry.engines[EngineId(moved.engine_id)].state == "ready"


def test_tier_knobs_change_on_running_engines_without_reload(tmp_path: Path) -> None:
    source = model_folder(tmp_path, "m", GIB)
    fleet = Fleet(tmp_path, ModelSpec("m", source, "batch"), ModelSpec("m", source))
    fleet.join("a", facts(64))
    fleet.reconciler.step()
    loads = fleet.loads()["a"]
    for load in loads:
        fleet.ready(load.engine_id)
    knobs = fleet.reconciler.set_tier_knobs("batch", {"batch_window_ms": 200})
    assert knobs.batch_window_ms == 200 and knobs.max_batch_size == 12
    [command] = fleet.commands("a")
    assert isinstance(command, SetKnobsCommand)
    assert command.engine_id.startswith("m-b-") and command.knobs.batch_window_ms == 200
    assert fleet.store.tier_knobs() == {"batch": {"batch_window_ms": 200}}
    fleet.reconciler.step()
    assert fleet.commands("a") == []  # nothing reloaded


def test_a_request_waits_only_while_an_engine_is_on_its_way(tmp_path: Path) -> None:
    """What the gateway asks before holding a request (coordinator/gateway/forward.py)."""
    source = model_folder(tmp_path, "m", GIB)
    big = model_folder(tmp_path, "big", 200 * GIB)
    fleet = Fleet(tmp_path, ModelSpec("m", source), ModelSpec("big", big))
    key = ("m", "interactive")
    assert not fleet.reconciler.expecting(("nope", "interactive"))  # not in the config
    assert fleet.reconciler.expecting(key)  # sizing, then placing at the next step
    fleet.join("a", facts(64))
    fleet.reconciler.step()
    [load] = [c for c in fleet.loads()["a"] if c.model == "m"]
    assert fleet.reconciler.expecting(key)  # starting on node a
    fleet.ready(load.engine_id)
    fleet.registry.drop_engine(load.engine_id)  # it crashed: the agent reported its exit
    fleet.reconciler.engine_failed(key)
    assert fleet.reconciler.expecting(key)  # its restart waits out the backoff
    time.sleep(0.6)  # the first backoff, 0.5 s
    fleet.reconciler.step()
    assert fleet.reconciler.expecting(key)  # starting again
    # No node can hold 200 GiB: nothing is coming, a request is answered at once.
    assert fleet.reconciler.pending[("big", "interactive")].startswith("1 of 1 replicas unplaced")
    assert not fleet.reconciler.expecting(("big", "interactive"))
