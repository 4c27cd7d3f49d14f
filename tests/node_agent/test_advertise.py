"""The node's mDNS record: TXT contract, meaningful changes and the update rate limit."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from mlxfleet.mdns import TXT_KEYS
from node_agent.advertise import (
    MIN_UPDATE_INTERVAL_S,
    Advertiser,
    NodeRecord,
    is_meaningful_change,
    publish_delay_s,
    txt_properties,
)
from tests.node_agent.records import RECORD


def test_txt_properties_follow_the_contract() -> None:
    assert txt_properties(RECORD) == {
        "id": "mini-1",
        "v": "0.1.0",
        "grpc": "0",
        "metrics": "8402",
        "chip": "Apple M2 Pro",
        "ram_gib": "32",
        "role": "server",
        "avail_gib": "20.0",
        "thermal": "nominal",
    }


def test_txt_never_carries_a_secret() -> None:
    token, node_key = "mlxf-enroll-7f3a9c", "nodekey-b64-QkVTVA=="
    txt = txt_properties(RECORD)
    assert set(txt) == TXT_KEYS
    assert not [value for value in txt.values() if token in value or node_key in value]
    # Structural guard: a record has no field that could hold one.
    names = {field.name for field in dataclasses.fields(NodeRecord)}
    assert not {n for n in names if any(w in n for w in ("token", "key", "secret", "password"))}


@pytest.mark.parametrize("node_id", ["", "a.b", "n" * 64])
def test_unusable_node_id_is_refused(node_id: str) -> None:
    with pytest.raises(ValueError, match="instance name"):
        txt_properties(dataclasses.replace(RECORD, node_id=node_id))


def test_oversized_value_is_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match="'chip'"):
        txt_properties(dataclasses.replace(RECORD, chip="x" * 65))


@pytest.mark.parametrize(
    ("changes", "meaningful"),
    [
        ({}, False),
        ({"avail_gib": 20.99}, False),
        ({"avail_gib": 21.04}, True),
        ({"avail_gib": 19.0}, True),
        ({"thermal": "fair"}, True),
        ({"chip": "Apple M4"}, True),
        ({"role": "laptop"}, True),
        ({"addresses": ("10.231.0.9",)}, True),
    ],
)
def test_meaningful_change(changes: dict[str, Any], meaningful: bool) -> None:
    assert is_meaningful_change(RECORD, dataclasses.replace(RECORD, **changes)) is meaningful


def test_publish_delay_rate_limits_all_but_thermal() -> None:
    more = dataclasses.replace(RECORD, avail_gib=25.0)
    hot = dataclasses.replace(RECORD, thermal="serious")
    assert publish_delay_s(RECORD, RECORD, last_publish_s=100.0, now_s=100.5) is None
    assert publish_delay_s(RECORD, more, last_publish_s=100.0, now_s=101.0) == 4.0
    assert (
        publish_delay_s(RECORD, more, last_publish_s=100.0, now_s=100.0 + MIN_UPDATE_INTERVAL_S)
        == 0.0
    )
    assert publish_delay_s(RECORD, hot, last_publish_s=100.0, now_s=100.1) == 0.0


class FakeZeroconf:
    """Records what an Advertiser registers, updates and withdraws."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[bytes, bytes | None]]] = []

    async def _done(self) -> None:
        return None

    async def async_register_service(self, info: Any) -> Any:
        self.calls.append(("register", info.properties))
        return self._done()

    async def async_update_service(self, info: Any) -> Any:
        self.calls.append(("update", info.properties))
        return self._done()

    async def async_unregister_service(self, info: Any) -> Any:
        self.calls.append(("unregister", info.properties))
        return self._done()


async def test_advertiser_sends_thermal_at_once_and_holds_the_rest() -> None:
    now = [1000.0]
    zc = FakeZeroconf()
    advertiser = Advertiser(zc=zc, clock=lambda: now[0])  # type: ignore[arg-type]
    await advertiser.start(RECORD)
    now[0] += 1.0
    await advertiser.update(dataclasses.replace(RECORD, avail_gib=20.5))  # noise
    await advertiser.update(dataclasses.replace(RECORD, thermal="critical"))
    assert [(c, p[b"thermal"]) for c, p in zc.calls] == [
        ("register", b"nominal"),
        ("update", b"critical"),
    ]

    await advertiser.update(dataclasses.replace(RECORD, thermal="critical", avail_gib=10.0))
    assert len(zc.calls) == 2  # held: the last publish was just now
    assert advertiser.published is not None and advertiser.published.avail_gib == 20.04

    await advertiser.close()  # a held update is dropped, never sent after goodbye
    assert [c for c, _ in zc.calls] == ["register", "update", "unregister"]


async def test_advertiser_sends_a_held_update_when_the_interval_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("node_agent.advertise.MIN_UPDATE_INTERVAL_S", 0.2)
    zc = FakeZeroconf()
    advertiser = Advertiser(zc=zc)  # type: ignore[arg-type]
    await advertiser.start(RECORD)
    await advertiser.update(dataclasses.replace(RECORD, avail_gib=5.0))
    await advertiser.update(dataclasses.replace(RECORD, avail_gib=3.0))  # replaces the held one
    deadline = asyncio.get_running_loop().time() + 5.0
    while len(zc.calls) < 2 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    assert [(c, p[b"avail_gib"]) for c, p in zc.calls] == [
        ("register", b"20.0"),
        ("update", b"3.0"),
    ]
    await advertiser.close()
