"""The admin CLI from another host over HTTPS with an operator token (a revoked or missing
one: 401), and the version the coordinator and its agents report.

Needs namespaces: the operator's CLI runs on a host of its own with an empty MLXFLEET_HOME, so
only the coordinator's address, the exported fleet CA and a token can get it in; the
coordinator's host keeps using its local admin token file. The tests share one fleet and run in
file order.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
from collections.abc import Iterator

import httpx
import pytest

from coordinator import __version__
from coordinator.cli.admin import NODE_COLUMNS
from tests.conftest import REPO, wait_for
from tests.multihost.fleet import Fleet, cli
from tests.netns import Host, Network, unavailable_reason

NODE_TIMEOUT_S = 60.0  # agent start and enrollment on 2 busy cores
REFUSED = "refused the token (401): missing, invalid or revoked admin token"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The coordinator on host 0 serving HTTPS (fleet CA), one live agent on host 1; no models
    (only nodes matter here)."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("remote-admin")
    (root / "fleet.toml").write_text('[tls]\nmode = "fleet-ca"\n')
    with Network(2) as net:
        f = Fleet(net, root / "coordinator", root, root / "fleet.toml")
        try:
            f.start_coordinator()
            agent = f.start_agent("a1", net.hosts[1], f.token())
            wait_for(
                lambda: [n["state"] for n in nodes(f) if n["id"] == agent.node_id] == ["live"],
                NODE_TIMEOUT_S,
                "the agent to be live",
            )
            coordinator_host(f, "ca", "export", "--out", str(root / "fleet-ca.pem"))
            yield f
        except BaseException:
            print(f.log_tails())
            raise


def url(fleet: Fleet) -> str:
    return f"https://{fleet.coord_host.ip}:{fleet.runtime['gateway_port']}"


def nodes(fleet: Fleet) -> list[dict]:
    """The admin API's node rows, asked with the local admin token (cheap enough to poll)."""
    token = (fleet.home / "admin_token").read_text().strip()
    trust = ssl.create_default_context(cafile=fleet.home / "pki" / "ca.crt")
    headers = {"Authorization": f"Bearer {token}"}
    try:
        reply = httpx.get(f"{url(fleet)}/admin/v1/nodes", headers=headers, verify=trust)
    except httpx.TransportError:
        return []
    return list(reply.json()["nodes"])


def on(host: Host, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`mlxfleet ARGS` inside `host`."""
    return subprocess.run(
        ["ip", "netns", "exec", host.name, *cli(*args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, **env},
    )


def operator(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    """The operator's CLI on host 1: its own empty MLXFLEET_HOME and login file."""
    state = fleet.logs / "operator"
    env = {"MLXFLEET_HOME": str(state / "home"), "MLXFLEET_LOGIN_FILE": str(state / "login.json")}
    return on(fleet.net.hosts[1], *args, env=env)


def remote(fleet: Fleet, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    """An admin command on host 1 naming the coordinator, trusting the exported CA."""
    ca = str(fleet.logs / "fleet-ca.pem")
    given = ("--token", token) if token is not None else ()
    return operator(fleet, *args, "--coordinator", url(fleet), "--ca", ca, *given)


def coordinator_host(fleet: Fleet, *args: str) -> str:
    """`mlxfleet ARGS --home H` on the coordinator's host; its output (it must succeed)."""
    nowhere = {"MLXFLEET_LOGIN_FILE": str(fleet.logs / "no-login.json")}
    done = on(fleet.coord_host, *args, "--home", str(fleet.home), env=nowhere)
    assert done.returncode == 0, done.stderr
    return done.stdout


def refused(done: subprocess.CompletedProcess[str], fleet: Fleet) -> bool:
    """Exit 2 with one line: the coordinator refused the token."""
    line = f"mlxfleet: error: {url(fleet)} {REFUSED}"
    return done.returncode == 2 and done.stderr.startswith(line) and done.stderr.count("\n") == 1


def test_an_operator_token_lists_the_nodes_from_another_host(fleet: Fleet) -> None:
    token = coordinator_host(fleet, "operator", "create", "alice").strip()
    node_id = fleet.agents["a1"].node_id
    table = remote(fleet, "nodes", token=token)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == list(NODE_COLUMNS)
    assert [row.split()[:3] for row in rows] == [[node_id, "live", "False"]]
    [row] = json.loads(remote(fleet, "nodes", "--json", token=token).stdout)
    assert (row["id"], row["state"], row["version"]) == (node_id, "live", __version__)


def test_health_reports_the_version_to_another_host(fleet: Fleet) -> None:
    trust = ssl.create_default_context(cafile=fleet.logs / "fleet-ca.pem")
    reply = httpx.get(f"{url(fleet)}/health", verify=trust, timeout=5)
    assert reply.json() == {"status": "ok", "version": __version__}


def test_no_token_or_a_wrong_one_is_refused_with_one_line(fleet: Fleet) -> None:
    assert refused(remote(fleet, "nodes"), fleet)
    assert refused(remote(fleet, "tiers", token="mlxfop-guess"), fleet)


def test_tls_mistakes_are_one_line_each(fleet: Fleet) -> None:
    untrusted = operator(fleet, "nodes", "--coordinator", url(fleet), "--token", "t")
    assert untrusted.returncode == 2
    assert untrusted.stderr.startswith(f"mlxfleet: error: {url(fleet)}: certificate not trusted")
    assert untrusted.stderr.endswith("(`mlxfleet ca export` on the coordinator host)\n")
    plain = url(fleet).replace("https://", "http://")
    refused_plain = operator(fleet, "nodes", "--coordinator", plain, "--token", "t")
    assert (refused_plain.returncode, refused_plain.stderr) == (
        2,
        f"mlxfleet: error: this port serves HTTPS: use {url(fleet)}/admin/v1/nodes\n",
    )
    closed = f"https://{fleet.coord_host.ip}:1"
    nobody = operator(fleet, "nodes", "--coordinator", closed, "--token", "t")
    assert nobody.stderr == (
        f"mlxfleet: error: {closed}: connection refused: is the coordinator running, on that "
        "port?\n"
    )


def test_a_saved_login_works_until_its_token_is_revoked(fleet: Fleet) -> None:
    token = coordinator_host(fleet, "operator", "create", "bob").strip()
    ca = str(fleet.logs / "fleet-ca.pem")
    login = operator(fleet, "login", url(fleet), "--token", token, "--ca", ca)
    saved = fleet.logs / "operator" / "login.json"
    assert login.stdout == f"logged in to {url(fleet)} (1 node there); saved in {saved}\n"
    assert oct(saved.stat().st_mode & 0o777) == "0o600"
    tiers = operator(fleet, "tiers")
    assert sorted(line.split()[0] for line in tiers.stdout.splitlines()) == [
        "batch",
        "interactive",
        "tier",
    ], tiers.stderr
    coordinator_host(fleet, "operator", "revoke", "bob")
    assert refused(operator(fleet, "tiers"), fleet)
    assert refused(remote(fleet, "nodes", token=token), fleet)
    assert operator(fleet, "logout").returncode == 0
    assert not saved.exists()


def test_the_coordinator_host_keeps_its_local_admin_token(fleet: Fleet) -> None:
    rows = json.loads(coordinator_host(fleet, "nodes", "--json"))
    assert [(r["id"], r["state"]) for r in rows] == [(fleet.agents["a1"].node_id, "live")]
    listed = json.loads(coordinator_host(fleet, "operator", "list", "--json"))
    assert [(r["name"], r["state"]) for r in listed] == [("alice", "active"), ("bob", "revoked")]
