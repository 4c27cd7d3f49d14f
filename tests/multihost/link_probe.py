"""`python -m tests.multihost.link_probe`: one rank-link handshake as a rank's agent sends it
(node_agent/rank_link.py), from the host it runs on, with a node's certificate; prints the
one-line JSON answer (or the connection error). For tests that a link refuses non-members."""

from __future__ import annotations

import json
import socket
import ssl
import sys


def main(address: str, cert_dir: str, group: str, sender: int, to: int) -> int:
    host, port = address.rsplit(":", 1)
    tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=f"{cert_dir}/fleet-ca.crt")
    tls.check_hostname = False  # a fleet node's name is its certificate's CN, not its address
    tls.load_cert_chain(f"{cert_dir}/node.crt", f"{cert_dir}/node.key")
    try:
        raw = socket.create_connection((host, int(port)), timeout=45)
        with raw, tls.wrap_socket(raw) as conn:
            hello = {"group": group, "from": sender, "to": to}
            conn.sendall(json.dumps(hello).encode() + b"\n")
            print(conn.makefile("rb").readline().decode().strip() or "closed")
    except OSError as exc:
        print(json.dumps({"connection_error": str(exc)}))
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args[0], args[1], args[2], int(args[3]), int(args[4])))
