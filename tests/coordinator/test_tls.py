"""The gateway's HTTPS settings and certificate, without a running coordinator: [tls] and the
flags, the names the fleet CA's certificate carries, bad files, `ca export`, the CLI's pin."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from coordinator.cli import build_parser, main
from coordinator.cli.ca import local_gateway_tls
from coordinator.cli.coordinator import tls_of
from coordinator.cli.errors import CliError
from coordinator.errors import ConfigError
from coordinator.gateway.tls_site import check_pair, gateway_names, server_context
from coordinator.pki import FleetPki
from coordinator.tls import TlsConfig, is_loopback, parse_tls
from mlxfleet.mdns import local_ipv4_addresses
from tests.certs import write_key, write_self_signed

NAMES = ("coord.example", "localhost", "10.1.2.3", "127.0.0.1", "::1")


def sans(cert_path: Path) -> tuple[set[str], set[str]]:
    """A certificate's DNS names and IP addresses."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(names.get_values_for_type(x509.DNSName)), {
        str(ip) for ip in names.get_values_for_type(x509.IPAddress)
    }


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> None:
    """One TLS handshake over a socket pair, the client asking for `name`; raises the client's
    verification error."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)

    def serve() -> None:
        with contextlib.suppress(OSError):  # the client refused us: the test checks its side
            server.wrap_socket(b, server_side=True).close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client.wrap_socket(a, server_hostname=name).close()
    finally:
        a.close()
        thread.join()
        b.close()


def strict_client(ca_pem: bytes) -> ssl.SSLContext:
    """What Python 3.13 clients do by default: a strict chain check (key identifiers)."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def test_the_fleet_ca_certificate_names_every_host_name_and_address(tmp_path: Path) -> None:
    pki = FleetPki.load_or_create(tmp_path)
    cert_path, key_path = pki.gateway_certificate(tmp_path, NAMES)
    assert (cert_path, key_path) == (tmp_path / "pki/gateway.crt", tmp_path / "pki/gateway.key")
    assert sans(cert_path) == ({"coord.example", "localhost"}, {"10.1.2.3", "127.0.0.1", "::1"})
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert key_path.stat().st_mode & 0o777 == 0o600
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    for name in ("coord.example", "10.1.2.3", "::1"):
        handshake(server, strict_client(pki.ca_cert_pem), name)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(server, strict_client(pki.ca_cert_pem), "elsewhere.example")


def test_the_certificate_is_kept_until_the_names_or_the_ca_change(tmp_path: Path) -> None:
    pki = FleetPki.load_or_create(tmp_path)
    cert_path, _ = pki.gateway_certificate(tmp_path, NAMES)
    first = cert_path.read_bytes()
    pki.gateway_certificate(tmp_path, tuple(reversed(NAMES)))
    assert cert_path.read_bytes() == first  # the same names in another order
    pki.gateway_certificate(tmp_path, (*NAMES, "10.9.9.9"))
    assert "10.9.9.9" in sans(cert_path)[1]
    other = FleetPki.load_or_create(tmp_path / "other")
    second = cert_path.read_bytes()
    other.gateway_certificate(tmp_path, (*NAMES, "10.9.9.9"))
    issuer = x509.load_pem_x509_certificate(cert_path.read_bytes()).issuer
    assert cert_path.read_bytes() != second
    assert issuer == x509.load_pem_x509_certificate(other.ca_cert_pem).subject


def test_gateway_names_on_every_address_and_on_one() -> None:
    short = socket.gethostname().split(".")[0].lower()
    everywhere = gateway_names("0.0.0.0", ("coord.example",))
    assert {"localhost", "127.0.0.1", "::1", short, f"{short}.local", "coord.example"} <= set(
        everywhere
    )
    assert set(local_ipv4_addresses()) <= set(everywhere)
    one = gateway_names("192.0.2.7", ())
    assert "192.0.2.7" in one
    assert set(one) - {"192.0.2.7"} == set(gateway_names("127.0.0.1", ()))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({}, TlsConfig()),
        ({"mode": "fleet-ca"}, TlsConfig("fleet-ca")),
        (
            {"mode": "fleet-ca", "names": ["Coord.Example", "0:0::1"]},
            TlsConfig("fleet-ca", names=("coord.example", "::1")),
        ),
        ({"cert": "/c.pem", "key": "/k.pem"}, TlsConfig("files", Path("/c.pem"), Path("/k.pem"))),
    ],
)
def test_tls_table(raw: dict, expected: TlsConfig) -> None:
    assert parse_tls(raw, "fleet.toml") == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"mode": "on"}, "fleet.toml: [tls] mode must be one of off, fleet-ca, files, got 'on'"),
        ({"cert": "/c.pem"}, "[tls] cert and key (two file paths) go together, in mode files"),
        ({"mode": "files"}, "[tls] cert and key (two file paths) go together"),
        ({"mode": "fleet-ca", "cert": "/c", "key": "/k"}, "go together, in mode files"),
        ({"cert": "/c", "key": "/k", "names": ["a"]}, "[tls] names are for mode fleet-ca"),
        ({"mode": "fleet-ca", "names": ["bad name"]}, "'bad name' is not a host name"),
        ({"mode": "fleet-ca", "names": "a.example"}, "expected a list of host names"),
        ({"port": 1}, "[tls] unknown key 'port'"),
    ],
)
def test_bad_tls_table_is_one_line(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_tls(raw, "fleet.toml")
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


def flags(*argv: str) -> TlsConfig | None:
    return tls_of(build_parser().parse_args(["coordinator", *argv]))


def test_tls_flags() -> None:
    assert flags() is None  # fleet.toml's [tls] stands
    assert flags("--tls", "--tls-name", "Coord.Example") == TlsConfig(
        "fleet-ca", names=("coord.example",)
    )
    assert flags("--tls-cert", "/c", "--tls-key", "/k") == TlsConfig(
        "files", Path("/c"), Path("/k")
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--tls", "--tls-cert", "/c", "--tls-key", "/k"), "--tls-cert and --tls-key, not both"),
        (("--tls-key", "/k"), "--tls-cert and --tls-key go together"),
        (("--tls-name", "a.example"), "--tls-name names the fleet-CA certificate"),
        (("--tls", "--tls-name", "a b"), "--tls-name: 'a b' is not a host name or IP address"),
    ],
)
def test_bad_tls_flags(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises((CliError, ConfigError), match=message):
        flags(*argv)


def test_an_operator_pair_that_cannot_be_served_is_named(tmp_path: Path) -> None:
    cert, key = write_self_signed(tmp_path, "coord.example")
    check_pair(cert, key)  # a good pair passes
    other_key = tmp_path / "other.key"
    write_key(other_key)
    locked = tmp_path / "locked.key"
    write_key(locked, password=b"secret")
    cases = {
        (tmp_path / "gone.crt", key): f"TLS certificate {tmp_path}/gone.crt: No such file",
        (key, key): f"TLS certificate {key}: not a PEM certificate",
        (cert, cert): f"TLS key {cert}: not a PEM private key",
        (cert, locked): f"TLS key {locked} is encrypted: give it unencrypted",
        (cert, other_key): f"TLS key {other_key} does not belong to certificate {cert}",
    }
    for (c, k), message in cases.items():
        with pytest.raises(ConfigError) as refused:
            check_pair(c, k)
        assert str(refused.value).startswith(message)


def test_server_context_serves_the_chosen_certificate(tmp_path: Path) -> None:
    pki = FleetPki.load_or_create(tmp_path)
    assert server_context(TlsConfig(), "127.0.0.1", pki, tmp_path) is None
    cert, key = write_self_signed(tmp_path, "coord.example")
    served = server_context(TlsConfig("files", cert, key), "127.0.0.1", pki, tmp_path)
    assert served is not None and served[1] == cert
    served = server_context(TlsConfig("fleet-ca", names=("x.example",)), "10.0.0.9", pki, tmp_path)
    assert served is not None and served[1] == tmp_path / "pki" / "gateway.crt"
    dns, ips = sans(served[1])
    assert "x.example" in dns and "10.0.0.9" in ips


def test_only_loopback_listening_counts_as_private() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.4", "coord.example"))


def test_ca_export_prints_or_writes_the_ca_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ca", "export", "--home", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"mlxfleet: error: no fleet CA in {tmp_path}/pki: start the coordinator once\n"
    )
    pki = FleetPki.load_or_create(tmp_path)
    assert main(["ca", "export", "--home", str(tmp_path)]) == 0
    assert capsys.readouterr().out == pki.ca_cert_pem.decode()
    out = tmp_path / "client" / "fleet-ca.pem"
    out.parent.mkdir()
    assert main(["ca", "export", "--home", str(tmp_path), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote the fleet CA certificate to {out}\n"
    assert out.read_bytes() == pki.ca_cert_pem
    assert b"PRIVATE KEY" not in out.read_bytes()


def test_the_cli_pins_the_certificate_its_gateway_serves(tmp_path: Path) -> None:
    """The operator's own certificate does not name 127.0.0.1: the pin still holds, and a
    certificate other than the one coordinator.json names is refused."""
    assert local_gateway_tls({"gateway_scheme": "http"}) is None
    cert, key = write_self_signed(tmp_path, "coord.example")
    client = local_gateway_tls({"gateway_scheme": "https", "gateway_cert": str(cert)})
    assert client is not None
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    handshake(server, client, "127.0.0.1")
    impostor = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    impostor.load_cert_chain(*write_self_signed(tmp_path, "coord.example.impostor"))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(impostor, client, "127.0.0.1")
    with pytest.raises(CliError, match="cannot read the gateway's certificate"):
        local_gateway_tls({"gateway_scheme": "https", "gateway_cert": str(tmp_path / "gone")})


def test_an_old_fleet_ca_gets_a_key_identifier_and_keeps_what_it_issued(tmp_path: Path) -> None:
    """Fleet CAs made before issue 17 have no Subject Key Identifier; strict clients (Python
    3.13's default) refuse what they sign. Loading such a CA signs it again with one: same key,
    subject and serial, so certificates it issued before still verify."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from coordinator.pki import FleetPki as Pki

    pki = Pki.load_or_create(tmp_path)
    ca_path = tmp_path / "pki" / "ca.crt"
    ca = x509.load_pem_x509_certificate(pki.ca_cert_pem)
    ca_key = serialization.load_pem_private_key(pki.ca_key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    old = x509.CertificateBuilder(
        ca.issuer, ca.subject, ca.public_key(), ca.serial_number,
        ca.not_valid_before_utc, ca.not_valid_after_utc,
        [e for e in ca.extensions if not isinstance(e.value, x509.SubjectKeyIdentifier)],
    ).sign(ca_key, hashes.SHA256())  # fmt: skip
    old_pem = old.public_bytes(serialization.Encoding.PEM)
    ca_path.write_bytes(old_pem)
    node_key = ec.generate_private_key(ec.SECP256R1())
    before = Pki(old_pem, pki.ca_key_pem, pki.server_cert_pem, pki.server_key_pem)._sign(
        "node-1", node_key.public_key(), ["node-1"], [ExtendedKeyUsageOID.CLIENT_AUTH], 30
    )

    upgraded = Pki.load_or_create(tmp_path)
    new = x509.load_pem_x509_certificate(upgraded.ca_cert_pem)
    assert ca_path.read_bytes() == upgraded.ca_cert_pem != old_pem
    assert new.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert (new.subject, new.serial_number, new.public_key()) == (
        old.subject, old.serial_number, old.public_key(),
    )  # fmt: skip
    x509.load_pem_x509_certificate(before).verify_directly_issued_by(new)
    cert_path, key_path = upgraded.gateway_certificate(tmp_path, ["localhost"])
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    handshake(server, strict_client(upgraded.ca_cert_pem), "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, strict_client(old_pem), "localhost")  # what clients saw before
    assert Pki.load_or_create(tmp_path).ca_cert_pem == upgraded.ca_cert_pem  # once only
