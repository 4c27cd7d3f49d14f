"""No lost requests: a real coordinator, two real agents with one engine each, streaming load,
and `kill -9` of an engine or of an agent in the middle of it.

Every client stream must end as an uninterrupted one does: `data: [DONE]`, no error event, all
its tokens, and (temperature 0) the same text as a reference run of the same request. Streams
cut by the kill are continued on the other engine by the gateway (coordinator/relay.py).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    Proc,
    children_of,
    mlxfleet,
    run_ok,
    start_agent,
    start_coordinator,
    wait_for,
)
from tests.stream_load import (
    Stream,
    StreamLoad,
    assert_all_completed,
    reference_texts,
    serving,
    stream_completion,
)

READY_TIMEOUT_S = 120.0  # cold engine starts on 2 cores
PROMPTS = ["failover one", "failover two", "failover three", "failover four"]
MAX_TOKENS = 400  # about a second of decoding per stream at 4 streams: always some in flight
LOAD_FLOWING = 4  # completed streams before the fault
AFTER_FAULT = 4  # streams started after the fault that must complete before the load stops
FAULT_TIMEOUT_S = 60.0
ENGINE_EXIT_S = 10.0  # an orphaned engine polls its parent every ~0.5 s, then drains
BROKE = "broke a stream: continuing elsewhere"  # coordinator/gateway.py, per continuation


@dataclass
class Agent:
    home: Path
    log: Path
    proc: Proc

    @property
    def node_id(self) -> str:
        return str(json.loads((self.home / "agent" / "identity.json").read_text())["node_id"])

    def engine_pids(self) -> list[int]:
        return [p for p in children_of(self.proc.popen.pid) if _is_engine(p)]


@dataclass
class FailoverFleet:
    base: str
    home: Path
    runtime: dict
    key: str
    coordinator: Proc
    agents: list[Agent]

    def placed(self) -> list[str]:
        """Nodes with a ready demo engine, from the admin API `mlxfleet models` reads (cheap
        enough to poll; a CLI process per poll would take the cores the engines need)."""
        admin = (self.home / "admin_token").read_text().strip()
        r = httpx.get(
            f"{self.base}/admin/v1/models", headers={"Authorization": f"Bearer {admin}"}, timeout=10
        )
        [row] = r.json()["models"]
        return sorted(e.split(":")[0] for e in row["engines"] if e.endswith(": ready"))

    def both_ready(self) -> bool:
        return self.placed() == sorted(a.node_id for a in self.agents)

    def continuations(self) -> int:
        return self.coordinator.output().count(BROKE)

    def start_agent(self, home: Path, log: Path) -> Agent:
        proc = start_agent(self.home, self.runtime, home, log, "--role", "server")
        return Agent(home, log, proc)


def _is_engine(pid: int) -> bool:
    try:
        return b"node_agent.engine" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[FailoverFleet]:
    home = tmp_path_factory.mktemp("coord")
    (home / "fleet.toml").write_text(
        f'[[models]]\nname = "demo"\nsource = "{demo_model}"\n'
        'tiers = ["interactive"]\nreplicas = 2\npinned = true\n'
    )
    logs = tmp_path_factory.mktemp("logs")
    coordinator, runtime = start_coordinator(home, home / "fleet.toml", logs / "coordinator.log")
    f = FailoverFleet(
        f"http://127.0.0.1:{runtime['gateway_port']}", home, runtime, "", coordinator, []
    )
    try:
        f.key = run_ok(mlxfleet("keys", "create", "--home", str(home)))
        for name in ("a", "b"):
            agent = f.start_agent(tmp_path_factory.mktemp(f"agent-{name}"), logs / f"{name}.log")
            f.agents.append(agent)
            identity = agent.home / "agent" / "identity.json"
            wait_for(identity.exists, 30, f"agent {name} to enroll")
        wait_for(f.both_ready, READY_TIMEOUT_S, "a ready demo engine on each agent")
        yield f
    except BaseException:
        print(_logs(f))
        raise
    finally:
        for a in f.agents:
            a.proc.stop()
        coordinator.stop()


@pytest.fixture(scope="module")
def reference(fleet: FailoverFleet) -> dict[str, str]:
    """Each prompt's text from an uninterrupted stream, with no fault anywhere."""
    texts = reference_texts(fleet.base, fleet.key, PROMPTS, MAX_TOKENS)
    assert len(set(texts.values())) == len(PROMPTS)  # distinct texts: a mix-up would show
    return texts


@pytest.fixture(autouse=True)
def logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before and "fleet" in request.fixturenames:
        print(_logs(request.getfixturevalue("fleet")))


def _logs(f: FailoverFleet) -> str:
    procs = [f.coordinator, *(a.proc for a in f.agents)]
    return "\n".join(f"--- {p.log.name} ---\n{p.output()[-4000:]}" for p in procs)


@dataclass
class Fault:
    streams: list[Stream]
    t_kill: float
    agent: Agent | None  # the agent killed, None when only an engine was
    engines: list[int]  # the engine pids killed or orphaned


def run_with_fault(fleet: FailoverFleet, fault: str) -> Fault:
    """Stream PROMPTS in loops, `kill -9` the engine generating most ("engine") or its agent
    ("agent") once the load flows, and stop once streams started after the kill completed."""
    wait_for(fleet.both_ready, READY_TIMEOUT_S, "two ready engines before the fault")
    before = fleet.continuations()
    with StreamLoad(fleet.base, fleet.key, PROMPTS, MAX_TOKENS) as load:
        wait_for(lambda: len(load.done()) >= LOAD_FLOWING, FAULT_TIMEOUT_S, "load to flow")
        owner = {p: a for a in fleet.agents for p in a.engine_pids()}
        victim = serving(dict.fromkeys(owner, "127.0.0.1"))
        killed = owner[victim] if fault == "agent" else None
        engines = killed.engine_pids() if killed else [victim]
        t_kill = time.monotonic()
        os.kill(killed.proc.popen.pid if killed else victim, signal.SIGKILL)
        wait_for(
            lambda: len(load.ok_started_after(t_kill)) >= AFTER_FAULT or load.failures(),
            FAULT_TIMEOUT_S,
            "streams started after the kill to complete",
        )
    assert fleet.continuations() > before, "no stream was in flight on the killed engine"
    return Fault(load.done(), t_kill, killed, engines)


def check_streams(streams: list[Stream], reference: dict[str, str], t_kill: float) -> None:
    stalls = [g for s in streams if (g := s.stall_after(t_kill)) is not None]
    print(
        f"{len(streams)} streams, {len(stalls)} streaming at the kill; "
        f"stalls {', '.join(f'{g * 1000:.0f} ms' for g in sorted(stalls))}"
    )
    assert_all_completed(streams, reference, MAX_TOKENS)
    assert any(s.spans(t_kill) for s in streams)


def _exited(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # an orphan's zombie waits for init to reap it


def test_kill_9_of_a_serving_engine_loses_no_request(
    fleet: FailoverFleet, reference: dict[str, str]
) -> None:
    """Needs processes: SIGKILL of a real engine subprocess while it streams to clients."""
    fault = run_with_fault(fleet, "engine")
    check_streams(fault.streams, reference, fault.t_kill)
    wait_for(fleet.both_ready, READY_TIMEOUT_S, "the lost replica to be placed again")


def test_kill_9_of_an_agent_loses_no_request(
    fleet: FailoverFleet, reference: dict[str, str]
) -> None:
    """Needs processes: SIGKILL of a real agent; its engines exit on their own and the
    coordinator drops the node when its gRPC stream breaks."""
    fault = run_with_fault(fleet, "agent")
    killed = fault.agent
    assert killed is not None
    check_streams(fault.streams, reference, fault.t_kill)
    wait_for(
        lambda: all(_exited(p) for p in fault.engines),
        ENGINE_EXIT_S,
        "the killed agent's engines to exit",
    )
    # The same home: the agent comes back with its identity and gets its replica again.
    killed.proc.stop()
    fleet.agents[fleet.agents.index(killed)] = fleet.start_agent(
        killed.home, killed.log.with_name(killed.log.stem + "-again.log")
    )
    wait_for(fleet.both_ready, READY_TIMEOUT_S, "the lost replica to be placed again")


def test_a_client_leaving_mid_stream_leaves_the_engines_routed(fleet: FailoverFleet) -> None:
    """Needs processes: the client's socket closes under the real gateway mid-relay."""
    wait_for(fleet.both_ready, READY_TIMEOUT_S, "two ready engines")
    before = _gateway_marks(fleet)
    for prompt in PROMPTS:
        body = {"model": "demo", "prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True}
        headers = {"Authorization": f"Bearer {fleet.key}"}
        with httpx.stream(
            "POST", f"{fleet.base}/v1/completions", json=body, headers=headers, timeout=30
        ) as r:
            assert r.status_code == 200, r.read()
            lines = (line for line in r.iter_lines() if line.startswith("data: {"))
            assert [next(lines) for _ in range(3)]  # some events, then the client hangs up
    # Both engines keep serving; a stream that ran on each still completes.
    with httpx.Client(timeout=60) as http:
        for prompt in PROMPTS:
            s = stream_completion(http, fleet.base, fleet.key, prompt, 8)
            assert s.ok and s.completion_tokens == 8, s.error
    assert _gateway_marks(fleet) == before
    assert fleet.both_ready()


def _gateway_marks(fleet: FailoverFleet) -> tuple[int, int, int]:
    """Continuations, engines unrouted and tracebacks so far, from the coordinator's log."""
    log = fleet.coordinator.output()
    return log.count(BROKE), log.count("left the router"), log.count("Traceback")
