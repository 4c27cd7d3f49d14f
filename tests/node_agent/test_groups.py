"""The agent's side of a group (node_agent/groups.py): what LoadModel's group becomes, what a
node refuses to join, and the MLX environment a rank gets through the rank link."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxfleet.v1 import fleet_pb2 as pb
from node_agent.coordinator_client import engine_to_pb, load_request
from node_agent.engine_info import EngineInfo
from node_agent.groups import GroupRole, group_fields
from node_agent.rank_link import Member
from tests.node_agent.test_file_server import Certs, make_certs
from tests.node_agent.test_rank_link import make_link


def load_message(rank: int, members: list[tuple[int, str, str, int, int]]) -> pb.LoadModel:
    return pb.LoadModel(
        engine_id="demo-i-1" if rank == 0 else f"demo-i-1-r{rank}",
        model="demo",
        source="/models/demo",
        tier=pb.TIER_INTERACTIVE,
        context_length=2048,
        group=pb.EngineGroup(
            group_id="demo-i-1",
            rank=rank,
            members=[
                pb.GroupMember(rank=r, node_id=n, link_address=a, first_layer=f, layers=n_layers)
                for r, n, a, f, n_layers in members
            ],
            stall_s=5.0,
        ),
    )


MEMBERS = [(1, "vm-b", "10.0.0.2:7001", 0, 2), (0, "vm-a", "10.0.0.1:7001", 2, 4)]


def test_load_model_group_becomes_a_role_by_rank() -> None:
    request = load_request(load_message(1, MEMBERS))
    assert request.group == GroupRole(
        "demo-i-1",
        1,
        (Member(0, "vm-a", "10.0.0.1:7001"), Member(1, "vm-b", "10.0.0.2:7001")),
        (4, 2),
        5.0,
    )
    assert request.group.engine_args() == [
        *("--group-id", "demo-i-1", "--group-split", "4,2", "--group-stall-s", "5"),
    ]
    assert request.group.problem("vm-b") is None
    whole = pb.LoadModel(engine_id="demo-i-2", model="demo", source="/models/demo")
    assert load_request(whole).group is None


def test_a_rank_reports_the_layout_it_was_told_for_a_restarted_coordinator() -> None:
    """What the engine's EngineInfo carries up the stream (Hello, events): its group, rank and
    the whole layout, from which a coordinator that restarted takes the group back."""
    role = load_request(load_message(1, MEMBERS)).group
    info = EngineInfo("demo-i-1-r1", "demo", "interactive", "ready", **group_fields(role))
    wire = engine_to_pb(info, with_secret=False)
    assert (wire.group_id, wire.rank) == ("demo-i-1", 1)
    assert (list(wire.group_split), list(wire.group_nodes)) == ([4, 2], ["vm-a", "vm-b"])
    assert group_fields(None) == {}


@pytest.mark.parametrize(
    ("rank", "members", "me", "problem"),
    [
        (1, MEMBERS, "vm-a", "group demo-i-1: rank 1 is not this node's (vm-a)"),
        (0, [MEMBERS[1]], "vm-a", "group demo-i-1: ranks [0] are not 0..n-1 (n >= 2)"),
        (
            0,
            [MEMBERS[1], (2, "vm-c", "10.0.0.3:7001", 0, 2)],
            "vm-a",
            "group demo-i-1: ranks [0, 2] are not 0..n-1 (n >= 2)",
        ),
        (
            0,
            [MEMBERS[1], (1, "vm-b", "10.0.0.2:7001", 0, 0)],
            "vm-a",
            "group demo-i-1: a member has no layers ([4, 0])",
        ),
        (
            0,
            [MEMBERS[1], (1, "vm-b", "", 0, 2)],
            "vm-a",
            "group demo-i-1: no rank link address for vm-b",
        ),
    ],
)
def test_a_group_this_node_cannot_join_says_why(
    rank: int, members: list[tuple[int, str, str, int, int]], me: str, problem: str
) -> None:
    group = load_request(load_message(rank, members)).group
    assert group is not None and group.problem(me) == problem


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


async def test_a_rank_reaches_other_members_only_through_the_link(
    certs: Certs, tmp_path: Path
) -> None:
    from node_agent.groups import rank_environment

    link = make_link(certs, "node-b")
    port = await link.start()
    try:
        members = (
            Member(0, "node-a", "127.0.0.1:1"),
            Member(1, "node-b", f"127.0.0.1:{port}"),
            Member(2, "node-c", "127.0.0.1:2"),
        )
        role = GroupRole("g-1", 1, members, (2, 2, 2), 5.0)
        env = await rank_environment(link, role, tmp_path)
        assert env["MLX_RANK"] == "1"
        hosts = json.loads(Path(env["MLX_HOSTFILE"]).read_text())
        assert [len(h) for h in hosts] == [1, 1, 1]
        ports = [int(h[0].removeprefix("127.0.0.1:")) for h in hosts]
        assert all(h[0].startswith("127.0.0.1:") for h in hosts)  # nothing on the network
        assert len(set(ports)) == 3 and port not in ports and ports[1] not in (1, 2)
        assert link.stats("g-1").connections == 0
    finally:
        await link.close()
