"""The gateway's HTTPS settings (the certificate and the port itself: gateway/tls_site.py).

Three modes. off: plain HTTP, the default (on 127.0.0.1). fleet-ca: a certificate the fleet CA
issues for this host's names and addresses, which clients verify with the CA that `mlxfleet ca
export` writes. files: the operator's own certificate and key.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from coordinator.errors import ConfigError

TlsMode = Literal["off", "fleet-ca", "files"]
TLS_MODES: tuple[str, ...] = get_args(TlsMode)
TLS_KEYS = {"mode", "cert", "key", "names"}  # the [tls] table of fleet.toml
DNS_NAME_RE = re.compile(
    r"^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$"
)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """How the gateway serves: [tls] in fleet.toml, or --tls / --tls-cert and --tls-key."""

    mode: TlsMode = "off"
    cert: Path | None = None  # files: the PEM certificate (its chain may follow it)
    key: Path | None = None  # files: its PEM private key, unencrypted
    names: tuple[str, ...] = ()  # fleet-ca: more names or addresses clients reach it by

    @property
    def scheme(self) -> str:
        return "http" if self.mode == "off" else "https"


def host_name(name: str) -> str | None:
    """A host name lower-cased, an IP address normalised (so certificates compare); None for
    anything else."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        valid = len(name) <= 253 and DNS_NAME_RE.match(name.lower())
        return name.lower() if valid else None


def checked_names(names: Any, where: str) -> tuple[str, ...]:
    """`names` through host_name(); ConfigError naming one that is neither."""
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{where}: expected a list of host names or IP addresses")
    for name in names:
        if host_name(name) is None:
            raise ConfigError(f"{where}: {name!r} is not a host name or IP address")
    return tuple(str(host_name(n)) for n in names)


def parse_tls(raw: Any, where: str) -> TlsConfig:
    """[tls] mode = "fleet-ca" (names = [...]), or cert = "..." and key = "..." (mode files)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: [tls] must be a table")
    unknown = set(raw) - TLS_KEYS
    if unknown:
        raise ConfigError(f"{where}: [tls] unknown key {sorted(unknown)[0]!r}")
    files = "cert" in raw or "key" in raw
    mode = raw.get("mode", "files" if files else "off")
    if mode not in TLS_MODES:
        expected = ", ".join(TLS_MODES)
        raise ConfigError(f"{where}: [tls] mode must be one of {expected}, got {mode!r}")
    paths = [
        Path(p).expanduser() for p in (raw.get("cert"), raw.get("key")) if isinstance(p, str) and p
    ]
    if (mode == "files") != files or (files and len(paths) != 2):
        raise ConfigError(
            f"{where}: [tls] cert and key (two file paths) go together, in mode files"
        )
    if "names" in raw and mode != "fleet-ca":
        raise ConfigError(
            f"{where}: [tls] names are for mode fleet-ca (the fleet CA's certificate)"
        )
    cert, key = paths if files else (None, None)
    return TlsConfig(mode, cert, key, checked_names(raw.get("names", []), f"{where}: [tls] names"))


def is_loopback(host: str) -> bool:
    """Whether only this host can reach an address the gateway listens on."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
