"""The protobuf edge: NodeFacts and the enums cross the wire and come back unchanged."""

from __future__ import annotations

import dataclasses
import typing

from mlxfleet.engines import EngineState, EventKind, ExitReason
from mlxfleet.facts import NodeFacts
from mlxfleet.v1 import fleet_pb2 as pb
from mlxfleet.wire import enum_name, enum_value, facts_from_pb, facts_to_pb


def test_node_facts_has_exactly_the_messages_fields() -> None:
    message = {f.name for f in pb.NodeFacts.DESCRIPTOR.fields}
    assert message == {f.name for f in dataclasses.fields(NodeFacts)}


def test_node_facts_round_trip_through_the_wire() -> None:
    facts = NodeFacts(
        "mini-1", "Apple M2 Pro", "macOS 15.1", 32 * 2**30, 8, 19, 200.0, 24 * 2**30, "server",
        "0.32.4", "0.32.2", "1.0", {"site": "east"}, True, 6 * 2**30,
    )  # fmt: skip
    wire = pb.NodeFacts.FromString(facts_to_pb(facts).SerializeToString())
    assert wire.role == pb.ROLE_SERVER and dict(wire.labels) == {"site": "east"}
    assert facts_from_pb(wire) == facts


def test_an_unset_or_unknown_enum_reads_unknown() -> None:
    assert facts_from_pb(pb.NodeFacts(hostname="h")).role == "unknown"
    assert enum_name(pb.MemoryPressure, 99, "MEMORY_PRESSURE_") == "unknown"
    assert enum_value(pb.MemoryPressure, "MEMORY_PRESSURE_", "unknown") == 0
    for name in ("normal", "warning", "critical"):
        value = enum_value(pb.MemoryPressure, "MEMORY_PRESSURE_", name)
        assert value > 0 and enum_name(pb.MemoryPressure, value, "MEMORY_PRESSURE_") == name


def test_every_engine_word_has_its_wire_enum_member() -> None:
    """What an agent says of its engines (mlxfleet/engines.py) crosses the wire unchanged: a
    word with no member would arrive as "unknown"."""
    for words, enum, prefix in (
        (EngineState, pb.EngineState, "ENGINE_STATE_"),
        (EventKind, pb.EngineEvent.Kind, "KIND_"),
        (ExitReason, pb.ExitReason, "EXIT_REASON_"),
    ):
        for word in typing.get_args(words):
            assert enum_name(enum, enum_value(enum, prefix, word), prefix) == word
    assert enum_value(pb.ExitReason, "EXIT_REASON_", "hung") == pb.EXIT_REASON_HUNG
