"""One model split over several engine processes (node_agent/engine/group.py): the group answers
exactly what a single engine answers, each rank holds its own share of the layers and of the
prefix cache, and a lost, hung or refused rank ends the group with the exits the agent reads.

Needs processes: every rank is a real `python -m node_agent.engine` joined over MLX's ring
backend on 127.0.0.1 (the demo model with 6 layers), talked to with the official openai client
on rank 0's /v1; a peer's death is a real SIGKILL, a hung peer a real SIGSTOP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from node_agent.engine.group import EXIT_GROUP_LOST
from node_agent.engine.prefix_cache import BLOCK_TOKENS
from tests.agent_model import CARD_SCHEMA
from tests.conftest import REPO, Proc, wait_for
from tests.node_agent.engine.conftest import ENGINE_START_TIMEOUT_S, Engine, start_engine

SPLITS = {2: "4,2", 3: "2,2,2"}
# (first layer, layers) of each rank: rank 0 runs the last layers, the highest rank the first.
LAYERS = {2: [(2, 4), (0, 2)], 3: [(4, 2), (2, 2), (0, 2)]}
GROUP_ID = "g1"
STALL_S = 2.0  # --group-stall-s of every group here: the failure tests wait on it
EXIT_MARGIN_S = 10.0  # on top of the stall limit: noticing it, exiting, a busy 2-core box
STOP_TIMEOUT_S = 30.0  # a clean stop drains, then stops the model thread
PROMPT = "The quick brown fox"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather?"}]
# A chat prompt of a few hundred tokens: several of the prefix cache's blocks.
LONG: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": " ".join(f"rule {i}: be kind." for i in range(40))},
    {"role": "user", "content": "Who are you?"},
]
CARD_FORMAT = {"type": "json_schema", "json_schema": {"name": "card", "schema": CARD_SCHEMA}}
_LISTENING = re.compile(r"^MLXFLEET_ENGINE_LISTENING port=(\d+)$", re.MULTILINE)

Kind = Literal["completion", "chat"]


@dataclass(frozen=True, slots=True)
class Group:
    """The ranks of one group (rank 0 first), their HTTP ports and their shared secret."""

    ranks: list[Proc]
    ports: list[int]
    secret: str
    model: Path

    def url(self, rank: int = 0) -> str:
        return f"http://127.0.0.1:{self.ports[rank]}"

    def stats(self, rank: int) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.secret}"}
        reply = httpx.get(self.url(rank) + "/v1/engine/stats", headers=headers, timeout=10)
        assert reply.status_code == 200, reply.text
        return dict(reply.json())


Server = Group | Engine


def client(server: Server) -> openai.OpenAI:
    base_url = (server.url() if isinstance(server, Group) else server.base_url) + "/v1"
    return openai.OpenAI(base_url=base_url, api_key=server.secret, max_retries=0)


def free_ports(n: int) -> list[int]:
    """Ports the kernel has just handed out, for MLX's hostfile (it cannot take port 0)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def start_ranks(
    model: Path,
    folder: Path,
    started: list[Proc],
    splits: list[str],
    group_ids: list[str] | None = None,
) -> tuple[list[Proc], str]:
    """One engine per rank with MLX_RANK and MLX_HOSTFILE set as the agent sets them, and
    their secret. Each is appended to `started` at once: the caller stops it, whatever fails."""
    hostfile = folder / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(len(splits))]))
    secret = secrets.token_urlsafe(16)
    ranks = []
    for rank, split in enumerate(splits):
        args = [sys.executable, "-m", "node_agent.engine", "--model-path", str(model)]
        args += ["--model-name", "demo", "--port", "0", "--group-stall-s", str(STALL_S)]
        args += ["--group-id", group_ids[rank] if group_ids else GROUP_ID, "--group-split", split]
        env = {"MLXFLEET_ENGINE_SECRET": secret, "MLX_HOSTFILE": str(hostfile)}
        env["MLX_RANK"] = str(rank)  # MLX's own variables, as the agent sets them
        ranks.append(Proc(args, folder / f"rank{rank}.log", env))
        started.append(ranks[-1])
    return ranks, secret


def start_group(model: Path, folder: Path, started: list[Proc], size: int) -> Group:
    """A group of `size` ranks, every rank's /health ready."""
    ranks, secret = start_ranks(model, folder, started, [SPLITS[size]] * size)
    ports = []
    for proc in ranks:

        def listening(proc: Proc = proc) -> int | None:
            assert proc.alive(), proc.output()[-3000:]
            match = _LISTENING.search(proc.output())
            return int(match.group(1)) if match else None

        ports.append(wait_for(listening, ENGINE_START_TIMEOUT_S, "a rank's LISTENING line"))
    group = Group(ranks, ports, secret, model)
    for rank, proc in enumerate(ranks):

        def ready(rank: int = rank, proc: Proc = proc) -> bool:
            assert proc.alive(), proc.output()[-3000:]
            headers = {"Authorization": f"Bearer {secret}"}
            return httpx.get(group.url(rank) + "/health", headers=headers).status_code == 200

        wait_for(ready, ENGINE_START_TIMEOUT_S, f"rank {rank} ready")
    return group


def stop_all(procs: list[Proc]) -> None:
    """Stop every process, a SIGSTOPped one included; rank 0 first (it stops the others)."""
    for proc in procs:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGCONT)
    for proc in procs:
        proc.stop(timeout_s=STOP_TIMEOUT_S)


def exit_code(proc: Proc, deadline: float, what: str) -> int:
    """The process's exit code, failing the test when it still runs at `deadline`."""
    try:
        return proc.popen.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} still runs:\n{proc.output()[-3000:]}")


def left_of(procs: list[Proc]) -> list[int]:
    """The processes still in these processes' sessions (every engine runs in its own)."""
    sessions = {proc.popen.pid for proc in procs}
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) in sessions:  # after ")": state, ppid, pgrp, session
            found.append(int(stat.parent.name))
    return found


def text(server: Server, kind: Kind = "completion", stream: bool = False, **extra: Any) -> str:
    """One answer's text, streamed or whole: greedy and 32 tokens unless `extra` says else."""
    body: dict[str, Any] = {"model": "demo", "max_tokens": 32, "temperature": 0} | extra
    c = client(server)
    if kind == "completion":
        if stream:
            chunks = c.completions.create(prompt=PROMPT, stream=True, **body)
            return "".join(ch.choices[0].text for ch in chunks if ch.choices)
        return c.completions.create(prompt=PROMPT, **body).choices[0].text
    if stream:
        deltas = c.chat.completions.create(messages=MESSAGES, stream=True, **body)
        return "".join(ch.choices[0].delta.content or "" for ch in deltas if ch.choices)
    reply = c.chat.completions.create(messages=MESSAGES, **body)
    return reply.choices[0].message.content or ""


def cached_tokens(reply: Any) -> int:
    """The prompt tokens a reply's usage says came from the prefix cache."""
    details = reply.usage.prompt_tokens_details
    return int(details.cached_tokens) if details is not None else 0


def long_stream(group: Group) -> openai.Stream[Any]:
    """A sampled completion of up to 3000 tokens, its first chunks read: the group is busy."""
    stream = client(group).completions.create(
        model="demo", prompt=PROMPT, temperature=1.0, seed=5, max_tokens=3000, stream=True
    )
    chunks = iter(stream)
    for _ in range(3):
        assert next(chunks).choices
    return stream


@pytest.fixture
def started() -> Iterator[list[Proc]]:
    """The processes one test starts, all stopped after it (SIGSTOPped ones too)."""
    procs: list[Proc] = []
    yield procs
    stop_all(procs)


@pytest.fixture(scope="module")
def singles() -> Iterator[dict[Path, Engine]]:
    """One engine per model, started when a test first needs it."""
    engines: dict[Path, Engine] = {}
    yield engines
    for engine in engines.values():
        engine.proc.stop()


@pytest.fixture
def single(
    request: pytest.FixtureRequest,
    singles: dict[Path, Engine],
    demo_model_6: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Engine:
    """The test's group's model whole in one engine: what the group must answer."""
    model = request.getfixturevalue("group").model if "group" in request.fixturenames else None
    model = model or demo_model_6
    if model not in singles:
        log = tmp_path_factory.mktemp("single") / "engine.log"
        singles[model] = start_engine(model, log)
    return singles[model]


# The demo model as a Qwen2 (mlx-lm's pipeline() splits it) and as a Llama (mlxfleet's own
# layer split does), in groups of 2 and 3 ranks.
GROUPS = [(2, "qwen2"), (3, "qwen2"), (2, "llama"), (3, "llama")]
SPLIT_BY = {"qwen2": "mlx-lm pipeline", "llama": "mlxfleet layer split"}


@pytest.fixture(
    scope="module", params=GROUPS, ids=["2ranks", "3ranks", "2ranks-llama", "3ranks-llama"]
)
def group(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Group]:
    """A healthy group for the module's tests that leave it running: split 4,2 or 2,2,2."""
    size, kind = request.param
    model = request.getfixturevalue("demo_model_6" if kind == "qwen2" else "demo_llama_6")
    procs: list[Proc] = []
    try:
        yield start_group(model, tmp_path_factory.mktemp("group"), procs, size)
    finally:
        stop_all(procs)


# --- a healthy group ---------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_greedy_text_is_the_single_engines(
    group: Group, single: Engine, kind: Kind, stream: bool
) -> None:
    answer = text(group, kind, stream)
    assert answer  # the demo model's gibberish, 32 tokens of it
    assert answer == text(single, kind, stream)


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_sampled_text_with_a_seed_is_the_single_engines(
    group: Group, single: Engine, kind: Kind
) -> None:
    """Every rank builds the sampler from rank 0's recipe: the seed draws the same tokens."""
    answer = text(group, kind, temperature=0.8, seed=1234)
    assert answer == text(single, kind, temperature=0.8, seed=1234)
    assert answer != text(single, kind, temperature=0.8, seed=4321)  # really sampled


async def test_a_batch_of_requests_is_the_single_engines_one_by_one(
    group: Group, single: Engine
) -> None:
    """Sequences of several lengths inserted and removed together: the ranks stay in step."""
    seeds_and_lengths = [(1, 12), (2, 40), (3, 24)]
    async with openai.AsyncOpenAI(
        base_url=group.url() + "/v1", api_key=group.secret, max_retries=0
    ) as c:
        replies = await asyncio.gather(
            *(
                c.completions.create(
                    model="demo", prompt=PROMPT, temperature=0.8, seed=seed, max_tokens=n
                )
                for seed, n in seeds_and_lengths
            )
        )
    for (seed, n), reply in zip(seeds_and_lengths, replies, strict=True):
        assert reply.usage is not None and reply.usage.completion_tokens == n
        assert reply.choices[0].text == text(single, temperature=0.8, seed=seed, max_tokens=n)


def test_stats_show_each_ranks_layers_and_the_same_steps(group: Group, single: Engine) -> None:
    size = len(group.ranks)
    text(group)  # at least one request has run

    def settled() -> list[dict[str, Any]] | None:
        blocks = [group.stats(rank)["group"] for rank in range(size)]
        return blocks if len({b["steps"] for b in blocks}) == 1 else None

    blocks = wait_for(settled, 10, "every rank to count the same decode steps")
    for rank, block in enumerate(blocks):
        assert (block["group_id"], block["rank"], block["size"]) == (GROUP_ID, rank, size)
        assert (block["first_layer"], block["layers"]) == LAYERS[size][rank]
        kind = json.loads((group.model / "config.json").read_text())["model_type"]
        assert block["split_by"] == SPLIT_BY[kind]
        assert block["steps"] > 0
    assert blocks[0]["control_bytes_sent"] > 0
    assert single.stats()["group"] is None


def test_structured_output_through_the_group_is_the_single_engines(
    group: Group, single: Engine
) -> None:
    """Rank 0 sends each constrained request's grammar in its recipe; the others compile it."""
    as_object: dict[str, Any] = {"response_format": {"type": "json_object"}, "max_tokens": 40}
    anything = text(group, "chat", **as_object)
    assert anything.startswith("{")  # random weights: one endless key, cut at max_tokens
    assert anything == text(single, "chat", **as_object)
    # A schema bounds the object, so even random weights finish it.
    as_card: dict[str, Any] = {"response_format": CARD_FORMAT, "max_tokens": 200}
    samplings: list[dict[str, Any]] = [{}, {"temperature": 0.8, "seed": 7}]
    for sampling in samplings:
        card = text(group, "chat", **as_card, **sampling)
        jsonschema.validate(json.loads(card), CARD_SCHEMA)
        assert card == text(single, "chat", **as_card, **sampling)


def test_the_group_reuses_its_prefix_cache_on_every_rank(group: Group, single: Engine) -> None:
    size = len(group.ranks)
    ask = client(group).chat.completions.create
    first = ask(model="demo", messages=LONG, max_tokens=16, temperature=0)
    assert first.usage is not None and first.usage.prompt_tokens > 2 * BLOCK_TOKENS
    before = [group.stats(rank)["prefix_cache"] for rank in range(size)]
    again = ask(model="demo", messages=LONG, max_tokens=16, temperature=0)
    after = [group.stats(rank)["prefix_cache"] for rank in range(size)]
    saved = cached_tokens(again)
    assert again.usage is not None and 0 < saved <= again.usage.prompt_tokens
    answer = again.choices[0].message.content
    assert answer == first.choices[0].message.content
    assert (
        answer
        == client(single)
        .chat.completions.create(
            model="demo",
            messages=LONG,
            max_tokens=16,
            temperature=0,
        )
        .choices[0]
        .message.content
    )
    # Each rank holds the KV of its own layers and took the same decision.
    for rank in range(size):
        assert after[rank]["hits"] == before[rank]["hits"] + 1, rank
        assert after[rank]["tokens_saved"] - before[rank]["tokens_saved"] == saved, rank
        assert after[rank]["bytes"] > 0, rank


def test_a_cache_drop_asked_of_any_rank_empties_every_ranks_alike(
    group: Group, single: Engine
) -> None:
    """Memory pressure on a member's node: its agent asks its own rank. A rank cannot drop
    alone (the ranks' caches would differ); rank 0 drops on all at one point of the lockstep."""
    size = len(group.ranks)
    ask = client(group).chat.completions.create
    headers = {"Authorization": f"Bearer {group.secret}"}
    for asked in range(size):
        ask(model="demo", messages=LONG, max_tokens=8, temperature=0)  # an entry on every rank
        held = [group.stats(rank)["prefix_cache"]["bytes"] for rank in range(size)]
        assert all(held), held
        reply = httpx.post(
            group.url(asked) + "/v1/engine/prefix_cache/drop", headers=headers, timeout=30
        )
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"freed_bytes": held[asked]}

        def emptied() -> bool:  # rank 0 has sent the drop: the others run it as it arrives
            caches = [group.stats(rank)["prefix_cache"] for rank in range(size)]
            return [(c["bytes"], c["entries"]) for c in caches] == [(0, 0)] * size

        wait_for(emptied, 5, f"every rank's prefix cache empty (asked of rank {asked})")
        again = ask(model="demo", messages=LONG, max_tokens=8, temperature=0)
        assert cached_tokens(again) == 0  # nothing left to reuse, on any rank
        reference = client(single).chat.completions.create(
            model="demo", messages=LONG, max_tokens=8, temperature=0
        )
        assert again.choices[0].message.content == reference.choices[0].message.content


def test_an_idle_group_stays_up_and_answers(group: Group, single: Engine) -> None:
    """Rank 0's beats keep the others' stall limit from firing while nothing is asked; the
    others sleep between them (one each tick, the default 25 ms: ~200 in 5 s)."""
    before = group.stats(0)["group"]
    time.sleep(2 * STALL_S + 1)  # what is tested: time passing with nothing to do
    assert all(proc.alive() for proc in group.ranks)
    after = group.stats(0)["group"]
    beats = after["beats_sent"] - before["beats_sent"]
    assert 2 * STALL_S / 0.025 / 4 < beats <= (2 * STALL_S + 2) / 0.025  # ticks, give or take
    assert after["control_bytes_sent"] == before["control_bytes_sent"]  # a beat is a size alone
    assert after["steps"] == before["steps"]  # a beat is not a decode step
    assert text(group) == text(single)


# --- a group that breaks -------------------------------------------------------------------


@pytest.mark.parametrize("size,kind", [(2, "qwen2"), (3, "qwen2"), (3, "llama")])
def test_a_killed_rank_ends_the_group(
    size: int, kind: str, request: pytest.FixtureRequest, tmp_path: Path, started: list[Proc]
) -> None:
    model = request.getfixturevalue("demo_model_6" if kind == "qwen2" else "demo_llama_6")
    group = start_group(model, tmp_path, started, size)
    stream = long_stream(group)
    os.kill(group.ranks[1].popen.pid, signal.SIGKILL)
    deadline = time.monotonic() + STALL_S + EXIT_MARGIN_S
    assert exit_code(group.ranks[0], deadline, "rank 0") == EXIT_GROUP_LOST
    assert exit_code(group.ranks[1], deadline, "rank 1") == -signal.SIGKILL
    if size == 3:  # rank 2 notices by itself: nobody signals it
        assert exit_code(group.ranks[2], deadline, "rank 2") == EXIT_GROUP_LOST
    stream.close()
    assert left_of(group.ranks) == []


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "streaming"])
def test_a_hung_rank_ends_the_group(
    busy: bool, demo_model_6: Path, tmp_path: Path, started: list[Proc]
) -> None:
    """A stopped peer keeps its sockets open, as a cut link does: only the stall limit tells.
    Idle, rank 0's next beat is what gets stuck."""
    group = start_group(demo_model_6, tmp_path, started, 2)
    stream = long_stream(group) if busy else None
    os.kill(group.ranks[1].popen.pid, signal.SIGSTOP)
    deadline = time.monotonic() + STALL_S + EXIT_MARGIN_S
    assert exit_code(group.ranks[0], deadline, "rank 0") == EXIT_GROUP_LOST
    os.kill(group.ranks[1].popen.pid, signal.SIGCONT)
    deadline = time.monotonic() + STALL_S + EXIT_MARGIN_S
    assert exit_code(group.ranks[1], deadline, "rank 1, continued") == EXIT_GROUP_LOST
    if stream is not None:
        stream.close()
    assert left_of(group.ranks) == []


def test_stopping_rank_0_stops_the_others(
    demo_model_6: Path, tmp_path: Path, started: list[Proc], single: Engine
) -> None:
    group = start_group(demo_model_6, tmp_path, started, 3)
    assert text(group) == text(single)
    os.kill(group.ranks[0].popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    assert exit_code(group.ranks[0], deadline, "rank 0") == 0
    for rank in (1, 2):  # told to stop by rank 0, not by a signal
        assert exit_code(group.ranks[rank], deadline, f"rank {rank}") == 0
    assert left_of(group.ranks) == []


@pytest.mark.parametrize(
    ("group_ids", "splits"),
    [([GROUP_ID, "g2"], ["4,2", "4,2"]), ([GROUP_ID, GROUP_ID], ["4,2", "3,3"])],
    ids=["another-group", "another-split"],
)
def test_a_rank_of_another_group_is_refused(
    group_ids: list[str], splits: list[str], demo_model_6: Path, tmp_path: Path, started: list[Proc]
) -> None:
    ranks, _ = start_ranks(demo_model_6, tmp_path, started, splits, group_ids)
    deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
    for rank, proc in enumerate(ranks):
        assert exit_code(proc, deadline, f"rank {rank}") == 1, proc.output()[-3000:]
        log = proc.output()
        assert "a rank of another group (or with another layer split) joined" in log
        assert "ready: serving" not in log  # it never served
    assert left_of(ranks) == []


@pytest.mark.parametrize(
    ("flags", "environ", "message"),
    [
        (["--group-split", "4,2"], {}, "MLX_RANK must be a rank below 2, got ''"),
        (["--group-split", "4,2"], {"MLX_RANK": "2"}, "MLX_RANK must be a rank below 2, got '2'"),
        ([], {"MLX_RANK": "0"}, "--group-id and --group-split go together"),
        (
            ["--group-split", "4,2", "--tier", "batch", "--kv-bits", "8"],
            {"MLX_RANK": "0"},
            "--kv-bits cannot be used in a group (a quantized KV cache runs one sequence at a "
            "time)",
        ),
        (
            ["--group-split", "4,0"],
            {"MLX_RANK": "0"},
            "--group-split must be 2 or more positive layer counts, got '4,0'",
        ),
        (
            ["--group-split", "4,2"],
            {"MLX_RANK": "0", "MLX_HOSTFILE": "/nonexistent/hosts.json"},
            "MLX_HOSTFILE must name the group's hostfile",
        ),
        (
            ["--group-split", "4,2", "--group-idle-tick-ms", "2000"],
            {"MLX_RANK": "0"},
            "--group-idle-tick-ms must be from 0 to a quarter of --group-stall-s, got 2000",
        ),
    ],
    ids=[
        "no-rank",
        "rank-out-of-range",
        "no-split",
        "kv-bits",
        "zero-layers",
        "no-hostfile",
        "tick-over-stall",
    ],
)
def test_a_bad_group_configuration_is_one_line_and_exit_2(
    flags: list[str], environ: dict[str, str], message: str, tmp_path: Path
) -> None:
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([["127.0.0.1:1"], ["127.0.0.1:2"]]))
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_RANK", "MLX_HOSTFILE")}
    env |= {"MLXFLEET_ENGINE_SECRET": "s", "MLX_HOSTFILE": str(hostfile)} | environ
    args = [sys.executable, "-m", "node_agent.engine", "--model-path", str(tmp_path)]
    args += ["--model-name", "demo", "--group-id", GROUP_ID, *flags]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"mlxfleet engine: {message}"]
    assert done.stdout == ""
