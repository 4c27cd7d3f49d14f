"""Advertise this node on the LAN over mDNS (`_mlxfleet._tcp.local.`). Finding is not admitting.

IPv4 only: the records carry A addresses, never AAAA.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

from zeroconf import InterfaceChoice, InterfacesType
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from mlxfleet import mdns
from mlxfleet.facts import Role, ThermalState

logger = logging.getLogger(__name__)

MIN_UPDATE_INTERVAL_S = 5.0
# Smaller moves of available memory are heartbeat noise, not news for the LAN.
AVAIL_CHANGE_GIB = 1.0


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """What a node tells the LAN about itself; every field is public."""

    node_id: str
    version: str
    metrics_port: int
    chip: str
    ram_gib: int
    role: Role
    avail_gib: float
    thermal: ThermalState
    grpc_port: int = 0  # agents dial out; kept so the TXT contract has the key
    port: int | None = None  # SRV port; None = the metrics port
    addresses: tuple[str, ...] = ()  # IPv4 to advertise; () = every non-loopback IPv4 here


def txt_properties(record: NodeRecord) -> dict[str, str]:
    """The TXT properties for a record; raises ValueError on a value readers would drop."""
    if (
        not record.node_id
        or len(record.node_id.encode()) > mdns.MAX_NODE_ID_BYTES
        or "." in record.node_id
    ):
        raise ValueError(f"node id {record.node_id!r} is not a usable mDNS instance name")
    txt = {
        "id": record.node_id,
        "v": record.version,
        "grpc": str(record.grpc_port),
        "metrics": str(record.metrics_port),
        "chip": record.chip,
        "ram_gib": str(record.ram_gib),
        "role": record.role,
        "avail_gib": f"{record.avail_gib:.1f}",
        "thermal": record.thermal,
    }
    for key, value in txt.items():
        if len(value.encode()) > mdns.MAX_TXT_VALUE_BYTES:
            raise ValueError(
                f"TXT value for {key!r} is over {mdns.MAX_TXT_VALUE_BYTES} bytes: {value!r}"
            )
    return txt


def is_meaningful_change(old: NodeRecord, new: NodeRecord) -> bool:
    """True when `new` is news: any field but avail_gib changed, or avail_gib moved ≥ 1 GiB."""
    for field in fields(NodeRecord):
        if field.name != "avail_gib" and getattr(old, field.name) != getattr(new, field.name):
            return True
    return abs(new.avail_gib - old.avail_gib) >= AVAIL_CHANGE_GIB


def publish_delay_s(
    published: NodeRecord, new: NodeRecord, last_publish_s: float, now_s: float
) -> float | None:
    """Seconds to wait before publishing `new` (0 = now), or None when it is not worth sending."""
    if not is_meaningful_change(published, new):
        return None
    if new.thermal != published.thermal:
        return 0.0  # a hot Mac must shed work now; the rate limit would hide it
    return max(0.0, last_publish_s + MIN_UPDATE_INTERVAL_S - now_s)


class Advertiser:
    """Publishes one NodeRecord and keeps it current. Use from the event loop only.

    Owns its AsyncZeroconf (unless one is passed in) and the task that sends a rate-limited
    update later; close() cancels that task, sends goodbyes and closes what it owns.
    """

    def __init__(
        self,
        interfaces: InterfacesType = InterfaceChoice.All,
        *,
        zc: AsyncZeroconf | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interfaces = interfaces
        self._owns_zc = zc is None
        self._zc = zc
        self._clock = clock
        self._lock = asyncio.Lock()
        self._info: AsyncServiceInfo | None = None
        self._published: NodeRecord | None = None
        self._pending: NodeRecord | None = None
        self._last_publish_s = 0.0
        self._flush_task: asyncio.Task[None] | None = None

    @property
    def published(self) -> NodeRecord | None:
        """The record the LAN currently sees."""
        return self._published

    async def start(self, record: NodeRecord) -> None:
        """Register the service; returns once the announcements are sent."""
        if self._zc is None:
            self._zc = AsyncZeroconf(interfaces=self._interfaces)
        async with self._lock:
            info = self._info_for(record)
            announced = await self._zc.async_register_service(info)
            await announced
            self._info = info
            self._mark_published(record)
        logger.info("advertising node %s on %s", record.node_id, info.parsed_addresses())

    async def update(self, record: NodeRecord) -> None:
        """Offer a new reading; sends it now, later (rate limit) or never (no meaningful change)."""
        if self._published is None:
            raise RuntimeError("Advertiser.update() before start()")
        if record.node_id != self._published.node_id:
            raise ValueError(
                f"node id changed from {self._published.node_id!r} to {record.node_id!r}"
            )
        delay_s = publish_delay_s(self._published, record, self._last_publish_s, self._clock())
        if delay_s is None:
            self._pending = None
            return
        if delay_s == 0.0:
            self._pending = None
            await self._publish(record)
            return
        self._pending = record
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.create_task(self._flush_later(delay_s))

    async def close(self) -> None:
        """Cancel a pending update, send goodbyes and close the zeroconf instance we own."""
        if self._flush_task is not None:
            self._flush_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush_task
            self._flush_task = None
        if self._zc is None:
            return
        async with self._lock:
            if self._info is not None:
                goodbyes = await self._zc.async_unregister_service(self._info)
                await goodbyes
                self._info = None
        if self._owns_zc:
            await self._zc.async_close()
        self._zc = None

    async def _flush_later(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)  # the rate limit itself, not synchronisation
        record, self._pending = self._pending, None
        if record is None:
            return
        try:
            await self._publish(record)
        except Exception:
            # Nobody awaits this task until close(); the next update() retries.
            logger.exception("advertising update for node %s failed", record.node_id)

    async def _publish(self, record: NodeRecord) -> None:
        assert self._zc is not None
        async with self._lock:
            info = self._info_for(record)
            sent = await self._zc.async_update_service(info)
            await sent
            self._info = info
            self._mark_published(record)
        logger.debug("advertised update for node %s: %s", record.node_id, txt_properties(record))

    def _mark_published(self, record: NodeRecord) -> None:
        self._published = record
        self._last_publish_s = self._clock()

    def _info_for(self, record: NodeRecord) -> AsyncServiceInfo:
        addresses = list(record.addresses) or mdns.ipv4_interfaces(self._interfaces)
        if not addresses:
            addresses = mdns.local_ipv4_addresses()
        port = record.metrics_port if record.port is None else record.port
        return mdns.service_info(
            mdns.SERVICE_TYPE, record.node_id, port, txt_properties(record), addresses
        )
