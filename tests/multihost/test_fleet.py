"""A whole fleet across hosts: coordinator, agents and engines in separate network namespaces.

Host 1 runs the coordinator (its own address, mDNS on); hosts 2 and 3 run agents, the first
told the coordinator's address, the second finding it by real multicast DNS; host 4 is for
processes that must be refused or only discovered. Every process is the real one; clients
reach the gateway from the root namespace over the bridge. The tests share one fleet and run
in file order: revocation, which takes a node away for good, comes last.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.probes import local_probe
from tests.conftest import run_ok, wait_for
from tests.multihost.fleet import MODEL, Fleet, Load, cli, coordinator_fleet

PEER = Path(__file__).with_name("mdns_peer.py")
READY_TIMEOUT_S = 120.0  # cold engine start on 2 cores: imports, model load, warm-up
ENROLL_TIMEOUT_S = 60.0  # includes mDNS search rounds of 5 s for the second agent
REFUSAL_TIMEOUT_S = 60.0
MDNS_TIMEOUT_S = 20.0
SUSPECT_AFTER_S = 3.0  # coordinator defaults (coordinator/config.py)
DEAD_AFTER_S = 10.0
TICK_S = 0.25  # reconcile interval (coordinator/reconcile.py)
HEARTBEAT_S = 1.0  # agents' NodeStatus interval (node_agent/coordinator_client.py)
POLL_SLACK_S = 0.5  # our admin-API polling on 2 busy cores
RECONNECT_TIMEOUT_S = 5.0  # agents back after a coordinator restart
SETTLE_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Fleet]:
    """One 4-host fleet for the module; the demo model is placed on one of the two agents."""
    root = tmp_path_factory.mktemp("fleet")
    with coordinator_fleet(root, demo_model, 4, "multihost") as f:
        f.start_agent("a1", f.net.hosts[1], f.token(), extra=("--role", "server"))
        f.start_agent(
            "a2",
            f.net.hosts[2],
            f.token(),
            by_address=False,
            extra=("--role", "laptop", "--serve-interactive"),
        )
        wait_for(lambda: MODEL in f.models(), READY_TIMEOUT_S, "the demo model to be routable")
        yield f


def live_agents(fleet: Fleet, *names: str) -> list[dict] | None:
    rows = [fleet.node(fleet.agents[n].node_id) for n in names]
    return rows if all(r is not None and r["state"] == "live" for r in rows) else None


def one_ready_engine(fleet: Fleet) -> str | None:
    """The node running the only demo engine, once exactly one exists and it is ready."""
    engines = fleet.demo_engines()
    if len(engines) == 1 and engines[0][1] == f"{MODEL} (ready)" and MODEL in fleet.models():
        return engines[0][0]
    return None


def chat_tokens(fleet: Fleet) -> int:
    reply = fleet.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
    )
    assert reply.usage is not None
    return reply.usage.completion_tokens


def test_agents_enroll_by_address_and_by_mdns_and_serve_the_model(fleet: Fleet) -> None:
    """Needs namespaces: the second agent finds the coordinator only through multicast DNS
    across a real link, and the engine is reached over TLS at another host's address."""
    wait_for(lambda: live_agents(fleet, "a1", "a2"), ENROLL_TIMEOUT_S, "both agents live")
    a1, a2 = fleet.agents["a1"], fleet.agents["a2"]
    assert "by mDNS" in a2.output()
    listed = json.loads(run_ok(cli("nodes", "--home", str(fleet.home), "--json")))
    rows = {n["id"]: n for n in listed}
    chip = local_probe().facts().chip
    assert (rows[a1.node_id]["state"], rows[a1.node_id]["role"]) == ("live", "server")
    assert (rows[a2.node_id]["state"], rows[a2.node_id]["role"]) == ("live", "laptop")
    assert rows[a1.node_id]["chip"] == rows[a2.node_id]["chip"] == chip

    on = wait_for(lambda: one_ready_engine(fleet), READY_TIMEOUT_S, "one ready demo engine")
    assert on in (a1.node_id, a2.node_id)
    runner = fleet.agent_by_node(on)
    assert len(runner.engine_pids()) == 1
    # Routed to the agent host's own address over TLS, not to loopback.
    assert f"routing {MODEL} to engine {MODEL}-" in fleet.coordinator_output()
    assert f" at https://{runner.host.ip}:" in fleet.coordinator_output()
    assert fleet.models() == [MODEL]
    assert chat_tokens(fleet) >= 1


def test_bad_tokens_are_refused_across_the_network(fleet: Fleet) -> None:
    """Needs namespaces: refused agents run on another host and enroll over the link."""
    spare = fleet.net.hosts[3]
    good = fleet.token()
    prefix, fingerprint, _secret = good.split(".")
    wrong = f"{prefix}.{fingerprint}.{secrets.token_urlsafe(24)}"
    expired = fleet.token("--ttl", "1s")
    made = time.time()
    # The token a2 enrolled with (--uses 1) is already used up: this is a replay.
    replayed = fleet.agents["a2"].token
    wait_for(lambda: time.time() > made + 1.5, 5, "the 1 s token to expire")
    cases = {
        "wrong": (wrong, "unknown join token"),
        "expired": (expired, "join token expired"),
        "replay": (replayed, "join token used up"),
    }
    before = {n["id"] for n in fleet.nodes() if n["state"] != "discovered"}
    started = {name: fleet.start_agent(name, spare, token) for name, (token, _) in cases.items()}
    for name, (_token, reason) in cases.items():
        agent = started[name]
        code = agent.proc.wait(REFUSAL_TIMEOUT_S)
        errors = [line for line in agent.output().splitlines() if "error" in line.lower()]
        assert code == 2, agent.output()
        assert errors == [f"mlxfleet: error: enrollment refused: {reason}"], agent.output()
        assert "Traceback" not in agent.output()
        assert agent.node_id is None
        del fleet.agents[name]
    after = {n["id"] for n in fleet.nodes() if n["state"] != "discovered"}
    assert after == before


def test_an_mdns_only_node_is_listed_as_discovered_and_never_used(
    fleet: Fleet, tmp_path: Path
) -> None:
    """Needs namespaces: the unenrolled peer must be another host announcing on the link."""
    spare = fleet.net.hosts[3]
    node_id = f"rogue-{secrets.token_hex(3)}"
    peer = fleet.net.python(
        spare,
        [str(PEER), "node", "--ip", spare.ip, "--node-id", node_id, "--avail-gib", "500"],
        fleet.logs / "rogue.log",
        stdin=subprocess.PIPE,
    )
    try:
        row = wait_for(
            lambda: fleet.node(node_id), MDNS_TIMEOUT_S, f"{node_id} listed by the coordinator"
        )
        assert (row["state"], row["models"], row["hostname"]) == ("discovered", [], spare.ip)
        assert (row["chip"], row["available_gib"]) == ("Apple M2 Max", 500.0)
        # With far more memory than the agents it is still no placement target.
        for _ in range(3):
            assert chat_tokens(fleet) >= 1
        engines = fleet.demo_engines()
        assert len(engines) == 1 and engines[0][0] != node_id
        assert fleet.node(node_id)["models"] == []  # type: ignore[index]
    finally:
        assert peer.stdin is not None
        peer.stdin.close()
        peer.wait(MDNS_TIMEOUT_S)


def test_partition_moves_the_model_and_the_node_comes_back_without_a_second_engine(
    fleet: Fleet,
) -> None:
    """Needs namespaces: only a cut link (no FIN, no RST) shows heartbeat-based liveness."""
    wait_for(lambda: live_agents(fleet, "a1", "a2"), ENROLL_TIMEOUT_S, "both agents live")
    cut_id = wait_for(lambda: one_ready_engine(fleet), READY_TIMEOUT_S, "one ready engine")
    cut = fleet.agent_by_node(cut_id)
    other = next(a for a in fleet.agents.values() if a is not cut)
    with Load(fleet) as load:
        wait_for(lambda: load.successes_after(0) >= 4, 30, "load to flow before the cut")
        t_cut = time.monotonic()
        fleet.net.link_down(cut.host)
        try:
            wait_for(
                lambda: (fleet.node(cut_id) or {}).get("state") == "suspect",
                DEAD_AFTER_S,
                "the cut node to be suspect",
            )
            suspect_s = time.monotonic() - t_cut
            wait_for(
                lambda: (fleet.node(cut_id) or {}).get("state") != "suspect",
                DEAD_AFTER_S,
                "the cut node to be dead",
            )
            dead_s = time.monotonic() - t_cut
            moved = wait_for(
                lambda: one_ready_engine(fleet) == other.node_id,
                READY_TIMEOUT_S,
                "the model on the other agent",
            )
            t_moved = time.monotonic()
            assert moved
            wait_for(lambda: load.successes_after(t_moved) >= 6, 60, "requests after re-placement")
        finally:
            fleet.net.link_up(cut.host)
        load.stop()
    after = load.started_after(t_moved)
    failures = load.failures()
    print(
        f"partition: suspect after {suspect_s:.1f} s, dead after {dead_s:.1f} s, "
        f"re-placed after {t_moved - t_cut:.1f} s; {len(load.outcomes)} requests, "
        f"{len(failures)} failed: {[f.error for f in failures]}; statuses {load.statuses}"
    )
    # Silence counts from the last heartbeat, up to one interval before the cut.
    assert SUSPECT_AFTER_S - HEARTBEAT_S <= suspect_s <= SUSPECT_AFTER_S + TICK_S + POLL_SLACK_S
    assert DEAD_AFTER_S - HEARTBEAT_S <= dead_s <= DEAD_AFTER_S + TICK_S + POLL_SLACK_S
    assert after and all(o.ok for o in after), [o.error for o in after if not o.ok]
    # Only streams already running on the cut engine may fail, at most one per loop: with one
    # replica there is no engine to continue them on when the node turns suspect (the model is
    # placed again only once it is dead). With two replicas none fails: test_failover.py.
    assert len(failures) <= 2, [f.error for f in failures]

    wait_for(lambda: live_agents(fleet, "a1", "a2"), 30, "the cut node live again")
    wait_for(lambda: one_ready_engine(fleet), SETTLE_TIMEOUT_S, "exactly one demo engine")
    # The agent that came back must not keep a stale engine running either.
    wait_for(
        lambda: sorted(len(a.engine_pids()) for a in (cut, other)) == [0, 1],
        SETTLE_TIMEOUT_S,
        "one engine process across both agents",
    )
    assert chat_tokens(fleet) >= 1


def test_coordinator_kill_9_and_restart_takes_back_the_running_engine(fleet: Fleet) -> None:
    """Needs namespaces and processes: SIGKILL of the real coordinator, agents reconnecting
    over the link to the same address and ports."""
    wait_for(lambda: live_agents(fleet, "a1", "a2"), ENROLL_TIMEOUT_S, "both agents live")
    engine_node = wait_for(lambda: one_ready_engine(fleet), READY_TIMEOUT_S, "one ready engine")
    runner = fleet.agent_by_node(engine_node)
    pids = runner.engine_pids()
    assert len(pids) == 1
    old = fleet.runtime
    ports = (old["gateway_port"], old["grpc_port"], old["enroll_port"])
    with Load(fleet) as load:
        wait_for(lambda: load.successes_after(0) >= 4, 30, "load to flow before the kill")
        t_kill = time.monotonic()
        fleet.kill_coordinator()
        new = fleet.start_coordinator(ports)
        t_up = time.monotonic()
        assert (new["gateway_port"], new["grpc_port"], new["enroll_port"]) == ports
        wait_for(
            lambda: live_agents(fleet, "a1", "a2"), RECONNECT_TIMEOUT_S, "both agents reconnected"
        )
        t_back = time.monotonic()
        assert wait_for(lambda: one_ready_engine(fleet), 30, "the engine taken back") == (
            engine_node
        )
        t_routed = time.monotonic()
        wait_for(lambda: load.successes_after(t_routed) >= 6, 60, "requests after the restart")
        load.stop()
    failures = load.failures()
    print(
        f"restart: coordinator up {t_up - t_kill:.1f} s after kill -9, agents back "
        f"{t_back - t_up:.1f} s later, model routable {t_routed - t_up:.1f} s after start; "
        f"{len(load.outcomes)} requests, {len(failures)} failed: "
        f"{[f.error for f in failures]}; statuses {load.statuses}"
    )
    assert runner.engine_pids() == pids
    assert all(o.ok for o in load.started_after(t_routed))
    other = next(a for a in fleet.agents.values() if a is not runner)
    assert other.engine_pids() == []


def test_revoked_node_is_refused_and_its_model_moves(fleet: Fleet) -> None:
    """Needs namespaces: the revoked agent is another host whose next connection over the
    link must be refused by the coordinator."""
    wait_for(lambda: live_agents(fleet, "a1", "a2"), ENROLL_TIMEOUT_S, "both agents live")
    a1, a2 = fleet.agents["a1"], fleet.agents["a2"]
    a1_id, a2_id = a1.node_id, a2.node_id
    assert a1_id and a2_id
    out = run_ok(cli("nodes", "remove", a1_id, "--home", str(fleet.home)))
    assert out == f"removed {a1_id}: its certificate is refused from now on"

    # Its token was for one use: re-enrolling after the refusal is refused too, so it exits.
    code = a1.proc.wait(REFUSAL_TIMEOUT_S)
    lines = a1.output().splitlines()
    assert code == 2, a1.output()[-3000:]
    assert any(
        f"coordinator refused this node (node {a1_id} is not enrolled)" in line for line in lines
    ), a1.output()[-3000:]
    assert lines[-1] == "mlxfleet: error: enrollment refused: join token used up"
    assert a1.engine_pids() == []
    wait_for(lambda: fleet.node(a1_id) is None, MDNS_TIMEOUT_S, f"{a1_id} gone from nodes")
    assert wait_for(lambda: one_ready_engine(fleet), READY_TIMEOUT_S, "the model placed") == a2_id
    assert chat_tokens(fleet) >= 1
    assert [n["id"] for n in fleet.nodes() if n["state"] == "live"] == [a2_id]
