"""The fleet's certificate authority and the coordinator's own TLS identity.

Two roles, two certificates, created on first start under MLXFLEET_HOME/pki:
- the fleet CA issues every node a client certificate (CN = node id) from the node's CSR,
  so a node's private key never leaves the node; engines serve TLS with the same certificate;
- the coordinator's server certificate is self-signed and pinned by agents: a join token
  carries its fingerprint, so an agent verifies the coordinator before sending the token.
The fleet CA also issues the gateway's HTTPS certificate (`--tls`) for this host's names, so
clients that trust the exported CA (`mlxfleet ca export`) can verify the gateway.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from coordinator.errors import EnrollmentError
from mlxfleet.join import COORDINATOR_TLS_NAME as SERVER_NAME
from mlxfleet.join import fingerprint, new_key_pem

logger = logging.getLogger(__name__)

PKI_DIR = "pki"
CA_CERT_FILE = "ca.crt"  # the one file of the folder that clients may have (`mlxfleet ca export`)

CA_VALIDITY_DAYS = 3650
SERVER_VALIDITY_DAYS = 3650
NODE_VALIDITY_DAYS = 825
GATEWAY_VALIDITY_DAYS = 825  # macOS refuses TLS server certificates valid for longer
GATEWAY_RENEW_DAYS = 30  # a gateway certificate this close to its end is issued again
GATEWAY_CERT_FILE = "gateway.crt"
GATEWAY_KEY_FILE = "gateway.key"
CLOCK_SKEW = datetime.timedelta(minutes=5)  # certificates start this early for skewed clocks


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def _general_name(name: str) -> x509.GeneralName:
    """A certificate's name for a host: an IP address entry for an address, else DNS."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@dataclass(frozen=True, slots=True)
class FleetPki:
    """The CA and the server identity, as PEM bytes. Immutable once loaded."""

    ca_cert_pem: bytes
    ca_key_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes

    @property
    def server_fingerprint(self) -> str:
        return fingerprint(self.server_cert_pem)

    @classmethod
    def load_or_create(cls, home: Path) -> FleetPki:
        """Read MLXFLEET_HOME/pki, creating the CA and server certificate on first use."""
        folder = home / PKI_DIR
        files = {n: folder / n for n in (CA_CERT_FILE, "ca.key", "server.crt", "server.key")}
        if not all(p.exists() for p in files.values()):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o700)
            ca_key, ca_cert = _self_signed("mlxfleet fleet CA", ca=True)
            server_key, server_cert = _self_signed(SERVER_NAME, ca=False)
            _write_private(files["ca.key"], ca_key)
            files[CA_CERT_FILE].write_bytes(ca_cert)
            _write_private(files["server.key"], server_key)
            files["server.crt"].write_bytes(server_cert)
            logger.info("created the fleet CA and server certificate in %s", folder)
        _add_key_identifier(files[CA_CERT_FILE], files["ca.key"])
        return cls(
            ca_cert_pem=files[CA_CERT_FILE].read_bytes(),
            ca_key_pem=files["ca.key"].read_bytes(),
            server_cert_pem=files["server.crt"].read_bytes(),
            server_key_pem=files["server.key"].read_bytes(),
        )

    def issue_node_certificate(self, node_id: str, csr_pem: bytes) -> bytes:
        """Sign the node's CSR public key as CN=node_id; the CSR's own subject is ignored."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise EnrollmentError("certificate request is not a PEM CSR") from None
        if not csr.is_signature_valid:
            raise EnrollmentError("certificate request signature does not verify")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.key_size < 256:
            raise EnrollmentError("certificate request must carry an EC key of 256 bits or more")
        # The gateway checks an engine's certificate against the node id as its name.
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
        return self._sign(node_id, public_key, [node_id], usages, NODE_VALIDITY_DAYS)

    def gateway_certificate(self, home: Path, names: Sequence[str]) -> tuple[Path, Path]:
        """The gateway's HTTPS certificate and key files under MLXFLEET_HOME/pki, issued by the
        fleet CA for `names` (host names and IP addresses); issued again when the names change,
        the CA is another one or it nears its end."""
        folder = home / PKI_DIR
        cert_path, key_path = folder / GATEWAY_CERT_FILE, folder / GATEWAY_KEY_FILE
        if not self._gateway_current(cert_path, key_path, names):
            key_pem = new_key_pem()
            key = serialization.load_pem_private_key(key_pem, password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            usages = [ExtendedKeyUsageOID.SERVER_AUTH]
            cert_pem = self._sign(
                "mlxfleet gateway", key.public_key(), names, usages, GATEWAY_VALIDITY_DAYS
            )
            _write_private(key_path, key_pem)
            cert_path.write_bytes(cert_pem)
            logger.info("issued the gateway certificate for %s", ", ".join(names))
        return cert_path, key_path

    def _gateway_current(self, cert_path: Path, key_path: Path, names: Sequence[str]) -> bool:
        """Whether the gateway's files hold a matching pair from this CA for exactly `names`,
        with more than GATEWAY_RENEW_DAYS left."""
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert.verify_directly_issued_by(x509.load_pem_x509_certificate(self.ca_cert_pem))
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            return False
        left = cert.not_valid_after_utc - _now()
        return (
            set(sans) == {_general_name(n) for n in names}
            and cert.public_key() == key.public_key()
            and left > datetime.timedelta(days=GATEWAY_RENEW_DAYS)
        )

    def _sign(
        self,
        common_name: str,
        public_key: ec.EllipticCurvePublicKey,
        names: Sequence[str],
        usages: list[ObjectIdentifier],
        days: int,
    ) -> bytes:
        """A certificate from the fleet CA for `public_key`: CN=common_name, valid under `names`
        for `usages`. Key identifiers both ways: strict verifiers (Python 3.13's default
        context) refuse a chain without them."""
        ca_key = serialization.load_pem_private_key(self.ca_key_pem, password=None)
        ca_cert = x509.load_pem_x509_certificate(self.ca_cert_pem)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)


def _add_key_identifier(cert_path: Path, key_path: Path) -> None:
    """A fleet CA made before its certificate carried a Subject Key Identifier gets one: the
    same key, subject, serial and validity, signed again. Strict verifiers (Python 3.13's
    default context) refuse a chain whose CA lacks it; every certificate it issued still
    verifies (same issuer name, same key)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return
    except x509.ExtensionNotFound:
        pass
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(key.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    upgraded = builder.add_extension(ski, critical=False).sign(key, hashes.SHA256())
    tmp = cert_path.with_suffix(".tmp")
    tmp.write_bytes(upgraded.public_bytes(serialization.Encoding.PEM))
    tmp.replace(cert_path)  # atomic: a reader never sees half a certificate
    logger.info("added a key identifier to the fleet CA certificate %s", cert_path)


def _self_signed(common_name: str, *, ca: bool) -> tuple[bytes, bytes]:
    key_pem = new_key_pem()
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = _now()
    days = CA_VALIDITY_DAYS if ca else SERVER_VALIDITY_DAYS
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        ).add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False
        )
    cert = builder.sign(key, hashes.SHA256())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)
