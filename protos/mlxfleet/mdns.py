"""The mDNS contract: service types, TXT keys and limits, and the helpers both sides use to
write and read records. Finding is not admitting; nothing secret is ever in a record. IPv4 only.
"""

from __future__ import annotations

import ipaddress

import ifaddr
from zeroconf import InterfaceChoice, InterfacesType
from zeroconf.asyncio import AsyncServiceInfo

from mlxfleet.errors import MalformedRecordError

SERVICE_TYPE = "_mlxfleet._tcp.local."
# The whole TXT contract. Nothing secret may ever be added: any host on the LAN reads it.
TXT_KEYS = frozenset(
    {"id", "v", "grpc", "metrics", "chip", "ram_gib", "role", "avail_gib", "thermal"}
)
# Readers drop a record with a longer value; keeps the TXT record well under one packet.
MAX_TXT_VALUE_BYTES = 64
# A DNS label holds at most 63 bytes, and the instance name is the node id.
MAX_NODE_ID_BYTES = 63
COORD_SERVICE_TYPE = "_mlxfleet-coord._tcp.local."
# The coordinator's TXT contract: all public (fp is a certificate fingerprint, not a key).
COORD_TXT_KEYS = frozenset({"v", "grpc", "gw", "fp"})
MAX_COORD_TXT_VALUE_BYTES = 128  # a SHA-256 fingerprint in hex with a prefix fits


def txt_text(properties: dict[bytes, bytes | None], key: str, max_bytes: int) -> str:
    """One TXT value as text; raises MalformedRecordError when missing, oversized or not UTF-8."""
    raw = properties.get(key.encode())
    if raw is None:
        raise MalformedRecordError(f"TXT key {key!r} is missing")
    if len(raw) > max_bytes:
        raise MalformedRecordError(f"TXT value for {key!r} is {len(raw)} bytes (max {max_bytes})")
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise MalformedRecordError(f"TXT value for {key!r} is not UTF-8: {raw!r}") from exc


def txt_port(properties: dict[bytes, bytes | None], key: str) -> int:
    """A TXT value that must be a TCP port (0 allowed: 'none')."""
    text = txt_text(properties, key, 5)
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise MalformedRecordError(f"TXT value for {key!r} is not a port: {text!r}")
    return int(text)


def local_ipv4_addresses() -> list[str]:
    """Every non-loopback IPv4 address of this host."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.IPv4Address(ip.ip).is_loopback:
                found.append(ip.ip)
    return found


def ipv4_interfaces(interfaces: InterfacesType) -> list[str]:
    """The IPv4 addresses named in an interfaces choice (none for an InterfaceChoice)."""
    if isinstance(interfaces, InterfaceChoice):
        return []
    return [i for i in interfaces if isinstance(i, str) and ipaddress.ip_address(i).version == 4]


def service_info(
    service_type: str, instance: str, port: int, txt: dict[str, str], addresses: list[str]
) -> AsyncServiceInfo:
    """A ServiceInfo with our naming: the host record gets an `mlxfleet-` prefix."""
    # A Mac already answers for <hostname>.local.; a server name of our own cannot collide with it.
    return AsyncServiceInfo(
        service_type,
        f"{instance}.{service_type}",
        port=port,
        properties=txt,
        server=f"mlxfleet-{instance}.local.",
        parsed_addresses=addresses,
    )
