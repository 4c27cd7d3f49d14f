"""Groups (issue 19): one model split over two MLX ring ranks against one engine of the whole
model, in the same run; the ranks talking directly on 127.0.0.1, or through two agents' rank
links (mutual TLS relays, node_agent/rank_link.py) as in production.

Three set-ups per model, one running at a time (an idle group is not idle: a rank waiting in a
collective busy-polls its socket, MLX's ring retrying a non-blocking recv, a core of its own),
taken in turn, the order rotated each round:

- one engine: `python -m node_agent.engine` of the whole model;
- group, direct: two engines with --group-id/--group-split, MLX_RANK, and one MLX_HOSTFILE
  naming both ranks' ports on 127.0.0.1;
- group, rank links: two link processes (`python -m benchmarks.groups link NODE CERTS`: one
  RankLink each, on uvloop as in the agent, node-a's and node-b's certificates from a fleet CA
  made for the run), each opening the group and writing its rank's hostfile as the agent does
  (node_agent/groups.py, rank_environment); the ranks reach each other only through them.

Each start: a warm-up, then per repetition, through the engine's HTTP API with its secret:
- TTFT: a streamed /v1/completions of a 500-token prompt (token ids, new each time), 1 token;
- decode: non-streamed requests of SHORT and SHORT+EXTRA tokens (ignore_eos, temperature 0),
  one stream, then four at once (batch window raised so the four start in one step);
  tok/s = extra tokens / extra seconds, so prefill and HTTP cancel out;
- link bytes: node-a's LinkStats (bytes_sent + bytes_received) around the same requests, per
  extra token; and CPU seconds of every process of the set-up, per extra second.
The prefix cache is off (--prefix-cache-mib 0), so every prompt is prefilled in full.

    python -m benchmarks.groups [--rounds 3] [--models demo6,wide] [--write-docs]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks import harness
from benchmarks.fleet import MODEL, Engine, free_port

SECTION = "## Groups: one model over two ranks, direct and through the rank links (issue 19)"
SETUPS = ("one engine", "group, direct", "group, rank links")
NODES = ("node-a", "node-b")  # rank 0's and rank 1's agents
STALL_S = 30.0  # --group-stall-s: room for 2 busy cores; an idle rank 0 beats every 7.5 s
BATCH_WINDOW_MS = 500  # while four streams start: admitted together, in one step
STREAMS = 4  # the interactive tier's max_concurrency and max_batch_size
SHORT = 8  # tokens of the short request; the long one has `extra` more
TTFT_TOKENS = 500
DECODE_PROMPT_TOKENS = 16
FIRST_ID, LAST_ID = 10, 1300  # prompt ids: no special ones, within the demo tokenizer's 1,323
REQUEST_TIMEOUT_S = 300.0
IDLE_S = 1.5  # after the warm-up: CPU of an idle set-up
# After a request, before counting: mlx-lm decodes a step ahead, so the last step's messages
# may still be crossing when the response arrives; counted late, they would fall in no window.
SETTLE_S = 0.2
MEASURES = ("ttft_s", "b1", "b4", "idle_cores")
COLLECTIVE_OPS, COLLECTIVE_BLOCKS = 500, 3  # per rank process; seconds per op, per block
COLLECTIVES_TIMEOUT_S = 120.0
WEIGHT_STD = 0.02

# On paper: two Mac Studios (M3 Ultra) with a 70B model at 4 bits, as a 2-rank pipeline.
MAC_MEMORY_B_S = 819e9  # M3 Ultra, nominal
PAPER_WEIGHTS_BYTES = 40e9  # a 70B model at 4 bits, group 64
PAPER_HIDDEN, PAPER_LAYERS = 8192, 80
PAPER_ACTIVATION_BYTES = 2  # the hidden state stays float16/bfloat16 whatever the weights' bits
HOP_KIB = PAPER_HIDDEN * PAPER_ACTIVATION_BYTES // 1024
WIFI_B_S = 50e6  # Wi-Fi, for the paragraph on exo's ring over Wi-Fi (latency 2 ms assumed)
# Per decode step, one after the other on the critical path: the control message's all_sum
# (MLX's ring runs a 1-element sum as reduce-scatter then all-gather: two exchanges), the
# pipeline's send of the hidden state to rank 0, and the all_gather of it.
SERIAL_MESSAGES = 4
# A plain step's control message: an int32 all_sum, padded to one element per rank by MLX's
# ring; each phase sends 4 bytes each way.
CONTROL_STEP_BYTES = 2 * 2 * 4


@dataclass(frozen=True, slots=True)
class Plan:
    """One model of the run: how it is written, split, and measured."""

    name: str
    about: str
    hidden: int
    layers: int
    dtype_bytes: int
    split: str  # --group-split, rank 0 first
    extra: int  # decode tokens measured (the long request's extra over SHORT)
    ttft_reps: int  # per start
    decode_reps: int  # per start


# float32 for both: MLX's CPU backend here reads float16 weights ~10x slower than float32 (a
# 1024x2816 matvec: 1.5 GB/s against 15), which would measure the conversion, not the model.
# Four layers: its 500-token prefill already takes ~12 s on 2 cores (16 layers: ~48 s).
PLANS = {
    "demo6": Plan("demo6", "the demo model, 6 layers", 128, 6, 4, "3,3", 128, 3, 2),
    "wide": Plan("wide", "random-weight Qwen2, 4 layers", 1024, 4, 4, "2,2", 48, 1, 2),
}
WIDE_SHAPE = {"num_attention_heads": 16, "num_key_value_heads": 4, "intermediate_size": 2816}


# --- theory: pure -------------------------------------------------------------------------------


def step_bytes(hidden: int, dtype_bytes: int, batch: int) -> int:
    """Bytes one decode step puts on the link between the two ranks of a 2-rank group, both
    directions: mlx-lm's pipeline sends the hidden state from rank 1 to rank 0 once, then
    all_gathers it (each rank's copy crosses once), plus our control message for a plain step."""
    hop = batch * hidden * dtype_bytes
    return 3 * hop + CONTROL_STEP_BYTES


@dataclass(frozen=True, slots=True)
class PaperLink:
    """A link between the two Macs, as assumed on paper."""

    name: str
    bytes_s: float
    latency_s: tuple[float, float]  # one-way, small message, low and high
    relayed: bool = False  # through our rank links
    ours: bool = True  # a path our groups can take


PAPER_LINKS = (
    PaperLink("10 GbE, TCP, ring direct", 1.25e9, (50e-6, 100e-6)),
    PaperLink("10 GbE, TCP, through our rank links", 1.25e9, (50e-6, 100e-6), True),
    PaperLink("Thunderbolt 5, TCP (IP over Thunderbolt), rank links", 10e9, (20e-6, 50e-6), True),
    PaperLink("Thunderbolt 5, RDMA (JACCL; not our path)", 10e9, (10e-6, 10e-6), ours=False),
)


def paper_step_s(
    weights_bytes: float,
    memory_b_s: float,
    hop_bytes: float,
    link_b_s: float,
    latency_s: float,
    overhead_s: float = 0.0,
) -> float:
    """Seconds per token of one stream through a 2-rank pipeline: the ranks run one after the
    other, so together they read every weight once (bandwidth-bound decode), then the messages
    in series, two of which carry a hidden state, then our own per-step overhead."""
    network = SERIAL_MESSAGES * latency_s + 2 * hop_bytes / link_b_s
    return weights_bytes / memory_b_s + network + overhead_s


@dataclass(frozen=True, slots=True)
class Sample:
    """One request, or STREAMS at once: wall seconds, tokens generated, and what the set-up's
    processes did meanwhile (node-a's link bytes, CPU seconds of the engines and the links)."""

    seconds: float
    tokens: int
    link_bytes: int
    cpu_engines_s: float
    cpu_links_s: float


def decode_window(short: Sample, long: Sample) -> dict[str, float]:
    """What the long request's extra tokens cost over the short one's: prefill, HTTP and the
    requests' own control messages cancel out."""
    tokens = long.tokens - short.tokens
    seconds = long.seconds - short.seconds
    if tokens <= 0 or seconds <= 0:
        raise ValueError(f"no decode window: {short} then {long}")
    return {
        "tok_s": tokens / seconds,
        "bytes_per_token": (long.link_bytes - short.link_bytes) / tokens,
        "cores_engines": (long.cpu_engines_s - short.cpu_engines_s) / seconds,
        "cores_links": (long.cpu_links_s - short.cpu_links_s) / seconds,
    }


# --- models -------------------------------------------------------------------------------------


def write_models(work: Path) -> dict[str, Path]:
    """The demo model with 6 layers, and the wide one."""
    from node_agent.engine.demo_model import write_demo_model

    demo = write_demo_model(work / "models" / "demo6", layers=PLANS["demo6"].layers)
    return {"demo6": demo, "wide": write_wide_model(work / "models" / "wide", demo, PLANS["wide"])}


def write_wide_model(path: Path, demo: Path, plan: Plan) -> Path:
    """A Qwen2 model of `plan`'s hidden size and layers and WIDE_SHAPE, random float32 weights,
    `demo`'s tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.models import qwen2

    path.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).write_bytes((demo / name).read_bytes())
    config = json.loads((demo / "config.json").read_text())
    config |= {"hidden_size": plan.hidden, "num_hidden_layers": plan.layers, **WIDE_SHAPE}
    del config["mlxfleet_demo"]  # not the demo model
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    def init(name: str, p: mx.array) -> mx.array:
        if name.endswith("norm.weight"):
            return mx.ones(p.shape)
        if name.endswith(".bias"):
            return mx.zeros(p.shape)
        return mx.random.normal(p.shape) * WEIGHT_STD

    mx.random.seed(19)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    model.update(tree_map_with_path(init, model.parameters()))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path


def prompt_ids(seed: int, n: int) -> list[int]:
    """`n` token ids, another list for each seed (so no prompt is a prefix of another)."""
    rng = random.Random(seed)
    return [rng.randrange(FIRST_ID, LAST_ID) for _ in range(n)]


# --- the rank link worker: one agent's RankLink in a process of its own -----------------------


def link_worker(node: str, certs: str) -> None:
    """`python -m benchmarks.groups link NODE CERTS`: prints {"port"}, then answers one JSON
    line per line on stdin: {"open": {...}} with the rank's environment, {"stats": group} with
    the group's LinkStats. Ends at EOF."""
    import uvloop

    uvloop.run(_serve_link(node, Path(certs)))


async def _serve_link(node: str, certs: Path) -> None:
    from node_agent.file_server import server_context
    from node_agent.groups import GroupRole, rank_environment
    from node_agent.peer_copy import client_context
    from node_agent.rank_link import Member, RankLink

    cert, key = certs / f"{node}.crt", certs / f"{node}.key"
    tls = server_context(cert, key, certs / "ca.pem")
    link = RankLink(
        tls, client_context(cert, key, (certs / "ca.pem").read_bytes()), node, "127.0.0.1"
    )
    print(json.dumps({"port": await link.start()}), flush=True)
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            ask = json.loads(line)
            if "open" in ask:
                o = ask["open"]
                members = tuple(Member(r, n, a) for r, n, a in o["members"])
                role = GroupRole(o["group"], o["rank"], members, tuple(o["split"]), STALL_S)
                answer: dict[str, Any] = await rank_environment(link, role, Path(o["run_dir"]))
            else:
                answer = asdict(link.stats(ask["stats"]))
            print(json.dumps(answer), flush=True)
    finally:
        await link.close()


class LinkProc:
    """A link worker, driven over its stdin and stdout."""

    def __init__(self, node: str, certs: Path, log: Path) -> None:
        argv = [sys.executable, "-m", "benchmarks.groups", "link", node, str(certs)]
        self.node = node
        self.proc = harness.Proc(argv, log, stdout_pipe=True, stdin_pipe=True)
        self.port = int(self._read()["port"])

    def ask(self, body: dict[str, Any]) -> dict[str, Any]:
        stdin = self.proc.popen.stdin
        assert stdin is not None
        stdin.write(json.dumps(body).encode() + b"\n")
        stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.popen.stdout is not None
        line = self.proc.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"link worker {self.node} exited:\n{self.proc.tail()}")
        return json.loads(line)  # type: ignore[no-any-return]


def make_certs(folder: Path) -> Path:
    from benchmarks.peer_copy import make_certs as issue

    issue(folder, NODES)
    return folder


# --- one message's cost: two bare ranks, no model ------------------------------------------------


def collectives_rank() -> None:
    """`python -m benchmarks.groups collectives`, run as each rank of a 2-rank ring: seconds
    per control message (an int32 all_sum, as group.py's Channel sends each step) and per
    all_gather of one PAPER_HIDDEN float16 hidden state (a 70B model's hop), per block of
    COLLECTIVE_OPS; one JSON line."""
    import mlx.core as mx

    group = mx.distributed.init(backend="ring", strict=True)
    hidden = mx.ones((1, 1, PAPER_HIDDEN), dtype=mx.float16)
    ops = {
        "all_sum": lambda: mx.distributed.all_sum(mx.array(1), group=group),
        "all_gather": lambda: mx.distributed.all_gather(hidden, group=group),
    }
    out: dict[str, list[float]] = {}
    for name, op in ops.items():
        for _ in range(COLLECTIVE_OPS // 10):
            mx.eval(op())
        out[name] = []
        for _ in range(COLLECTIVE_BLOCKS):
            began = time.perf_counter()
            for _ in range(COLLECTIVE_OPS):
                mx.eval(op())
            out[name].append((time.perf_counter() - began) / COLLECTIVE_OPS)
    print(json.dumps(out), flush=True)


def measure_collectives(work: Path, certs: Path, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Both collectives, direct and through the rank links, `rounds` times each in turn."""
    results: dict[str, dict[str, list[float]]] = {}
    for rnd in range(rounds):
        for name in SETUPS[1:]:
            tag = f"collectives-{rnd}-{SETUPS.index(name)}"
            with harness.stopping([]) as procs:
                envs, _ = rank_envs(name, "1,1", work, certs, tag, procs)
                argv = [sys.executable, "-m", "benchmarks.groups", "collectives"]
                ranks = [
                    harness.Proc(argv, work / "logs" / f"{tag}-{r}.log", env=env, stdout_pipe=True)
                    for r, env in enumerate(envs)
                ]
                procs.extend(ranks)
                out, _ = ranks[0].popen.communicate(timeout=COLLECTIVES_TIMEOUT_S)
                ranks[1].popen.wait(COLLECTIVES_TIMEOUT_S)
            for op, blocks in json.loads(out.decode().strip().splitlines()[-1]).items():
                results.setdefault(name, {}).setdefault(op, []).extend(blocks)
    return results


# --- the set-ups --------------------------------------------------------------------------------


@dataclass
class Setup:
    """One set-up, running: `engine` serves HTTP (rank 0 in a group); `links[0]`, if any, is
    node-a's, the agent of rank 0."""

    name: str
    engine: Engine
    engines: list[harness.Proc]
    links: list[LinkProc] = field(default_factory=list)
    group_id: str = ""

    def snapshot(self) -> tuple[int, float, float]:
        """(node-a's link bytes both ways, engines' CPU seconds, links' CPU seconds)."""
        sent = 0
        if self.links:
            stats = self.links[0].ask({"stats": self.group_id})
            sent = stats["bytes_sent"] + stats["bytes_received"]
        return (
            sent,
            sum(harness.cpu_s(p.popen.pid) for p in self.engines),
            sum(harness.cpu_s(link.proc.popen.pid) for link in self.links),
        )


def start_rank(model: Path, log: Path, env: dict[str, str], *flags: str) -> Engine:
    """benchmarks.fleet.start_engine with MLX's environment for a rank."""
    secret = secrets.token_urlsafe(32)
    argv = [sys.executable, "-m", "node_agent.engine", "--model-path", str(model)]
    argv += ["--model-name", MODEL, "--port", "0", "--prefix-cache-mib", "0", *flags]
    env = {"MLXFLEET_ENGINE_SECRET": secret, **env}
    return Engine(harness.Proc(argv, log, env=env, stdout_pipe=True), secret)


def rank_envs(
    name: str, split: str, work: Path, certs: Path, tag: str, procs: list[harness.Proc]
) -> tuple[list[dict[str, str]], list[LinkProc]]:
    """MLX's environment for each rank of a group: one hostfile naming both ranks' ports on
    127.0.0.1 (direct), or each rank's own from its agent's rank link; and the link processes
    started for it (also put into `procs`, to be stopped)."""
    if name == "group, direct":
        hostfile = work / f"hosts-{tag}.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in NODES]))
        return [{"MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)} for r in range(len(NODES))], []
    links = [LinkProc(node, certs, work / "logs" / f"link-{node}-{tag}.log") for node in NODES]
    procs.extend(link.proc for link in links)
    members = [[r, link.node, f"127.0.0.1:{link.port}"] for r, link in enumerate(links)]
    layers = [int(n) for n in split.split(",")]
    envs = [
        link.ask(
            {
                "open": {
                    "group": f"bench-{tag}",
                    "rank": r,
                    "members": members,
                    "split": layers,
                    "run_dir": str(work / "run" / link.node),
                }
            }
        )
        for r, link in enumerate(links)
    ]
    return envs, links


@contextlib.contextmanager
def running(
    name: str,
    plan: Plan,
    model: Path,
    work: Path,
    certs: Path,
    tag: str,
    flags: tuple[str, ...] = (),
) -> Iterator[Setup]:
    """Start one set-up (a group's ranks with `flags` too), wait until rank 0 is ready; stop
    every process after the block."""
    group = ["--group-id", f"bench-{tag}", "--group-split", plan.split]
    group += ["--group-stall-s", f"{STALL_S:g}", *flags]
    with harness.stopping([]) as procs:
        envs, links = (
            ([{}], [])
            if name == "one engine"
            else rank_envs(name, plan.split, work, certs, tag, procs)
        )
        engine_flags = group if len(envs) > 1 else []
        engines = [
            start_rank(model, work / "logs" / f"{tag}-rank{r}.log", env, *engine_flags)
            for r, env in enumerate(envs)
        ]
        procs.extend(e.proc for e in engines)
        for e in engines:
            e.listening()
        harness.wait_for(engines[0].healthy, harness.READY_TIMEOUT_S, f"{name} to be ready", 0.2)
        yield Setup(name, engines[0], [e.proc for e in engines], links, f"bench-{tag}")


# --- measuring ----------------------------------------------------------------------------------


class Client:
    """Requests to one set-up's serving engine, as a client of the fleet would send them."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.url = setup.engine.url
        self.http = httpx.Client(
            timeout=REQUEST_TIMEOUT_S, headers={"Authorization": f"Bearer {setup.engine.secret}"}
        )

    def complete(self, ids: list[int], max_tokens: int) -> int:
        body = {"model": MODEL, "prompt": ids, "max_tokens": max_tokens, "temperature": 0}
        r = self.http.post(f"{self.url}/v1/completions", json={**body, "ignore_eos": True})
        _check(r)
        tokens: int = r.json()["usage"]["completion_tokens"]
        if tokens != max_tokens:
            raise RuntimeError(f"{self.setup.name}: {tokens} tokens, not {max_tokens}")
        return tokens

    def ttft_s(self, ids: list[int]) -> float:
        """Seconds to the first streamed event that carries a choice (1 token asked)."""
        body = {"model": MODEL, "prompt": ids, "max_tokens": 1, "temperature": 0, "stream": True}
        started = time.perf_counter()
        with self.http.stream("POST", f"{self.url}/v1/completions", json=body) as r:
            _check(r)
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                    return time.perf_counter() - started
        raise RuntimeError(f"{self.setup.name}: a stream without a choice")

    def window(self, batch_window_ms: int) -> None:
        r = self.http.post(f"{self.url}/v1/engine/knobs", json={"batch_window_ms": batch_window_ms})
        _check(r)

    def sample(self, seed: int, streams: int, max_tokens: int) -> Sample:
        """`streams` requests at once (each its own prompt), and what they cost."""
        prompts = [prompt_ids(seed * 100 + i, DECODE_PROMPT_TOKENS) for i in range(streams)]
        before = self.setup.snapshot()
        with ThreadPoolExecutor(streams) as pool:
            started = time.perf_counter()
            tokens = sum(pool.map(lambda ids: self.complete(ids, max_tokens), prompts))
            seconds = time.perf_counter() - started
        time.sleep(SETTLE_S)
        after = self.setup.snapshot()
        return Sample(
            seconds, tokens, after[0] - before[0], after[1] - before[1], after[2] - before[2]
        )

    def decode(self, seed: int, streams: int, extra: int) -> dict[str, float]:
        short = self.sample(seed, streams, SHORT)
        long = self.sample(seed + 1, streams, SHORT + extra)
        return decode_window(short, long)

    def close(self) -> None:
        self.http.close()


def _check(r: httpx.Response) -> None:
    if r.status_code != 200:
        raise RuntimeError(f"{r.request.url}: HTTP {r.status_code}: {r.read()[:300]!r}")


def measure(setup: Setup, plan: Plan, seed: int, out: dict[str, list[Any]]) -> None:
    """A warm-up, then `plan`'s repetitions of TTFT and decode at 1 and STREAMS streams."""
    client = Client(setup)
    try:
        client.complete(prompt_ids(seed, 64), SHORT)  # warm-up: kernels of prefill and decode
        client.window(BATCH_WINDOW_MS)
        client.sample(seed + 1, STREAMS, SHORT)
        client.window(0)
        before = setup.snapshot()
        time.sleep(IDLE_S)
        after = setup.snapshot()
        out["idle_cores"].append((after[1] + after[2] - before[1] - before[2]) / IDLE_S)
        for rep in range(plan.ttft_reps):
            out["ttft_s"].append(client.ttft_s(prompt_ids(seed + 10 + rep, TTFT_TOKENS)))
        time.sleep(SETTLE_S)  # the TTFT requests' last messages: not in the next sample's bytes
        for rep in range(plan.decode_reps):
            out["b1"].append(client.decode(seed + 20 + 2 * rep, 1, plan.extra))
        client.window(BATCH_WINDOW_MS)
        for rep in range(plan.decode_reps):
            out["b4"].append(client.decode(seed + 30 + 2 * rep, STREAMS, plan.extra))
        client.window(0)
    finally:
        client.close()


def run_model(plan: Plan, model: Path, work: Path, certs: Path, rounds: int) -> dict[str, Any]:
    """Every set-up `rounds` times, one at a time, the order rotated each round."""
    results: dict[str, Any] = {s: {k: [] for k in MEASURES} for s in SETUPS}
    for rnd in range(rounds):
        for k in range(len(SETUPS)):
            name = SETUPS[(rnd + k) % len(SETUPS)]
            tag = f"{plan.name}-{rnd}-{SETUPS.index(name)}"
            began = time.monotonic()
            with running(name, plan, model, work, certs, tag) as setup:
                measure(setup, plan, 1000 * rnd, results[name])  # a round's prompts: the same
            print(
                f"{plan.name} round {rnd + 1} {name}: {time.monotonic() - began:.0f} s", flush=True
            )
    return results


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "link":
        link_worker(*sys.argv[2:])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "collectives":
        collectives_rank()
        return 0
    parser = harness.parser(__doc__ or "")
    parser.add_argument("--rounds", type=int, default=3, help="starts of each set-up per model")
    parser.add_argument("--models", default=",".join(PLANS), help=f"of {', '.join(PLANS)}")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args()
    names = args.models.split(",")
    if unknown := [n for n in names if n not in PLANS]:
        parser.error(f"unknown models {unknown}; known: {', '.join(PLANS)}")
    started = harness.now_utc()
    with tempfile.TemporaryDirectory(prefix="mlxfleet-groups-") as tmp:
        work = Path(tmp)
        (work / "logs").mkdir()
        models = write_models(work)
        certs = make_certs(work / "certs")
        results: dict[str, Any] = {"collectives": measure_collectives(work, certs, args.rounds)}
        for name in names:
            results[name] = run_model(PLANS[name], models[name], work, certs, args.rounds)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    harness.publish(SECTION, report(results, args.rounds, started), args.write_docs)
    return 0


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _spread(values: list[float], scale: float = 1.0, digits: int = 0) -> str:
    """'median (min–max)' of `values` times `scale`."""
    v = [x * scale for x in values]
    return f"{_med(v):.{digits}f} ({min(v):.{digits}f}–{max(v):.{digits}f})"


def ms_per_token(runs: list[dict[str, float]]) -> float:
    return 1000 / _med([r["tok_s"] for r in runs])


def model_table(plan: Plan, res: dict[str, Any]) -> str:
    base = ms_per_token(res["one engine"]["b1"])
    rows = []
    for name in SETUPS:
        r = res[name]
        ms = ms_per_token(r["b1"])
        added = "" if name == "one engine" else f"{ms - base:+.2f}"
        cores = f"{_med([x['cores_engines'] for x in r['b1']]):.2f}"
        if name == "group, rank links":
            cores += f" + {_med([x['cores_links'] for x in r['b1']]):.2f}"
        rows.append(
            f"| {name} | {_spread(r['ttft_s'], 1000)} | {_spread([x['tok_s'] for x in r['b1']])} "
            f"| {ms:.2f} | {added} | {_spread([x['tok_s'] for x in r['b4']])} | {cores} "
            f"| {_med(r['idle_cores']):.2f} |"
        )
    head = (
        f"| set-up | TTFT, {TTFT_TOKENS}-token prompt (ms) | decode, 1 stream (tok/s) "
        f"| ms per token | added per token (ms) | decode, {STREAMS} streams (tok/s, together) "
        "| cores busy decoding | cores busy idle |"
    )
    return f"""**{plan.name}: {plan.about} (hidden {plan.hidden}, float32), split {plan.split}**

{head}
|---|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}
"""


def bytes_table(results: dict[str, Any], names: list[str]) -> str:
    rows = []
    for name in names:
        plan, runs = PLANS[name], results[name]["group, rank links"]
        for streams, key in ((1, "b1"), (STREAMS, "b4")):
            measured = _med([x["bytes_per_token"] for x in runs[key]])
            theory = step_bytes(plan.hidden, plan.dtype_bytes, streams) / streams
            rows.append(
                f"| {name} | {plan.hidden} × {plan.dtype_bytes} | {streams} | {measured:.1f} "
                f"| {theory:.1f} | {measured / theory:.3f} |"
            )
    return "\n".join(rows)


def collectives_table(coll: dict[str, dict[str, list[float]]]) -> str:
    labels = {
        "all_sum": "control message: all_sum of one int32 (two exchanges)",
        "all_gather": f"all_gather of {PAPER_HIDDEN} float16 ({HOP_KIB} KiB: a 70B hidden state)",
    }
    rows = []
    for op, label in labels.items():
        direct, links = coll["group, direct"][op], coll["group, rank links"][op]
        added = (_med(links) - _med(direct)) * 1e6
        rows.append(f"| {label} | {_spread(direct, 1e6)} | {_spread(links, 1e6)} | {added:+.0f} |")
    return "\n".join(rows)


def _range(low: float, high: float, digits: int) -> str:
    a, b = f"{min(low, high):.{digits}f}", f"{max(low, high):.{digits}f}"
    return a if a == b else f"{a}–{b}"


def paper_table(relay_s: float, direct_c_s: float, links_c_s: float) -> str:
    """Rows of the on-paper estimate, a range over each link's assumed latencies: with the
    bare relay cost `relay_s` and c = 0, then with c = a group's measured overhead here (which
    holds the relays' cost: r = 0 then)."""
    hop = PAPER_HIDDEN * PAPER_ACTIVATION_BYTES
    compute = PAPER_WEIGHTS_BYTES / MAC_MEMORY_B_S
    rows = [f"| one Mac (the model fits one) | | | 0 | {1 / compute:.1f} | |"]
    for link in PAPER_LINKS:
        r = relay_s if link.relayed else 0.0
        c = links_c_s if link.relayed else direct_c_s

        def step(latency_s: float, c: float, bw: float = link.bytes_s, r: float = r) -> float:
            return paper_step_s(PAPER_WEIGHTS_BYTES, MAC_MEMORY_B_S, hop, bw, latency_s + r, c)

        low, high = link.latency_s
        rows.append(
            f"| {link.name} | {_range(low * 1e6, high * 1e6, 0)} | {r * 1e6:.0f} "
            f"| {_range((step(low, 0) - compute) * 1e3, (step(high, 0) - compute) * 1e3, 2)} "
            f"| {_range(1 / step(low, 0), 1 / step(high, 0), 1)} "
            f"| {_range(1 / step(low, c, r=0), 1 / step(high, c, r=0), 1) if link.ours else ''} |"
        )
    return "\n".join(rows)


def relay_added_s(coll: dict[str, dict[str, list[float]]]) -> float:
    """What the rank links add to one exchange: the two collectives' added time over their
    three exchanges (the all_sum's two, the all_gather's one)."""
    added = [
        _med(coll["group, rank links"][op]) - _med(coll["group, direct"][op])
        for op in ("all_sum", "all_gather")
    ]
    return sum(added) / 3


def report(results: dict[str, Any], rounds: int, started: str) -> str:
    names = [n for n in PLANS if n in results]
    relay_s = relay_added_s(results["collectives"])
    big = names[-1]

    def added_ms(name: str, setup: str, over: str = "one engine") -> float:
        return ms_per_token(results[name][setup]["b1"]) - ms_per_token(results[name][over]["b1"])

    direct_c_ms = added_ms(big, "group, direct")
    links_c_ms = added_ms(big, "group, rank links")
    hop = PAPER_HIDDEN * PAPER_ACTIVATION_BYTES
    wifi_tok_s = 1 / paper_step_s(PAPER_WEIGHTS_BYTES, MAC_MEMORY_B_S, hop, WIFI_B_S, 2e-3)
    relay_steps = ", ".join(
        f"{added_ms(n, 'group, rank links', 'group, direct'):+.2f} ms ({n})" for n in names
    )
    tables = "\n".join(model_table(PLANS[n], results[n]) for n in names)
    one_cores = " and ".join(
        f"{_med([x['cores_engines'] for x in results[n]['one engine']['b1']]):.1f}" for n in names
    )
    compute_ms = PAPER_WEIGHTS_BYTES / MAC_MEMORY_B_S * 1000
    return f"""{SECTION}

Measured {started} with `{harness.command_line()}`.

- Machine: {harness.machine()}
- Versions: {harness.versions("mlx", "mlx-lm", "uvloop")}

Method: benchmarks/groups.py's docstring. {rounds} starts of each set-up per model, one set-up
running at a time, the order rotated each round; medians (min–max) over the repetitions.
Temperature 0 and `ignore_eos`: every request generates exactly its max_tokens. Decode tok/s is
the extra tokens of a long request over a short one divided by the extra seconds (prefill and
HTTP cancel out). Cores busy: CPU seconds per second of the set-up's engines (after the "+":
its two link processes) over the same extra tokens; idle: {IDLE_S} s after the warm-up, no
request. Everything shares this box's two vCPUs: the two ranks and, through the rank links, the
two relays.

{tables}
TTFT is prefill-bound and the pipeline runs its two halves in turn, so a group's is one engine's
give or take the noise. On this CPU the wide model decodes hardly faster with {STREAMS} streams
than with one (MLX's CPU matmuls are compute-bound here, unlike a Mac's GPU).

Inside a collective a rank waits by retrying a non-blocking recv (MLX's ring: no poll; the same
code on macOS), a thread at 100 %. Idle, the other ranks sleep between rank 0's beats (the
idle-group section below: "cores busy idle"); while decoding, each rank spins while the other
computes, so a group fills both vCPUs where one engine used {one_cores}. Through the rank
links a decode step took {relay_steps} longer than with the ranks talking directly, where its
four exchanges at the bare relay cost measured below would take {4 * relay_s * 1e3:.2f} ms.
Our reading: the relays need little CPU (the "+" in cores busy) but wait for a vCPU that the
ranks keep busy, computing or spinning. A Mac has cores to spare, this box does not: these added
times are an upper bound, not measured on a Mac.

**Bytes between the ranks per generated token** (node-a's LinkStats, bytes_sent + bytes_received:
payload, not TLS records or TCP headers; in the decode window, so the requests' own control
messages cancel out)

| model | H × d | streams | measured (bytes/token) | theory (bytes/token) | measured / theory |
|---|---|---:|---:|---:|---:|
{bytes_table(results, names)}

Theory, per decode step of B sequences, hidden size H, d bytes a value: mlx-lm's pipeline sends
the hidden state from rank 1 to rank 0 once (B·H·d), then all_gathers it so both ranks sample the
same token (each rank's copy crosses once, 2·B·H·d; rank 1's is thrown away), and our control
message (group.py's Channel) is one all_sum of an int32 for a plain step, which MLX's ring pads
to one element per rank and runs as reduce-scatter then all-gather: 4 bytes each way twice, 16
bytes. So 3·B·H·d + 16 a step, ÷ B a token. A step that starts or removes sequences sends a
second all_sum with the changes (pickled); there are none inside the decode window.

**One message's cost here** (two bare ranks, no model: `python -m benchmarks.groups
collectives`; µs per operation, medians (min–max) of {COLLECTIVE_BLOCKS * rounds} blocks of
{COLLECTIVE_OPS})

| message | direct (µs) | through the rank links (µs) | added by the links (µs) |
|---|---:|---:|---:|
{collectives_table(results["collectives"])}

**On paper: two Mac Studios (M3 Ultra, 819 GB/s) running a 70B model at 4 bits (~40 GB of
weights, hidden {PAPER_HIDDEN}, {PAPER_LAYERS} layers) as a 2-rank pipeline, one stream**

    per-token time = W / B_mem + M × (L + r) + 2 × h / B_link + c

- W / B_mem = 40 GB / 819 GB/s = {compute_ms:.1f} ms: decode is bandwidth-bound and reads every
  weight once a token. In a pipeline the ranks run one after the other for one stream (rank 1's
  40 layers, then rank 0's), each reading its 20 GB: together the same {compute_ms:.1f} ms as one
  Mac. Splitting does not speed a single stream up; nor several: mlx-lm's pipeline passes the
  whole batch through the ranks in turn (no micro-batches), so one rank always waits. This is an
  upper bound: real decode reaches less than the nominal 819 GB/s.
- M = {SERIAL_MESSAGES} messages in series a step: the control all_sum (two exchanges), the
  pipeline's send, the all_gather. L = one-way latency of a small message (assumed: 10 GbE
  50–100 µs with the TCP stacks; IP over Thunderbolt 20–50 µs, a guess: TCP still dominates;
  RDMA ~10 µs). r = what our rank links add to a message: {relay_s * 1e6:.0f} µs as measured
  above on this 2-vCPU box (the two collectives' added time over their three exchanges), where
  the relays compete with the ranks for the CPU; a Mac's spare cores should make it smaller.
- h = {PAPER_HIDDEN} × {PAPER_ACTIVATION_BYTES} bytes = {HOP_KIB} KiB a hop at batch 1 (the hidden
  state stays 16-bit in a 4-bit model), two hops in series (send, all_gather); B_link: 10 GbE
  1.25 GB/s, Thunderbolt 5 80 Gb/s = 10 GB/s.
- c = our own per-step costs beyond the messages. The "tok/s" column takes c = 0 and r as
  above; the last takes c = what a group added per token over one engine here ({big}: ranks
  direct {direct_c_ms:+.2f} ms, through the rank links {links_c_ms:+.2f} ms; r = 0 then, since
  that holds the relays' cost). An upper bound: on this box it is mostly the ranks, busy-polling,
  and the relays sharing two vCPUs.

| link (assumed) | L (µs) | r (µs) | network per token (ms) | tok/s | tok/s with this box's c |
|---|---:|---:|---:|---:|---:|
{paper_table(relay_s, direct_c_ms / 1000, links_c_ms / 1000)}

Our ring runs over TCP: MLX's JACCL backend (RDMA over Thunderbolt 5, macOS 26.2 and later) is
not what our rank links carry, so the RDMA row is for comparison only. Whatever the link, the
network is a few per cent of a 70B token: a pipeline of two Macs runs a model that does not fit
one Mac at about one Mac's speed; where the model fits one Mac, one Mac is as fast.

**Next to exo issue 2295** (as reported there, not measured here): 4× M3 Ultra, 25.4 tok/s over
JACCL (RDMA over Thunderbolt 5) and 8.7 tok/s over MLX's ring backend on Wi-Fi. What it shows:
four Macs can beat one Mac's single-stream speed. That needs each Mac to read only its share of
every layer at the same time (tensor parallelism, likely what exo ran there), paid for with
all-reduces inside every layer, hundreds of messages in series a token: µs latencies (RDMA) keep
that cheap, and over Wi-Fi (milliseconds) the same Macs got a third of the speed. What it does
not show: anything about our path. Ours is a pipeline of two ranks over TCP, {SERIAL_MESSAGES}
messages a token, so link latency matters little (at a Wi-Fi-like 2 ms a message:
{wifi_tok_s:.1f} tok/s on paper), but it cannot pass one Mac's {1000 / compute_ms:.1f} tok/s.
Different machine counts, model and parallelism: the numbers sit side by side, they do not rank
the two.
"""


if __name__ == "__main__":
    harness.run_script(main)
