"""A live node as placement sees it (coordinator/policy.py's Offer), from what the node reported.

Memory: the node's budget (coordinator/memory.py) less what its engines take. Disk: the room
its agent reports for model files (free disk within its budget, unused files counted as free)
and the sources whose files it holds as the fleet recorded them (coordinator/holdings.py).
Triggers on the node close it to new placements or to the batch tier.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Set
from typing import Literal

from coordinator.holdings import Holdings
from coordinator.memory import node_budget
from coordinator.policy import Offer
from coordinator.registry import LIVE_STATES, Engine, Node


def placed_bytes(engines: Iterable[Engine], weight: Callable[[Engine], int]) -> dict[str, int]:
    """Bytes each node's live (or stopping) engines take, by node id."""
    placed: dict[str, int] = {}
    for engine in engines:
        if engine.state in (*LIVE_STATES, "stopping"):
            placed[engine.node_id] = placed.get(engine.node_id, 0) + weight(engine)
    return placed


def node_offer(
    node: Node, placed: int, os_reserve_bytes: int, actions: Set[str], holdings: Holdings
) -> Offer:
    """`placed`: bytes its engines take; `actions`: its triggers' actions (triggers.py)."""
    facts = node.facts
    reserve = facts.os_reserve_bytes or os_reserve_bytes
    budget = node_budget(facts.ram_bytes, facts.gpu_wired_limit_bytes, placed, reserve)
    role: Literal["laptop", "server"] = "laptop" if facts.role == "laptop" else "server"
    return Offer(
        node.node_id,
        role,
        budget,
        dict(facts.labels),
        facts.serve_interactive,
        cordoned=node.cordoned or bool({"halt_ramp", "drain"} & actions),
        batch_closed="move_batch" in actions,
        offload_preferred="offload_preferred" in actions,
        disk_room=node.status.disk_room_bytes if node.status is not None else None,
        holds=holdings.held(node),
    )
