"""Which coordinator an admin command calls (flags, saved login, this host) and how its
failures read: the saved login's file, the resolution order and one line per failure."""

from __future__ import annotations

import argparse
import http.server
import json
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from coordinator.cli import remote
from coordinator.cli.errors import CliError
from coordinator.cli.remote import Target
from coordinator.pki import PKI_DIR, FleetPki
from tests.http_stub import serving

SAVED = Target("https://fleet.example:8400", "mlxfop-saved", "-----BEGIN CERTIFICATE-----\n")


@pytest.fixture
def login_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config" / "login.json"
    monkeypatch.setenv(remote.LOGIN_FILE_ENV, str(path))
    return path


@pytest.fixture
def local_home(tmp_path: Path) -> Path:
    """The files a running coordinator leaves in its MLXFLEET_HOME (no process needed)."""
    home = tmp_path / "home"
    home.mkdir()
    runtime = {"pid": 1, "host": "0.0.0.0", "gateway_port": 8499}
    (home / "coordinator.json").write_text(json.dumps(runtime))
    (home / "admin_token").write_text("local-secret\n")
    return home


def flags(**given: str | None) -> argparse.Namespace:
    """An admin command's parsed flags: none given unless named."""
    return argparse.Namespace(
        **{"home": None, "coordinator": None, "token": None, "ca": None, **given}
    )


def test_the_login_file_round_trips_with_mode_600(login_file: Path) -> None:
    assert remote.load_login() is None
    assert remote.save_login(SAVED) == login_file
    assert remote.load_login() == SAVED
    assert oct(login_file.stat().st_mode & 0o777) == "0o600"
    assert oct(login_file.parent.stat().st_mode & 0o777) == "0o700"
    assert json.loads(login_file.read_text())["token"] == "mlxfop-saved"
    remote.save_login(Target("http://10.0.0.2:8400", "mlxfop-second"))  # replaces the first
    assert remote.load_login() == Target("http://10.0.0.2:8400", "mlxfop-second", None)
    assert [p.name for p in login_file.parent.iterdir()] == ["login.json"]


def test_the_login_file_lives_in_the_xdg_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(remote.LOGIN_FILE_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert remote.login_path() == tmp_path / "xdg" / "mlxfleet" / "login.json"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    assert remote.login_path() == tmp_path / "me" / ".config" / "mlxfleet" / "login.json"


def test_a_damaged_login_file_is_one_clear_error(login_file: Path) -> None:
    login_file.parent.mkdir()
    login_file.write_text('["not", "a", "login"]')
    with pytest.raises(CliError, match=r"login\.json: not a saved login; `mlxfleet login` again"):
        remote.load_login()


def test_coordinator_flag_comes_before_the_saved_login(login_file: Path, local_home: Path) -> None:
    remote.save_login(SAVED)
    given = flags(coordinator="http://10.0.0.9:8400/", token="mlxfop-flag")
    assert remote.target_of(given, local_home) == Target("http://10.0.0.9:8400", "mlxfop-flag")


def test_the_saved_login_comes_before_this_host(login_file: Path, local_home: Path) -> None:
    remote.save_login(SAVED)
    assert remote.target_of(flags(), local_home) == SAVED
    assert remote.target_of(None, local_home) == SAVED  # a caller that passes no flags


def test_an_explicit_home_or_no_login_means_this_host(login_file: Path, local_home: Path) -> None:
    local = Target("http://127.0.0.1:8499", "local-secret")
    assert remote.target_of(flags(), local_home) == local
    remote.save_login(SAVED)
    assert remote.target_of(flags(home=str(local_home)), local_home) == local


def test_without_a_coordinator_running_here_the_error_names_the_home(
    login_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(CliError, match="no coordinator is running with MLXFLEET_HOME="):
        remote.target_of(flags(), tmp_path / "empty")


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"token": "t"}, "--token and --ca go with --coordinator URL"),
        ({"coordinator": "10.0.0.9:8400"}, "'10.0.0.9:8400': not a coordinator URL"),
        ({"coordinator": "ftp://h:1"}, "'ftp://h:1': not a coordinator URL"),
        ({"coordinator": "https://h:99999"}, "'https://h:99999': not a coordinator URL"),
        ({"coordinator": "https://:8400"}, "'https://:8400': not a coordinator URL"),
        ({"coordinator": "http://h:8400", "ca": "ca.pem"}, "--ca: http://h:8400 is plain http"),
        ({"coordinator": "https://h:8400", "ca": "/no/ca.pem"}, "No such file or directory"),
    ],
)
def test_bad_flags_are_one_line_errors(
    given: dict[str, str], message: str, login_file: Path, local_home: Path
) -> None:
    with pytest.raises(CliError) as raised:
        remote.target_of(flags(**given), local_home)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_ca_file_must_hold_a_certificate(tmp_path: Path) -> None:
    pki = FleetPki.load_or_create(tmp_path)
    ca = tmp_path / PKI_DIR / "ca.crt"
    assert remote.read_ca(ca) == pki.ca_cert_pem.decode()
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(CliError, match=r"--ca .*junk\.pem: not a PEM certificate"):
        remote.read_ca(tmp_path / "junk.pem")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused_says_so() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CliError) as raised:
        remote.call(Target(url, "t"), "GET", "/admin/v1/nodes")
    assert str(raised.value) == (
        f"{url}: connection refused: is the coordinator running, on that port?"
    )


class Refuse401(http.server.BaseHTTPRequestHandler):
    """Answers every GET as the gateway answers a bad admin token."""

    def do_GET(self) -> None:
        body = json.dumps({"error": {"message": "missing, invalid or revoked admin token"}})
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *_args: object) -> None:
        pass


@contextmanager
def refusing(tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """A Refuse401 server on 127.0.0.1 (speaking only TLS with `tls`); its host:port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse401)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    with serving(server) as port:
        yield f"127.0.0.1:{port}"


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[str]:
    """A TLS server with a self-signed certificate (the fleet's first server cert): untrusted."""
    FleetPki.load_or_create(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / PKI_DIR / "server.crt", tmp_path / PKI_DIR / "server.key")
    with refusing(tls) as address:
        yield address


def test_an_untrusted_certificate_says_to_pass_the_ca(tls_server: str) -> None:
    with pytest.raises(CliError) as raised:
        remote.call(Target(f"https://{tls_server}", "t"), "GET", "/admin/v1/nodes")
    assert str(raised.value).startswith(f"https://{tls_server}: certificate not trusted (")
    assert str(raised.value).endswith(
        "pass --ca FILE (`mlxfleet ca export` on the coordinator host)"
    )


def test_plain_http_to_a_tls_port_says_to_use_https(tls_server: str) -> None:
    with pytest.raises(CliError) as raised:
        remote.call(Target(f"http://{tls_server}", "t"), "GET", "/admin/v1/nodes")
    assert str(raised.value) == (
        f"http://{tls_server}: closed without an HTTP reply: is it an https:// port?"
    )


def test_a_401_names_the_coordinator_and_keeps_its_message() -> None:
    with refusing() as address, pytest.raises(CliError) as raised:
        remote.call(Target(f"http://{address}", "wrong"), "GET", "/admin/v1/nodes")
    assert str(raised.value) == (
        f"http://{address} refused the token (401): missing, invalid or revoked admin token"
    )
