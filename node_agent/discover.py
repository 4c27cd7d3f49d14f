"""Find the coordinator on the LAN by mDNS (`_mlxfleet-coord._tcp.local.`). IPv4 only."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from zeroconf import InterfaceChoice, InterfacesType, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mlxfleet import mdns
from mlxfleet.errors import MalformedRecordError

logger = logging.getLogger(__name__)

# Per attempt to read one announced coordinator's SRV/TXT/A records.
RESOLVE_TIMEOUT_S = 3.0


@dataclass(frozen=True, slots=True)
class CoordinatorAddress:
    """Where an agent dials the coordinator, as the coordinator announced it."""

    host: str  # IPv4
    grpc_port: int
    gateway_port: int
    fingerprint: str
    version: str
    enroll_port: int


def parse_coordinator(
    properties: dict[bytes, bytes | None], addresses: list[str]
) -> CoordinatorAddress:
    """A CoordinatorAddress from TXT properties and IPv4 addresses; raises MalformedRecordError."""
    if not addresses:
        raise MalformedRecordError("no IPv4 address")
    grpc_port = mdns.txt_port(properties, "grpc")
    if grpc_port == 0:
        raise MalformedRecordError("grpc port is 0")
    return CoordinatorAddress(
        host=addresses[0],
        grpc_port=grpc_port,
        gateway_port=mdns.txt_port(properties, "gw"),
        fingerprint=mdns.txt_text(properties, "fp", mdns.MAX_COORD_TXT_VALUE_BYTES),
        version=mdns.txt_text(properties, "v", mdns.MAX_COORD_TXT_VALUE_BYTES),
        enroll_port=mdns.txt_port(properties, "enroll"),
    )


async def find_coordinator(
    timeout_s: float,
    zc: AsyncZeroconf | None = None,
    interfaces: InterfacesType = InterfaceChoice.All,
) -> CoordinatorAddress | None:
    """The first well-formed coordinator announced within timeout_s, or None.

    Uses `zc` when given (and leaves it open); otherwise opens and closes its own on `interfaces`.
    """
    deadline = time.monotonic() + timeout_s
    own_zc = zc is None
    azc = AsyncZeroconf(interfaces=interfaces) if zc is None else zc
    names: asyncio.Queue[str] = asyncio.Queue()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is not ServiceStateChange.Removed:
            names.put_nowait(name)

    browser = AsyncServiceBrowser(azc.zeroconf, mdns.COORD_SERVICE_TYPE, handlers=[on_change])
    try:
        while (left_s := deadline - time.monotonic()) > 0:
            try:
                name = await asyncio.wait_for(names.get(), left_s)
            except TimeoutError:
                break
            found = await _resolve(azc, name, min(RESOLVE_TIMEOUT_S, deadline - time.monotonic()))
            if found is not None:
                logger.info("found coordinator %s at %s:%d", name, found.host, found.grpc_port)
                return found
        return None
    finally:
        await browser.async_cancel()
        if own_zc:
            await azc.async_close()


async def _resolve(azc: AsyncZeroconf, name: str, timeout_s: float) -> CoordinatorAddress | None:
    if timeout_s <= 0:
        return None
    info = AsyncServiceInfo(mdns.COORD_SERVICE_TYPE, name)
    if not await info.async_request(azc.zeroconf, timeout_s * 1000):
        logger.warning("coordinator %s announced itself but did not answer in time", name)
        return None
    try:
        return parse_coordinator(info.properties, info.parsed_addresses(IPVersion.V4Only))
    except MalformedRecordError as exc:
        logger.warning("ignoring coordinator record %s: %s", name, exc)
        return None
