"""The agent's side of a group: one model spread over several nodes (node_agent/engine/group.py).

The coordinator's LoadModel names the group, this node's rank and every member. The agent
starts its rank with MLX's own environment, as exo does and no SSH: MLX_RANK, and MLX_HOSTFILE
listing one address per rank. The rank's own entry is a port on 127.0.0.1 it listens on; every
other rank's entry is a relay port of this agent's rank link (node_agent/rank_link.py), which
carries the bytes over mutual TLS to that member's agent and refuses anyone who is not a
member. So ranks never listen on the network, and only the group's members reach them.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node_agent.rank_link import Member, RankLink


@dataclass(frozen=True, slots=True)
class GroupRole:
    """This node's place in a group, as the coordinator sent it."""

    group_id: str
    rank: int
    members: tuple[Member, ...]  # by rank, rank 0 first
    split: tuple[int, ...]  # layers per rank
    stall_s: float

    def problem(self, node_id: str) -> str | None:
        """Why this node cannot run the rank as sent (None: it can)."""
        ranks = [m.rank for m in self.members]
        if ranks != list(range(len(ranks))) or len(ranks) < 2:
            return f"group {self.group_id}: ranks {ranks} are not 0..n-1 (n >= 2)"
        if self.rank >= len(ranks) or self.members[self.rank].node_id != node_id:
            return f"group {self.group_id}: rank {self.rank} is not this node's ({node_id})"
        if any(n <= 0 for n in self.split):
            return f"group {self.group_id}: a member has no layers ({list(self.split)})"
        missing = [m.node_id for m in self.members if not m.address]
        if missing:
            return f"group {self.group_id}: no rank link address for {', '.join(missing)}"
        return None

    def engine_args(self) -> list[str]:
        return [
            "--group-id",
            self.group_id,
            "--group-split",
            ",".join(map(str, self.split)),
            "--group-stall-s",
            f"{self.stall_s:g}",
        ]


def group_fields(role: GroupRole | None) -> dict[str, Any]:
    """An EngineInfo's group fields for a rank of `role` (none for a whole model): what a
    coordinator that restarted takes the group back from."""
    if role is None:
        return {}
    nodes = tuple(m.node_id for m in role.members)
    return {
        "group_id": role.group_id,
        "rank": role.rank,
        "group_split": role.split,
        "group_nodes": nodes,
    }


def free_port() -> int:
    """A free port on 127.0.0.1 for the rank to listen on (MLX binds it itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def rank_environment(link: RankLink, role: GroupRole, run_dir: Path) -> dict[str, str]:
    """Open the group on the rank link and write the rank's hostfile; MLX's environment for
    the rank process (close the group on the link when the rank exits)."""
    rank_port = free_port()
    relays = await link.open_group(role.group_id, role.rank, role.members, rank_port)
    hosts = [
        [f"127.0.0.1:{rank_port if m.rank == role.rank else relays[m.rank]}"] for m in role.members
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    hostfile = run_dir / f"{role.group_id}-rank{role.rank}.json"
    hostfile.write_text(json.dumps(hosts))
    return {"MLX_RANK": str(role.rank), "MLX_HOSTFILE": str(hostfile)}
