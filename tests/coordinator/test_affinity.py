"""Cache-aware routing: request keys, the holder table, and the Router's pick around them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coordinator.affinity import PrefixAffinity, chat_prefix, prompt_prefix
from coordinator.pki import FleetPki
from coordinator.registry import Engine, EngineId, NodeId
from coordinator.routing import Routing

SYSTEM = {"role": "system", "content": "You review code. " * 40}


def turns(n: int, topic: str = "parser", own_system: bool = False) -> list[dict[str, Any]]:
    """A conversation of n user turns (each but the last answered), after the shared system
    prompt or one of its own."""
    system = {"role": "system", "content": f"{topic} " * 100} if own_system else SYSTEM
    messages: list[dict[str, Any]] = [system]
    for i in range(n):
        messages.append({"role": "user", "content": f"question {i} about the {topic} " * 5})
        if i < n - 1:
            messages.append({"role": "assistant", "content": f"answer {i} " * 8})
    return messages


def test_a_follow_up_shares_every_key_of_the_turn_before() -> None:
    first, second = chat_prefix({"messages": turns(1)}), chat_prefix({"messages": turns(2)})
    assert len(first.keys) == 3 and len(second.keys) == 5  # head, then one per message
    assert second.keys[:3] == first.keys
    assert first.preamble == second.preamble == 2  # the head and the system prompt
    developer = {"role": "developer", "content": "Use tools."}
    assert chat_prefix({"messages": [developer, *turns(1)]}).preamble == 3
    assert chat_prefix({"messages": turns(1)[1:]}).preamble == 1
    assert second.sizes[:3] == first.sizes and second.sizes[-1] > first.sizes[-1]
    # Other tools, another conversation or another template option render another prompt.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert chat_prefix({"messages": turns(1), "tools": tools}).keys[0] != first.keys[0]
    assert chat_prefix({"messages": turns(1, "lexer")}).keys[2] != first.keys[2]
    thinking = {"messages": turns(1), "chat_template_kwargs": {"enable_thinking": False}}
    assert chat_prefix(thinking).keys[0] != first.keys[0]


def test_a_completion_prompt_is_keyed_by_blocks() -> None:
    short, longer = prompt_prefix("x" * 2500), prompt_prefix("x" * 2500 + "y" * 600)
    assert len(short.keys) == 3 and short.sizes == (1024, 2048, 2500)
    assert longer.keys[:2] == short.keys[:2] and longer.keys[2] != short.keys[2]
    assert prompt_prefix([1, 2, 3]).sizes == (7,)  # token ids: their JSON


def test_the_longest_remembered_part_names_the_holder() -> None:
    table = PrefixAffinity()
    a, b = EngineId("a"), EngineId("b")
    idle = {a: 0, b: 0}
    table.remember(chat_prefix({"messages": turns(1)}), a)
    table.remember(chat_prefix({"messages": turns(1, "lexer")}), b)
    follow_up = chat_prefix({"messages": turns(3)})
    assert table.holder(follow_up, idle) == a
    assert table.holder(chat_prefix({"messages": turns(2, "lexer")}), idle) == b
    # Without a: b holds only the system prompt, about half of this longer request.
    assert table.holder(chat_prefix({"messages": turns(6)}), {b: 0}) is None
    # A new conversation shares only the team's system prompt (most of its first turn): that
    # binds it to no replica, or every conversation would pile up where the first one ran.
    first_turn = chat_prefix({"messages": turns(1, "docs")})
    assert first_turn.preamble == 2 and first_turn.sizes[1] > 0.5 * first_turn.sizes[-1]
    assert table.holder(first_turn, idle) is None
    # Nothing held for a request without tools but the (tiny) head: no holder.
    assert (
        table.holder(chat_prefix({"messages": [{"role": "user", "content": "hi"}]}), idle) is None
    )


def test_a_busy_holder_gives_way() -> None:
    table = PrefixAffinity()
    a, b = EngineId("a"), EngineId("b")
    table.remember(chat_prefix({"messages": turns(1)}), a)
    follow_up = chat_prefix({"messages": turns(2)})
    assert table.holder(follow_up, {a: 3, b: 1}) == a  # within the slack of 2
    assert table.holder(follow_up, {a: 4, b: 1}) is None  # the Router decides
    assert table.holder(follow_up, {a: 4, b: 1}, slack=3) == a


def test_the_table_forgets_the_least_recently_used_keys() -> None:
    table = PrefixAffinity(max_keys=6)
    a, b, c = EngineId("a"), EngineId("b"), EngineId("c")
    table.remember(chat_prefix({"messages": turns(1, "parser", own_system=True)}), a)
    table.remember(chat_prefix({"messages": turns(1, "lexer", own_system=True)}), b)
    assert len(table) == 5  # the head (no tools) is one key, held by both
    table.remember(chat_prefix({"messages": turns(1, "docs", own_system=True)}), c)
    assert len(table) == 6  # the parser conversation's system prompt was the oldest key
    idle = {a: 0, b: 0, c: 0}
    # Its deeper key (system prompt + first question, chained) still names a.
    parser_follow_up = chat_prefix({"messages": turns(2, "parser", own_system=True)})
    assert table.holder(parser_follow_up, idle) == a
    table.remember(chat_prefix({"messages": turns(1, "build", own_system=True)}), c)
    assert len(table) == 6  # now the parser conversation's last key went too
    assert table.holder(parser_follow_up, idle) is None
    assert table.holder(chat_prefix({"messages": turns(2, "lexer", own_system=True)}), idle) == b


def engine(name: str) -> Engine:
    return Engine(
        EngineId(name), "m", NodeId(f"node-{name}"), "interactive", "ready",
        f"http://127.0.0.1:{9000 + len(name)}", "secret",
    )  # fmt: skip


@pytest.fixture
def ca_pem(tmp_path: Path) -> bytes:
    return FleetPki.load_or_create(tmp_path).ca_cert_pem


async def test_follow_ups_return_to_the_replica_that_served_the_conversation(
    ca_pem: bytes,
) -> None:
    routing = Routing(ca_pem, max_parallel=lambda tier: 2)
    for name in ("e1", "e22"):
        routing.add_engine(engine(name))
    served: dict[str, set[str]] = {}
    # 16 conversations: the Router's shuffle puts all first turns on one replica 1 in 32,768.
    for topic in (f"topic{i}" for i in range(16)):
        for n in range(1, 5):
            # Its own system prompt: a conversation's first turn matches nothing held.
            messages = turns(n, topic, own_system=True)
            target = await routing.pick(
                "m", "interactive", prefix=chat_prefix({"messages": messages})
            )
            assert target is not None
            served.setdefault(topic, set()).add(target.engine_id)
    assert all(len(engines) == 1 for engines in served.values())
    # The Router placed the conversations' first turns: not all on one replica.
    assert {e for engines in served.values() for e in engines} == {"e1", "e22"}


async def test_a_full_or_departed_holder_gives_the_turn_to_the_router(ca_pem: bytes) -> None:
    routing = Routing(ca_pem, max_parallel=lambda tier: 2)
    routing.add_engine(engine("e1"))
    routing.add_engine(engine("e22"))
    first = await routing.pick("m", "interactive", prefix=chat_prefix({"messages": turns(1)}))
    assert first is not None
    holder, other = first.engine_id, ({"e1", "e22"} - {first.engine_id}).pop()
    in_flight = {holder: 2, other: 0}  # the holder is full: the turn spills to the other
    full = await routing.pick(
        "m", "interactive", lambda e: in_flight[e], chat_prefix({"messages": turns(2)})
    )
    assert full is not None and full.engine_id == other
    # That turn is now remembered on the other replica, which holds the longer prefix.
    in_flight[holder] = 0
    third = await routing.pick("m", "interactive", prefix=chat_prefix({"messages": turns(3)}))
    assert third is not None and third.engine_id == other
    routing.remove_engine(EngineId(other))
    fourth = await routing.pick("m", "interactive", prefix=chat_prefix({"messages": turns(4)}))
    assert fourth is not None and fourth.engine_id == holder


async def test_without_cache_affinity_the_router_spreads_follow_ups(ca_pem: bytes) -> None:
    routing = Routing(ca_pem, cache_affinity=False)
    routing.add_engine(engine("e1"))
    routing.add_engine(engine("e22"))
    picks = set()
    for _ in range(40):
        target = await routing.pick("m", "interactive", prefix=chat_prefix({"messages": turns(2)}))
        assert target is not None
        picks.add(target.engine_id)
    assert picks == {"e1", "e22"}
