"""The policy router's order and spill rules, on the real LiteLLM Router."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import CloudFallback
from coordinator.pki import FleetPki
from coordinator.registry import Engine, EngineId, NodeId
from coordinator.routing import ORDER_CLOUD, ORDER_LOCAL, ORDER_REMOTE, Routing, is_local


def engine(name: str, url: str, tier: str = "interactive") -> Engine:
    return Engine(EngineId(name), "m", NodeId(f"node-{name}"), tier, "ready", url, "secret")


@pytest.fixture
def ca_pem(tmp_path: Path) -> bytes:
    return FleetPki.load_or_create(tmp_path).ca_cert_pem


def test_loopback_urls_are_local() -> None:
    assert is_local("http://127.0.0.1:9000") and is_local("http://localhost:1")
    assert is_local("https://[::1]:443")
    assert not is_local("https://10.0.0.2:9000") and not is_local("https://studio-2.local:1")


async def test_local_engines_come_first_then_remote(ca_pem: bytes) -> None:
    routing = Routing(ca_pem, max_parallel=lambda tier: 2)
    routing.add_engine(engine("remote", "https://10.0.0.2:9000"))
    routing.add_engine(engine("local", "http://127.0.0.1:9000"))
    picks = {(await routing.pick("m", "interactive")).engine_id for _ in range(20)}  # type: ignore[union-attr]
    assert picks == {"local"}
    routing.remove_engine(EngineId("local"))
    target = await routing.pick("m", "interactive")
    assert target is not None and (target.engine_id, target.order) == ("remote", ORDER_REMOTE)


async def test_a_full_deployment_spills_to_the_next_order(ca_pem: bytes) -> None:
    limit = [2]
    routing = Routing(ca_pem, max_parallel=lambda tier: limit[0])
    routing.add_engine(engine("local", "http://127.0.0.1:9000"))
    routing.add_engine(engine("remote", "https://10.0.0.2:9000"))
    in_flight = {"local": 2, "remote": 0}
    target = await routing.pick("m", "interactive", lambda e: in_flight[e])
    assert target is not None and target.engine_id == "remote"
    in_flight["remote"] = 2  # everything full: the lowest order takes it (its engine queues)
    target = await routing.pick("m", "interactive", lambda e: in_flight[e])
    assert target is not None and (target.engine_id, target.order) == ("local", ORDER_LOCAL)
    limit[0] = 4  # `mlxfleet tiers set`: the new max_concurrency counts from the next pick
    in_flight["local"] = 3
    target = await routing.pick("m", "interactive", lambda e: in_flight[e])
    assert target is not None and target.engine_id == "local"


async def test_without_prefer_local_all_engines_share_one_order(ca_pem: bytes) -> None:
    routing = Routing(ca_pem, prefer_local=False)
    routing.add_engine(engine("remote", "https://10.0.0.2:9000"))
    routing.add_engine(engine("local", "http://127.0.0.1:9000"))
    picks = {(await routing.pick("m", "interactive")).engine_id for _ in range(40)}  # type: ignore[union-attr]
    assert picks == {"local", "remote"}


async def test_no_deployment_left_is_none_and_draining_engines_keep_their_flights(
    ca_pem: bytes,
) -> None:
    routing = Routing(ca_pem)
    aborted: list[str] = []
    routing.on_remove.append(aborted.append)
    routing.add_engine(engine("a", "http://127.0.0.1:9000"))
    routing.remove_engine(EngineId("a"), drain=True)  # asked to stop: in-flight requests go on
    assert await routing.pick("m", "interactive") is None and aborted == []
    routing.remove_engine(EngineId("a"))  # then it exited: anything still waiting is aborted
    assert aborted == ["a"]
    routing.remove_engine(EngineId("a"))
    assert aborted == ["a"]  # once


async def test_the_cloud_comes_after_every_engine_and_is_not_a_ready_unit(
    ca_pem: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUD_KEY", "sk-test")
    routing = Routing(ca_pem)
    routing.add_cloud("m", "interactive", CloudFallback("openai/gpt-4o-mini", "CLOUD_KEY"))
    assert routing.units() == set() and routing.models() == []  # nothing to wake or list
    routing.add_engine(engine("remote", "https://10.0.0.2:9000"))
    picks = {(await routing.pick("m", "interactive")).engine_id for _ in range(20)}  # type: ignore[union-attr]
    assert picks == {"remote"}
    routing.remove_engine(EngineId("remote"))
    target = await routing.pick("m", "interactive")
    assert target is not None and target.cloud and target.order == ORDER_CLOUD
    assert target.secret == ""  # the provider key stays inside LiteLLM's deployment
