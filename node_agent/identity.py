"""The node's identity: its id, private key and certificate, kept on the node across restarts.

The key is made here and never leaves the node: enrollment sends a CSR, and the coordinator
returns a certificate (CN = node id) from the fleet CA. The coordinator's own certificate is
pinned: the join token carries its fingerprint, and later connections trust only it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

IDENTITY_FILES = ("identity.json", "node.key", "node.crt", "coordinator.crt", "fleet-ca.crt")
JOIN_TOKEN_PREFIX = "mlxfj1"
COORDINATOR_TLS_NAME = "mlxfleet-coordinator"  # the name in the coordinator's certificate
FINGERPRINT_HEX_CHARS = 32  # 128 bits of the coordinator certificate's SHA-256 in a join token


def new_key_pem() -> bytes:
    """A fresh P-256 private key, PEM (PKCS#8, unencrypted: files are mode 600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_csr(key_pem: bytes) -> bytes:
    """A certificate request for this key; the coordinator chooses the subject."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mlxfleet-node")])
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER bytes, hex."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def certificate_cn(cert_pem: bytes) -> str:
    """The certificate's common name (a node certificate's CN is the node id)."""
    names = x509.load_pem_x509_certificate(cert_pem).subject.get_attributes_for_oid(
        NameOID.COMMON_NAME
    )
    return str(names[0].value) if names else ""


@dataclass(frozen=True, slots=True)
class JoinToken:
    """`mlxfj1.<coordinator fingerprint prefix>.<secret>`: what `mlxfleet token create` prints."""

    fingerprint_prefix: str
    secret: str

    def __str__(self) -> str:
        return f"{JOIN_TOKEN_PREFIX}.{self.fingerprint_prefix}.{self.secret}"

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        parts = text.strip().split(".")
        if (
            len(parts) != 3
            or parts[0] != JOIN_TOKEN_PREFIX
            or len(parts[1]) != FINGERPRINT_HEX_CHARS
        ):
            raise ValueError("not a join token (expected mlxfj1.<fingerprint>.<secret>)")
        if not parts[2]:
            raise ValueError("join token has an empty secret")
        return cls(parts[1].lower(), parts[2])

    def pins(self, cert_pem: bytes) -> bool:
        """Whether this token was made by the coordinator presenting that certificate."""
        return fingerprint(cert_pem).startswith(self.fingerprint_prefix)


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
