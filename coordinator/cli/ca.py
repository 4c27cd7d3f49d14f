"""`mlxfleet ca export`: the fleet CA's certificate, for clients of the gateway's HTTPS; and
how the CLI itself trusts the gateway on this host.

The CA signs the gateway's certificate under `mlxfleet coordinator --tls`; a client that trusts
the exported file (`SSL_CERT_FILE`, or the SDK's own CA option) verifies the gateway.
"""

from __future__ import annotations

import argparse
import ssl
import sys
from pathlib import Path
from typing import Any

from coordinator.cli.common import HOME_HELP_SHORT, home_of
from coordinator.cli.errors import CliError
from coordinator.pki import CA_CERT_FILE, PKI_DIR


def add_parser(subparsers: Any) -> None:
    """`ca export [--out FILE]`."""
    ca = subparsers.add_parser("ca", help="the fleet CA, for HTTPS clients")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    export = ca_sub.add_parser("export", help="write the CA certificate (PEM) for clients")
    export.add_argument("--out", metavar="FILE", help="write it here (default: print it)")
    export.add_argument("--home", help=HOME_HELP_SHORT)
    export.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    home = home_of(args)
    path = home / PKI_DIR / CA_CERT_FILE
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise CliError(f"no fleet CA in {path.parent}: start the coordinator once") from None
    if args.out is None:
        sys.stdout.write(pem.decode())
        return
    out = Path(args.out).expanduser()
    out.write_bytes(pem)
    print(f"wrote the fleet CA certificate to {out}")


def local_gateway_tls(runtime: dict[str, Any]) -> ssl.SSLContext | None:
    """How the CLI verifies this host's gateway, from its coordinator.json: None for plain
    HTTP; else trust exactly the certificate it serves. A pin, not a name check: an operator's
    own certificate (--tls-cert) need not name 127.0.0.1, where the CLI calls it."""
    if runtime.get("gateway_scheme") != "https":
        return None
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        leaf = x509.load_pem_x509_certificates(Path(runtime["gateway_cert"]).read_bytes())[0]
    except (OSError, ValueError, KeyError) as exc:
        raise CliError(f"cannot read the gateway's certificate: {exc}") from None
    context = ssl.create_default_context(cadata=leaf.public_bytes(Encoding.PEM).decode())
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the leaf itself is the anchor
    return context
