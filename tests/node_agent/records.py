"""One node's mDNS record, shared by the advertiser's tests and the coordinator's reader tests."""

from __future__ import annotations

from node_agent.advertise import NodeRecord

RECORD = NodeRecord(
    node_id="mini-1",
    version="0.1.0",
    metrics_port=8402,
    chip="Apple M2 Pro",
    ram_gib=32,
    role="server",
    avail_gib=20.04,
    thermal="nominal",
    addresses=("10.231.0.1",),
)
