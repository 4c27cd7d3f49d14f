"""The node's identity: its id, private key and certificate, kept on the node across restarts.

The key is made here and never leaves the node: enrollment sends a CSR, and the coordinator
returns a certificate (CN = node id) from the fleet CA. The coordinator's own certificate is
pinned: the join token carries its fingerprint, and later connections trust only it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

IDENTITY_FILES = ("identity.json", "node.key", "node.crt", "coordinator.crt", "fleet-ca.crt")


def make_csr(key_pem: bytes) -> bytes:
    """A certificate request for this key; the coordinator chooses the subject."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mlxfleet-node")])
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def certificate_cn(cert_pem: bytes) -> str:
    """The certificate's common name (a node certificate's CN is the node id)."""
    names = x509.load_pem_x509_certificate(cert_pem).subject.get_attributes_for_oid(
        NameOID.COMMON_NAME
    )
    return str(names[0].value) if names else ""


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """Everything the agent needs to reconnect without a token."""

    node_id: str
    key_pem: bytes
    cert_pem: bytes
    coordinator_cert_pem: bytes  # pinned at enrollment
    fleet_ca_pem: bytes
    coordinator: str = ""  # host:port of the control stream, so a restart needs no flag

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        contents = {
            "identity.json": json.dumps(
                {"node_id": self.node_id, "coordinator": self.coordinator}
            ).encode(),
            "node.key": self.key_pem,
            "node.crt": self.cert_pem,
            "coordinator.crt": self.coordinator_cert_pem,
            "fleet-ca.crt": self.fleet_ca_pem,
        }
        for name, data in contents.items():
            tmp = folder / f".{name}.tmp"
            tmp.write_bytes(data)
            tmp.chmod(0o600)
            os.replace(tmp, folder / name)  # a crash mid-save never leaves half a file

    @classmethod
    def load(cls, folder: Path) -> NodeIdentity | None:
        """The saved identity, or None when there is none (or it is incomplete)."""
        try:
            meta = json.loads((folder / "identity.json").read_text())
            return cls(
                node_id=str(meta["node_id"]),
                coordinator=str(meta.get("coordinator", "")),
                key_pem=(folder / "node.key").read_bytes(),
                cert_pem=(folder / "node.crt").read_bytes(),
                coordinator_cert_pem=(folder / "coordinator.crt").read_bytes(),
                fleet_ca_pem=(folder / "fleet-ca.crt").read_bytes(),
            )
        except (OSError, ValueError, KeyError):
            return None

    @staticmethod
    def forget(folder: Path) -> None:
        for name in IDENTITY_FILES:
            (folder / name).unlink(missing_ok=True)

    def key_path(self, folder: Path) -> Path:
        return folder / "node.key"

    def cert_path(self, folder: Path) -> Path:
        return folder / "node.crt"
