"""Join tokens and the coordinator certificate's pin: what `mlxfleet token create` prints and
what an agent checks before it sends anything (both sides parse the same format)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mlxfleet.errors import JoinTokenError

JOIN_TOKEN_PREFIX = "mlxfj1"
COORDINATOR_TLS_NAME = "mlxfleet-coordinator"  # the name in the coordinator's certificate
FINGERPRINT_HEX_CHARS = 32  # 128 bits of the coordinator certificate's SHA-256 in a join token


def new_key_pem() -> bytes:
    """A fresh P-256 private key, PEM (PKCS#8, unencrypted: files are mode 600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER bytes, hex."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


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
            raise JoinTokenError("not a join token (expected mlxfj1.<fingerprint>.<secret>)")
        if not parts[2]:
            raise JoinTokenError("join token has an empty secret")
        return cls(parts[1].lower(), parts[2])

    def pins(self, cert_pem: bytes) -> bool:
        """Whether this token was made by the coordinator presenting that certificate."""
        return fingerprint(cert_pem).startswith(self.fingerprint_prefix)
