"""Reading mDNS records defensively, and the coordinator's TXT round trip to the agent."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from coordinator.discovery import DiscoveredNode, Discovery, coordinator_txt, parse_node
from mlxfleet.errors import MalformedRecordError
from node_agent.advertise import txt_properties
from node_agent.discover import CoordinatorAddress, parse_coordinator
from tests.node_agent.records import RECORD as NODE_RECORD

# A thermal state other than the default, to show it survives the round trip.
RECORD = dataclasses.replace(NODE_RECORD, thermal="fair")


def wire(txt: dict[str, str]) -> dict[bytes, bytes | None]:
    return {k.encode(): v.encode() for k, v in txt.items()}


def test_parse_node_reads_what_the_advertiser_writes() -> None:
    node = parse_node("mini-1", wire(txt_properties(RECORD)), ["10.231.0.1"], 8402, now_s=7.5)
    assert node == DiscoveredNode(
        node_id="mini-1",
        addresses=("10.231.0.1",),
        port=8402,
        chip="Apple M2 Pro",
        ram_gib=32,
        role="server",
        avail_gib=20.0,
        thermal="fair",
        version="0.1.0",
        last_seen=7.5,
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"id": None}, "'id' is missing"),
        ({"id": "mini-2"}, "differs from instance name"),
        ({"ram_gib": "lots"}, "ram_gib"),
        ({"ram_gib": "0"}, "ram_gib"),
        ({"avail_gib": "nan"}, "out of range"),
        ({"avail_gib": "1e400"}, "out of range"),
        ({"avail_gib": "-1"}, "out of range"),
        ({"avail_gib": "x"}, "not a number"),
        ({"role": "desktop"}, "unknown role"),
        ({"thermal": "toasty"}, "unknown thermal"),
        ({"metrics": "70000"}, "not a port"),
        ({"chip": "x" * 65}, "'chip' is 65 bytes"),
    ],
)
def test_parse_node_rejects_malformed_records(change: dict[str, str | None], message: str) -> None:
    txt: dict[bytes, bytes | None] = wire(txt_properties(RECORD))
    for key, value in change.items():
        if value is None:
            del txt[key.encode()]
        else:
            txt[key.encode()] = value.encode()
    with pytest.raises(MalformedRecordError, match=message):
        parse_node("mini-1", txt, ["10.231.0.1"], 8402, now_s=0.0)


def test_parse_node_rejects_bytes_that_are_not_utf8() -> None:
    txt = wire(txt_properties(RECORD)) | {b"chip": b"\xff\xfe"}
    with pytest.raises(MalformedRecordError, match="not UTF-8"):
        parse_node("mini-1", txt, [], 8402, now_s=0.0)


def test_coordinator_txt_round_trips_to_the_agent() -> None:
    fingerprint = "sha256:" + "ab" * 32
    txt = coordinator_txt("0.1.0", 8401, 8400, fingerprint, 8403)
    assert txt == {"v": "0.1.0", "grpc": "8401", "gw": "8400", "fp": fingerprint, "enroll": "8403"}
    assert parse_coordinator(wire(txt), ["10.0.0.5", "192.168.1.5"]) == CoordinatorAddress(
        host="10.0.0.5",
        grpc_port=8401,
        gateway_port=8400,
        fingerprint=fingerprint,
        version="0.1.0",
        enroll_port=8403,
    )


@pytest.mark.parametrize(
    ("txt", "addresses", "message"),
    [
        ({"v": "1", "grpc": "8401", "gw": "8400", "fp": "f"}, [], "no IPv4"),
        ({"v": "1", "grpc": "0", "gw": "8400", "fp": "f"}, ["10.0.0.5"], "grpc port is 0"),
        ({"v": "1", "grpc": "-1", "gw": "8400", "fp": "f"}, ["10.0.0.5"], "not a port"),
        ({"v": "1", "grpc": "8401", "gw": "8400"}, ["10.0.0.5"], "'fp' is missing"),
    ],
)
def test_parse_coordinator_rejects_malformed_records(
    txt: dict[str, str], addresses: list[str], message: str
) -> None:
    with pytest.raises(MalformedRecordError, match=message):
        parse_coordinator(wire(txt), addresses)


def test_coordinator_txt_refuses_an_oversized_fingerprint() -> None:
    with pytest.raises(ValueError, match="'fp'"):
        coordinator_txt("0.1.0", 8401, 8400, "f" * 200, 8403)


def test_discovery_ignores_a_malformed_record_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    changes: list[int] = []
    discovery = Discovery(on_change=lambda: changes.append(1), clock=lambda: 3.0)
    bad = wire(txt_properties(RECORD)) | {b"ram_gib": b"-5"}
    with caplog.at_level(logging.WARNING, logger="coordinator.discovery"):
        assert discovery.apply_record("mini-1", bad, ["10.231.0.1"], 8402) is None
    assert "ignoring mDNS record for 'mini-1'" in caplog.text
    assert (discovery.nodes, changes) == ({}, [])

    good = discovery.apply_record("mini-1", wire(txt_properties(RECORD)), ["10.231.0.1"], 8402)
    assert good is not None and good.last_seen == 3.0
    assert (dict(discovery.nodes), changes) == ({"mini-1": good}, [1])


def test_a_failing_on_change_hook_does_not_stop_discovery(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise RuntimeError("hook bug")

    discovery = Discovery(on_change=broken)
    node = discovery.apply_record("mini-1", wire(txt_properties(RECORD)), [], 8402)
    assert node is not None and discovery.nodes["mini-1"] == node
    assert "on_change hook failed" in caplog.text
