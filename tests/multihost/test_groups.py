"""One model across several nodes: MLX distributed groups, in network namespaces.

Host 0 runs the coordinator; the other hosts an agent each whose memory budget (set with
--os-reserve-gib) holds no whole copy of the 6-layer demo model, so the coordinator places it as
a pipeline group: two ranks (budgets for 4.6 layers each) or three (2.4 layers each). Ranks are
real MLX ring processes whose traffic crosses the agents' rank links (mutual TLS) between
namespaces. The group must answer as one engine of the same model does, survive the death of a
rank, a cut link and a drain with no failed request, and its links must refuse non-members.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from coordinator.memory import pipeline_shape, size_engine
from mlxfleet.tiers import DEFAULT_KNOBS
from tests.conftest import wait_for
from tests.multihost.fleet import MODEL, Fleet, coordinator_fleet
from tests.netns import Host
from tests.stream_load import StreamLoad, assert_all_completed, reference_texts

LAYERS = 6
CONTEXT = 2048  # tests/multihost/fleet.py's model entry
READY_TIMEOUT_S = 240.0  # ranks on several hosts start on 2 busy cores
MOVE_TIMEOUT_S = 240.0
STALL_S = 5.0  # coordinator/config.py's stream_stall_s: the group's stall limit
EXIT_MARGIN_S = 6.0  # a busy 2-core box: the watchdog ticks, the process exits
PROMPTS = ["group one", "group two", "group three"]
MAX_TOKENS = 120
QUESTION = [{"role": "user", "content": "Tell me about the little robot who paints."}]
PINNED = 'tiers = ["interactive"]\npinned = true\n'


def reserve_gib(model: Path, layers_held: float) -> str:
    """--os-reserve-gib that leaves a node room for `layers_held` layers of the model as a
    group member (the coordinator's own memory math: coordinator/memory.py)."""
    config = json.loads((model / "config.json").read_text())
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    sequences = DEFAULT_KNOBS["interactive"].max_concurrency
    total, _ = size_engine(weights, config, CONTEXT, sequences)
    layers, shared = pipeline_shape(total, config)
    budget = shared + layers_held * (total - shared) / layers
    ram = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return f"{(ram - budget) / 2**30:.6f}"


def start_fleet(root: Path, model: Path, agents: int, layers_held: float) -> Iterator[Fleet]:
    with coordinator_fleet(root, model, agents + 1, "groups", PINNED) as f:
        reserve = reserve_gib(model, layers_held)
        for i in range(1, agents + 1):
            readings = root / f"readings-g{i}.json"  # the OS readings a test may override
            readings.write_text("{}")
            f.start_agent(
                f"g{i}",
                f.net.hosts[i],
                f.token(),
                extra=("--role", "server", "--no-mdns", "--os-reserve-gib", reserve),
                env={"MLXFLEET_READINGS_FILE": str(readings)},
            )
        yield f


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_model_6: Path) -> Iterator[Fleet]:
    """Four agents, each with room for 4.6 of the 6 layers: groups of two."""
    yield from start_fleet(tmp_path_factory.mktemp("groups"), demo_model_6, 4, 4.6)


@contextlib.contextmanager
def single_engine(model: Path, folder: Path) -> Iterator[openai.OpenAI]:
    """One engine of the whole model (outside the fleet), to compare a group's text with."""
    env = {**os.environ, "MLXFLEET_ENGINE_SECRET": "single-engine-secret"}
    with (folder / "engine.log").open("wb") as err:
        proc = subprocess.Popen(
            [*(sys.executable, "-m", "node_agent.engine"), "--model-path", str(model)]
            + ["--model-name", MODEL, "--context-length", str(CONTEXT)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().decode().split("port=")[1])
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": "Bearer single-engine-secret"}
        wait_for(
            lambda: httpx.get(f"{base}/health", headers=headers).json()["status"] == "ready",
            120,
            "the single engine to load",
        )
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="single-engine-secret")
    finally:
        proc.kill()
        proc.wait(20)


@pytest.fixture(scope="module")
def engine(demo_model_6: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    """One engine of the whole model (outside the fleet), to compare the groups' text with."""
    with single_engine(demo_model_6, tmp_path_factory.mktemp("single")) as client:
        yield client


def groups(fleet: Fleet) -> list[dict[str, Any]]:
    """The model's groups as `mlxfleet models --json` lists them."""
    body = fleet._get("/admin/v1/models", (fleet.home / "admin_token").read_text().strip())
    rows = body["models"] if body is not None else []
    return [g for r in rows if r["model"] == MODEL for g in r.get("groups") or []]


def serving_group(fleet: Fleet, size: int, not_id: str = "") -> dict[str, Any] | None:
    """The model's one group of `size` members (other than `not_id`) once it serves."""
    found = [g for g in groups(fleet) if g["group"] != not_id and len(g["members"]) == size]
    if len(found) != 1 or MODEL not in fleet.models():
        return None
    ready = [n for n, m in fleet.demo_engines() if m == f"{MODEL} (ready)"]
    members = {m["node"] for m in found[0]["members"]}
    return found[0] if members <= set(ready) else None


def rank_pids(group_id: str) -> dict[int, int]:
    """rank -> pid of every process of this group on the machine (all namespaces)."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if (
                b"--group-id" not in argv
                or argv[argv.index(b"--group-id") + 1] != group_id.encode()
            ):
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        rank = next((e.split(b"=")[1] for e in environ if e.startswith(b"MLX_RANK=")), b"-1")
        found[int(rank)] = int(proc.name)
    return found


def host_of(fleet: Fleet, node_id: str) -> Host:
    return fleet.agent_by_node(node_id).host


def chat(client: openai.OpenAI, stream: bool) -> str:
    if not stream:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=40,
            temperature=0,  # type: ignore[arg-type]
        )
        return reply.choices[0].message.content or ""
    chunks = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=40,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def check_layers(group: dict[str, Any]) -> None:
    """Every layer on exactly one member; rank 0 (the one that serves) runs the last ones."""
    spans = {m["rank"]: tuple(map(int, m["layers"].split("-"))) for m in group["members"]}
    covered = sorted(layer for first, last in spans.values() for layer in range(first, last + 1))
    assert covered == list(range(LAYERS))
    assert spans[0][1] == LAYERS - 1
    assert len({m["node"] for m in group["members"]}) == len(group["members"])


@pytest.fixture(scope="module")
def reference(fleet: Fleet) -> dict[str, str]:
    wait_for(lambda: serving_group(fleet, 2), READY_TIMEOUT_S, "a group of two to serve")
    return reference_texts(fleet.base, fleet.key, PROMPTS, MAX_TOKENS)


def test_a_group_of_two_serves_as_one_engine_does(
    fleet: Fleet, engine: openai.OpenAI, reference: dict[str, str]
) -> None:
    group = wait_for(lambda: serving_group(fleet, 2), READY_TIMEOUT_S, "a group of two")
    check_layers(group)
    assert all(m["bytes"] > 0 for m in group["members"])
    assert sorted(rank_pids(group["group"])) == [0, 1]
    client = fleet.client()
    for stream in (False, True):
        assert chat(client, stream) == chat(engine, stream) != ""
    table = fleet_cli(fleet, "models")
    assert f"layers {group['members'][0]['layers']}" in table  # the groups column


def fleet_cli(fleet: Fleet, *args: str) -> str:
    from tests.conftest import run_ok
    from tests.multihost.fleet import cli

    return run_ok(cli(*args, "--home", str(fleet.home)))


def test_kill_of_a_rank_under_load_loses_no_request(
    fleet: Fleet, reference: dict[str, str]
) -> None:
    group = wait_for(lambda: serving_group(fleet, 2), READY_TIMEOUT_S, "a group of two")
    old = group["group"]
    with StreamLoad(fleet.base, fleet.key, PROMPTS, MAX_TOKENS) as load:
        wait_for(load.all_decoding, 60, "every stream to be mid-decode")
        os.kill(rank_pids(old)[1], signal.SIGKILL)
        replaced = wait_for(
            lambda: serving_group(fleet, 2, not_id=old), MOVE_TIMEOUT_S, "a new group to serve"
        )
        t = time.monotonic()
        wait_for(lambda: len(load.ok_started_after(t)) >= 2, 120, "streams on the new group")
    assert_all_completed(load.done(), reference, MAX_TOKENS)
    check_layers(replaced)
    wait_for(lambda: not rank_pids(old), 30, "no process of the old group left")


def test_a_cut_link_is_detected_within_the_stall_limit(
    fleet: Fleet, reference: dict[str, str]
) -> None:
    group = wait_for(lambda: serving_group(fleet, 2), READY_TIMEOUT_S, "a group of two")
    old, pids = group["group"], rank_pids(group["group"])
    cut = host_of(fleet, group["members"][1]["node"])
    with StreamLoad(fleet.base, fleet.key, PROMPTS, MAX_TOKENS) as load:
        wait_for(load.all_decoding, 60, "every stream to be mid-decode")
        fleet.net.link_down(cut)
        t_cut = time.monotonic()
        try:
            wait_for(lambda: not Path(f"/proc/{pids[0]}").exists(), 60, "rank 0 to exit")
            detected = time.monotonic() - t_cut
            wait_for(lambda: serving_group(fleet, 2, not_id=old), MOVE_TIMEOUT_S, "a new group")
            t = time.monotonic()
            wait_for(lambda: len(load.ok_started_after(t)) >= 2, 120, "streams on the new group")
        finally:
            fleet.net.link_up(cut)
    assert detected <= STALL_S + EXIT_MARGIN_S, f"rank 0 saw the cut after {detected:.1f} s"
    assert_all_completed(load.done(), reference, MAX_TOKENS)
    wait_for(lambda: not rank_pids(old), 60, "the cut-off rank to exit too")


def test_draining_a_member_places_the_group_again_first(
    fleet: Fleet, reference: dict[str, str]
) -> None:
    group = wait_for(lambda: serving_group(fleet, 2), READY_TIMEOUT_S, "a group of two")
    old = group["group"]
    drained = group["members"][1]["node"]
    with StreamLoad(fleet.base, fleet.key, PROMPTS, MAX_TOKENS) as load:
        wait_for(load.all_decoding, 60, "every stream to be mid-decode")
        fleet_cli(fleet, "nodes", "drain", drained)
        try:
            new = wait_for(
                lambda: serving_group(fleet, 2, not_id=old), MOVE_TIMEOUT_S, "a new group"
            )
            wait_for(lambda: not rank_pids(old), 60, "the old group to leave")
        finally:
            fleet_cli(fleet, "nodes", "uncordon", drained)
    assert drained not in {m["node"] for m in new["members"]}
    assert_all_completed(load.done(), reference, MAX_TOKENS)


def test_a_trigger_on_one_member_moves_the_whole_group(
    fleet: Fleet, reference: dict[str, str]
) -> None:
    group = wait_for(lambda: serving_group(fleet, 2), READY_TIMEOUT_S, "a group of two")
    old = group["group"]
    hot = fleet.agent_by_node(group["members"][1]["node"])
    readings = hot.home.parent / f"readings-{hot.home.name.removeprefix('home-')}.json"
    with StreamLoad(fleet.base, fleet.key, PROMPTS, MAX_TOKENS) as load:
        wait_for(load.all_decoding, 60, "every stream to be mid-decode")
        readings.write_text(json.dumps({"memory_pressure": "critical"}))  # -> drain
        try:
            new = wait_for(
                lambda: serving_group(fleet, 2, not_id=old), MOVE_TIMEOUT_S, "a new group"
            )
            wait_for(lambda: not rank_pids(old), 60, "the old group to leave")
        finally:
            readings.write_text("{}")
    assert hot.node_id not in {m["node"] for m in new["members"]}
    assert_all_completed(load.done(), reference, MAX_TOKENS)


def test_rank_links_refuse_non_members_and_other_groups(fleet: Fleet, tmp_path: Path) -> None:
    group = wait_for(lambda: serving_group(fleet, 2), READY_TIMEOUT_S, "a group of two")
    nodes = {n["id"]: n for n in fleet.nodes()}
    rank0, rank1 = (m["node"] for m in group["members"])
    target = nodes[rank0]["link_address"]
    outsider = next(a for a in fleet.agents.values() if a.node_id not in (rank0, rank1))
    member = fleet.agent_by_node(rank1)

    def probe(agent: Any, group_id: str) -> dict[str, Any]:
        log = tmp_path / f"probe-{agent.node_id}-{group_id}.log"
        args = [target, str(agent.home / "agent"), group_id, "1", "0"]
        proc = fleet.net.python(agent.host, ["-m", "tests.multihost.link_probe", *args], log)
        proc.wait(60)
        answer: dict[str, Any] = json.loads(log.read_text().strip().splitlines()[-1])
        return answer

    # A fleet node that is not a member, claiming rank 1: its certificate and address are not
    # rank 1's.
    assert "error" in probe(outsider, group["group"])
    # Rank 1's own node, for a group that is not open there.
    assert "error" in probe(member, "not-a-group")
    # The group serves on.
    assert chat(fleet.client(), False) != ""
