"""HTTPS on the gateway, real processes: a coordinator serving a fleet-CA certificate, an agent
and the demo engine, called by the official `openai` and `anthropic` clients that trust the CA
`mlxfleet ca export` writes; plain HTTP and a client of another CA against the same port; the
process edge (warning, bad files).
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from cryptography import x509

from mlxfleet.mdns import local_ipv4_addresses
from tests.certs import write_key, write_self_signed
from tests.conftest import FREE_PORTS, Proc, mlxfleet, read_runtime, wait_for
from tests.e2e.fleet import Fleet, model_toml, running_fleet

MODEL = "demo"
HELLO = [{"role": "user", "content": "Tell me about Macs"}]
START_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Fleet]:
    config = '[tls]\nmode = "fleet-ca"\n' + model_toml(demo_model, MODEL, context_length=2048)
    with running_fleet(tmp_path_factory, config) as f:
        yield f


@pytest.fixture(scope="module")
def exported_ca(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("client") / "fleet-ca.pem"
    assert (
        fleet.cli("ca", "export", "--out", str(out)) == f"wrote the fleet CA certificate to {out}"
    )
    return out


def client_trusting(fleet: Fleet, ca: Path) -> openai.OpenAI:
    """The official client on the fleet's https:// base, trusting only `ca`, as strictly as
    Python 3.13's default context (which refuses a chain without key identifiers)."""
    context = ssl.create_default_context(cafile=ca)
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return openai.OpenAI(
        base_url=f"{fleet.base}/v1",
        api_key=fleet.key,
        max_retries=0,
        http_client=openai.DefaultHttpxClient(verify=context),
    )


def test_the_gateway_serves_https_with_the_exported_ca(fleet: Fleet, exported_ca: Path) -> None:
    assert fleet.runtime["gateway_scheme"] == "https"
    assert fleet.base == f"https://127.0.0.1:{fleet.runtime['gateway_port']}"
    assert exported_ca.read_bytes() == (fleet.home / "pki" / "ca.crt").read_bytes()
    assert fleet.cli("ca", "export") == exported_ca.read_text().strip()


def test_openai_sdk_over_https_trusting_the_exported_ca(fleet: Fleet, exported_ca: Path) -> None:
    client = client_trusting(fleet, exported_ca)
    ask = {"model": MODEL, "messages": HELLO, "max_tokens": 12, "temperature": 0}
    whole = client.chat.completions.create(**ask)
    assert whole.model == MODEL
    assert whole.usage is not None and 1 <= whole.usage.completion_tokens <= 12
    usage = {"include_usage": True}
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options=usage))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_anthropic_sdk_trusting_ssl_cert_file(
    fleet: Fleet, exported_ca: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(exported_ca))
    claude = anthropic.Anthropic(base_url=fleet.base, api_key=fleet.key, max_retries=0)
    reply = claude.messages.create(model=MODEL, messages=HELLO, max_tokens=8)
    assert reply.model == MODEL
    assert reply.content[0].type == "text"
    assert 1 <= reply.usage.output_tokens <= 8


def test_plain_http_to_the_tls_port_is_told_to_use_https(fleet: Fleet) -> None:
    port = fleet.runtime["gateway_port"]
    plain = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=fleet.key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        plain.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
    assert refused.value.status_code == 400
    assert refused.value.code == "https_required"
    assert refused.value.body == {
        "message": f"this port serves HTTPS: use https://127.0.0.1:{port}/v1/chat/completions",
        "type": "invalid_request_error",
        "param": None,
        "code": "https_required",
    }


def test_a_client_trusting_another_ca_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    other_ca, _ = write_self_signed(tmp_path, "another-ca", ca=True)
    with pytest.raises(openai.APIConnectionError) as refused:
        client_trusting(fleet, other_ca).models.list()
    cause = refused.value.__cause__
    assert isinstance(cause, httpx.ConnectError)
    assert "CERTIFICATE_VERIFY_FAILED" in str(cause)
    assert "unable to get local issuer certificate" in str(cause)
    assert fleet.models() == {MODEL: {"interactive": "ready"}}  # the port still serves


def test_admin_cli_calls_its_https_gateway(fleet: Fleet) -> None:
    rows = json.loads(fleet.cli("models", "--json"))
    assert [(r["model"], r["tier"], r["state"]) for r in rows] == [(MODEL, "interactive", "ready")]


def coordinator(tmp_path: Path, name: str, *flags: str) -> tuple[Proc, dict]:
    """A real coordinator (no models, mDNS off) with `flags`, once it listens."""
    home = tmp_path / name
    home.mkdir()
    (home / "fleet.toml").write_text("mdns = false\n")
    argv = ["coordinator", "--config", str(home / "fleet.toml"), "--home", str(home)]
    proc = Proc(mlxfleet(*argv, *FREE_PORTS, *flags), tmp_path / f"{name}.log")
    return proc, wait_for(lambda: read_runtime(home), START_TIMEOUT_S, f"{name} to listen")


def test_plain_http_beyond_loopback_warns_once_and_https_does_not(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """Two real coordinators on 0.0.0.0: the warning is a line of the process's own log, and
    the certificate names are what a client on the LAN will check."""
    plain, _ = coordinator(tmp_path, "plain", "--host", "0.0.0.0")
    procs.append(plain)
    tls, runtime = coordinator(
        tmp_path, "tls", "--host", "0.0.0.0", "--tls-name", "coord.lan", "--tls"
    )
    procs.append(tls)
    warnings = [line for line in plain.output().splitlines() if "plain HTTP" in line]
    assert len(warnings) == 1
    assert (
        " WARNING coordinator.server: the gateway serves plain HTTP beyond this host "
        in (warnings[0])
    )
    assert "(on 0.0.0.0)" in warnings[0]
    assert "plain HTTP" not in tls.output()
    assert runtime["gateway_scheme"] == "https"
    assert Path(runtime["gateway_cert"]) == (tmp_path / "tls" / "pki" / "gateway.crt").resolve()
    cert = x509.load_pem_x509_certificate(Path(runtime["gateway_cert"]).read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    assert ips == {"127.0.0.1", "::1", *local_ipv4_addresses()}
    dns = set(names.get_values_for_type(x509.DNSName))
    assert {"localhost", "coord.lan", socket.gethostname().lower()} <= dns


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (("missing.crt", "gw.key"), "TLS certificate {tmp}/missing.crt: No such file or directory"),
        (("gw.crt", "other.key"), "TLS key {tmp}/other.key does not belong to certificate"),
    ],
)
def test_bad_tls_files_give_one_line(tmp_path: Path, files: tuple[str, str], message: str) -> None:
    write_self_signed(tmp_path, "gw")
    write_key(tmp_path / "other.key")
    cert, key = (str(tmp_path / f) for f in files)
    done = subprocess.run(
        mlxfleet("coordinator", "--home", str(tmp_path / "home"), *FREE_PORTS,
                 "--tls-cert", cert, "--tls-key", key),
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mlxfleet: error: " + message.format(tmp=tmp_path))
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "home" / "coordinator.json").exists()
