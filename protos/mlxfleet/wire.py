"""The protobuf edge both sides share: enum names both ways, NodeFacts both ways.

Python code on either side speaks in lower-case names ("warning", "batch", "server"); the wire
carries the protobuf enums of protos/mlxfleet/v1/fleet.proto. These helpers are the only
translation between the two, so an agent and a coordinator can never disagree on one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mlxfleet.facts import NodeFacts
from mlxfleet.v1 import fleet_pb2 as pb

# NodeFacts fields that cross the wire as they are (role and labels need converting).
_PLAIN_FACTS = tuple(
    f.name for f in dataclasses.fields(NodeFacts) if f.name not in ("role", "labels")
)


def enum_value(enum: Any, prefix: str, name: str) -> int:
    """ "warning" -> pb.MemoryPressure MEMORY_PRESSURE_WARNING; "unknown" -> UNSPECIFIED (0)."""
    try:
        return int(enum.Value(f"{prefix}{name.upper()}"))
    except ValueError:
        return 0  # UNSPECIFIED: "unknown" has no member of its own


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """pb.MemoryPressure WARNING -> "warning"; UNSPECIFIED or an unknown number -> "unknown"."""
    try:
        name: str = enum.Name(value)
    except ValueError:
        return "unknown"
    name = name.removeprefix(prefix).lower()
    return "unknown" if name == "unspecified" else name


def facts_to_pb(facts: NodeFacts) -> pb.NodeFacts:
    return pb.NodeFacts(
        **{name: getattr(facts, name) for name in _PLAIN_FACTS},
        labels=dict(facts.labels),
        role=enum_value(pb.Role, "ROLE_", facts.role),
    )


def facts_from_pb(message: pb.NodeFacts) -> NodeFacts:
    return NodeFacts(
        **{name: getattr(message, name) for name in _PLAIN_FACTS},
        labels=dict(message.labels),
        # An agent that sent no role reads "unknown": never a server, never a laptop that opted in.
        role=enum_name(pb.Role, message.role, "ROLE_"),  # type: ignore[arg-type]
    )
