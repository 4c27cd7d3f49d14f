"""mDNS on the coordinator: announce ourselves, and watch which agents the LAN holds.

Discovery only finds nodes; enrollment over gRPC admits them. IPv4 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast, get_args

from zeroconf import InterfaceChoice, InterfacesType, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mlxfleet import mdns
from mlxfleet.errors import MalformedRecordError
from mlxfleet.facts import Role, ThermalState

logger = logging.getLogger(__name__)

# Per attempt to read one announced node's SRV/TXT/A records.
RESOLVE_TIMEOUT_S = 3.0
# Far above any Mac's RAM; a bigger number is a broken or hostile record.
MAX_RAM_GIB = 16384


@dataclass(frozen=True, slots=True)
class DiscoveredNode:
    """A node agent seen on the LAN, as its mDNS record describes it."""

    node_id: str
    addresses: tuple[str, ...]
    port: int
    chip: str
    ram_gib: int
    role: Role
    avail_gib: float
    thermal: ThermalState
    version: str
    last_seen: float  # time.monotonic() of the latest record


def coordinator_txt(
    version: str, grpc_port: int, gateway_port: int, fingerprint: str, enroll_port: int
) -> dict[str, str]:
    """The coordinator's TXT properties; raises ValueError on a value agents would drop."""
    txt = {
        "v": version,
        "grpc": str(grpc_port),
        "gw": str(gateway_port),
        "fp": fingerprint,
        "enroll": str(enroll_port),
    }
    for key, value in txt.items():
        if len(value.encode()) > mdns.MAX_COORD_TXT_VALUE_BYTES:
            raise ValueError(
                f"TXT value for {key!r} is over {mdns.MAX_COORD_TXT_VALUE_BYTES} bytes"
            )
    return txt


def parse_node(
    instance: str,
    properties: dict[bytes, bytes | None],
    addresses: list[str],
    port: int,
    now_s: float,
) -> DiscoveredNode:
    """A DiscoveredNode from one resolved record; raises MalformedRecordError."""
    node_id = mdns.txt_text(properties, "id", mdns.MAX_NODE_ID_BYTES)
    if node_id != instance:
        raise MalformedRecordError(f"TXT id {node_id!r} differs from instance name {instance!r}")
    role = mdns.txt_text(properties, "role", mdns.MAX_TXT_VALUE_BYTES)
    if role not in get_args(Role):
        raise MalformedRecordError(f"unknown role {role!r}")
    thermal = mdns.txt_text(properties, "thermal", mdns.MAX_TXT_VALUE_BYTES)
    if thermal not in get_args(ThermalState):
        raise MalformedRecordError(f"unknown thermal state {thermal!r}")
    ram_text = mdns.txt_text(properties, "ram_gib", mdns.MAX_TXT_VALUE_BYTES)
    if not ram_text.isdigit() or not 0 < int(ram_text) <= MAX_RAM_GIB:
        raise MalformedRecordError(f"ram_gib is not a plausible GiB count: {ram_text!r}")
    avail_text = mdns.txt_text(properties, "avail_gib", mdns.MAX_TXT_VALUE_BYTES)
    try:
        avail_gib = float(avail_text)
    except ValueError as exc:
        raise MalformedRecordError(f"avail_gib is not a number: {avail_text!r}") from exc
    if not 0.0 <= avail_gib <= MAX_RAM_GIB:  # also rejects nan and inf
        raise MalformedRecordError(f"avail_gib is out of range: {avail_text!r}")
    mdns.txt_port(properties, "metrics")
    return DiscoveredNode(
        node_id=node_id,
        addresses=tuple(addresses),
        port=port,
        chip=mdns.txt_text(properties, "chip", mdns.MAX_TXT_VALUE_BYTES),
        ram_gib=int(ram_text),
        role=cast(Role, role),
        avail_gib=avail_gib,
        thermal=cast(ThermalState, thermal),
        version=mdns.txt_text(properties, "v", mdns.MAX_TXT_VALUE_BYTES),
        last_seen=now_s,
    )


def instance_of(name: str, service_type: str) -> str:
    """`node-1._mlxfleet._tcp.local.` → `node-1`."""
    return name.removesuffix("." + service_type)


class CoordinatorAdvertiser:
    """Announces the coordinator so agents on the LAN can find it. Use from the event loop only.

    Owns its AsyncZeroconf; close() sends goodbyes and closes it.
    """

    def __init__(
        self,
        version: str,
        grpc_port: int,
        gateway_port: int,
        fingerprint: str,
        enroll_port: int,
        *,
        instance: str | None = None,
        addresses: tuple[str, ...] = (),
        interfaces: InterfacesType = InterfaceChoice.All,
    ) -> None:
        self._txt = coordinator_txt(version, grpc_port, gateway_port, fingerprint, enroll_port)
        self._instance = instance or socket.gethostname().split(".")[0]
        self._port = grpc_port
        self._addresses = list(addresses) or mdns.ipv4_interfaces(interfaces)
        self._interfaces = interfaces
        self._zc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None

    async def start(self) -> None:
        """Register the service; returns once the announcements are sent."""
        self._zc = AsyncZeroconf(interfaces=self._interfaces)
        addresses = self._addresses or mdns.local_ipv4_addresses()
        info = mdns.service_info(
            mdns.COORD_SERVICE_TYPE, self._instance, self._port, self._txt, addresses
        )
        announced = await self._zc.async_register_service(info)
        await announced
        self._info = info
        logger.info("advertising coordinator %s on %s", self._instance, addresses)

    async def close(self) -> None:
        """Send goodbyes and close the zeroconf instance."""
        if self._zc is None:
            return
        if self._info is not None:
            goodbyes = await self._zc.async_unregister_service(self._info)
            await goodbyes
            self._info = None
        await self._zc.async_close()
        self._zc = None


class Discovery:
    """Keeps the node agents seen on the LAN, by node id. Use from the event loop only.

    Owns its AsyncZeroconf, its browser and one resolve task per announced name; close()
    cancels them all. `on_change` runs on the loop after each change to `nodes` and must not block.
    """

    def __init__(
        self,
        interfaces: InterfacesType = InterfaceChoice.All,
        *,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.on_change = on_change
        self._interfaces = interfaces
        self._clock = clock
        self._nodes: dict[str, DiscoveredNode] = {}
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._resolving: dict[str, asyncio.Task[None]] = {}

    @property
    def nodes(self) -> Mapping[str, DiscoveredNode]:
        """A snapshot of the nodes seen, by node id."""
        return dict(self._nodes)

    async def start(self) -> None:
        """Open the sockets and start browsing."""
        self._zc = AsyncZeroconf(interfaces=self._interfaces)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, mdns.SERVICE_TYPE, handlers=[self._on_service_state_change]
        )

    async def close(self) -> None:
        """Stop browsing, cancel pending resolves and close the sockets."""
        tasks = list(self._resolving.values())
        self._resolving.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._zc is not None:
            await self._zc.async_close()
            self._zc = None

    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        instance = instance_of(name, service_type)
        pending = self._resolving.pop(name, None)
        if pending is not None:
            pending.cancel()  # its answer is older than this event
        if state_change is ServiceStateChange.Removed:
            if self._nodes.pop(instance, None) is not None:
                logger.info("node %s left the LAN", instance)
                self._changed()
            return
        self._resolving[name] = asyncio.create_task(self._resolve(name, instance))

    async def _resolve(self, name: str, instance: str) -> None:
        assert self._zc is not None
        try:
            info = AsyncServiceInfo(mdns.SERVICE_TYPE, name)
            if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_S * 1000):
                logger.warning("node %s announced itself but did not answer in time", instance)
                return
        finally:
            if self._resolving.get(name) is asyncio.current_task():
                del self._resolving[name]
        self.apply_record(
            instance, info.properties, info.parsed_addresses(IPVersion.V4Only), info.port or 0
        )

    def apply_record(
        self,
        instance: str,
        properties: dict[bytes, bytes | None],
        addresses: list[str],
        port: int,
    ) -> DiscoveredNode | None:
        """Store one resolved record; a malformed one is logged and ignored (returns None)."""
        try:
            node = parse_node(instance, properties, addresses, port, self._clock())
        except MalformedRecordError as exc:
            logger.warning("ignoring mDNS record for %r: %s", instance, exc)
            return None
        if instance not in self._nodes:
            logger.info("node %s seen on the LAN at %s", instance, ",".join(node.addresses))
        self._nodes[instance] = node
        self._changed()
        return node

    def _changed(self) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change()
        except Exception:
            # A broken hook must not stop discovery; the zeroconf loop would swallow it anyway.
            logger.exception("discovery on_change hook failed")
