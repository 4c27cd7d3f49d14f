"""Enrollment and liveness on a LAN: real processes on separate hosts (network namespaces).

(a) Agent start → first routed chat completion: the coordinator runs on host 1 with the demo
    model in its fleet.toml; an agent with a fresh home starts on host 2; this process (on the
    bridge) polls a small chat completion through the gateway every 100 ms.
(b) Partition → the node leaves the router: agents on hosts 2 and 3, the model's engine on one
    of them; its link goes down (`Network.link_down`); this process polls the admin API
    (what `mlxfleet nodes --json` reads), /v1/models and a completion until the node is suspect,
    dead, and the model is served again by the other node.

Needs root (namespaces). Every process it starts is stopped at the end, also on error or Ctrl-C.

    sudo python -m benchmarks.enrollment_timing [--runs 3 --partitions 3] [--write-docs]
"""

from __future__ import annotations

import datetime
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.fleet import MODEL, Fleet, demo_model, model_toml
from tests.netns import Network, unavailable_reason

SECTION = "## Enrollment and liveness on a LAN (issue 3)"
CONTEXT_LENGTH = 2048
POLL_S = 0.1
START_TIMEOUT_S = harness.START_TIMEOUT_S
READY_TIMEOUT_S = harness.READY_TIMEOUT_S
PARTITION_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = harness.HTTP_TIMEOUT_S
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


# The fleet: the coordinator on the first host; agents on the others


COMPLETION = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Hello"}],
    "max_tokens": 4,
    "temperature": 0,
}


def completion_ok(f: Fleet) -> bool:
    status, body = f.call("/v1/chat/completions", COMPLETION, timeout_s=REQUEST_TIMEOUT_S)
    return status == 200 and b'"choices"' in body


def model_ids(f: Fleet) -> list[str] | None:
    rows = f.models()
    return None if rows is None else [m["id"] for m in rows]


def nodes(f: Fleet) -> dict[str, dict[str, Any]]:
    """The admin API's rows by node id (what `mlxfleet nodes --json` prints)."""
    status, body = f.call("/admin/v1/nodes", admin=True, timeout_s=REQUEST_TIMEOUT_S)
    if status != 200:
        return {}
    return {n["id"]: n for n in json.loads(body)["nodes"]}


def fleet(net: Network, workdir: Path, model: Path, uses: int) -> Fleet:
    """A fresh coordinator on the first host, with a fresh home, and one join token for `uses`
    agents (made before any agent starts, so no timing includes it)."""
    config = model_toml(model, context_length=CONTEXT_LENGTH)
    host = net.hosts[0]
    return Fleet(workdir, config, host=host.ip, netns=host.name, join_uses=uses)


def log_times(log: Path) -> dict[str, float]:
    """Unix times of the agent's milestones, from its log (local-time asctime, ms)."""
    marks = {
        "enrolled": "enrolled as ",
        "connected": "connected to coordinator",
        "engine ready": " ready at ",
    }
    found: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        match = LOG_TIME.match(line)
        if not match:
            continue
        for key, text in marks.items():
            if key not in found and text in line:
                found[key] = datetime.datetime.strptime(
                    match.group(1), "%Y-%m-%d %H:%M:%S,%f"
                ).timestamp()
    return found


# (a) agent start → first routed completion


@dataclass
class FirstRequest:
    total_s: float
    marks: dict[str, float]  # milestone -> seconds after the agent process started
    polls: int
    load: float  # 1-minute load average when the agent started (others' work on these cores)


def time_first_request(net: Network, workdir: Path, model: Path) -> FirstRequest:
    with fleet(net, workdir, model, uses=1) as f:
        load = os.getloadavg()[0]
        start_wall, start = time.time(), time.monotonic()
        log = f.start_agent("agent", netns=net.hosts[1].name).proc.log
        polls = 0
        deadline = start + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            polls += 1
            if completion_ok(f):
                total = time.monotonic() - start
                break
            time.sleep(POLL_S)
        else:
            raise RuntimeError(f"no routed completion in {READY_TIMEOUT_S:.0f} s")
        marks = {k: v - start_wall for k, v in log_times(log).items()}
        return FirstRequest(total, marks, polls, load)


# (b) partition → suspect, dead, served by the other node


@dataclass
class Partition:
    suspect_s: float
    unrouted_s: float | None  # /v1/models stops listing the model
    dead_s: float
    served_again_s: float  # first completion after the cut (necessarily by the other node)
    other_ready_s: float | None  # the admin API shows the other node's engine ready
    errors: dict[str, int]  # completion poll outcomes after the cut, by HTTP status
    hung: list[float]  # when the polls that got no answer in time were sent


def time_partition(net: Network, workdir: Path, model: Path) -> Partition:
    with fleet(net, workdir, model, uses=2) as f:
        hosts = {}
        for i in (1, 2):
            home = f.start_agent(f"agent{i}", netns=net.hosts[i].name).home
            identity = harness.wait_for(
                lambda home=home: harness.read_json(home / "agent" / "identity.json"),
                START_TIMEOUT_S,
                f"agent{i} to enroll",
            )
            hosts[identity["node_id"]] = net.hosts[i]
        harness.wait_for(lambda: completion_ok(f), READY_TIMEOUT_S, "a routed completion")
        harness.wait_for(
            lambda: all(n.get("state") == "live" for n in nodes(f).values()) and len(hosts) == 2,
            START_TIMEOUT_S,
            "both nodes live",
        )
        rows = nodes(f)
        victim = next(nid for nid, n in rows.items() if any("ready" in m for m in n["models"]))
        other = next(nid for nid in hosts if nid != victim)
        print(f"  engine on {victim}; cutting {hosts[victim].name}", file=sys.stderr)

        outcomes: list[tuple[float, int]] = []  # (answered at, HTTP status; 0: none in time)
        hung: list[float] = []  # send times of the polls that got no answer in time
        stop_polling = threading.Event()

        def poll_completions(t0: float) -> None:
            while not stop_polling.is_set():
                sent = time.monotonic() - t0
                status, _body = f.call(
                    "/v1/chat/completions", COMPLETION, timeout_s=REQUEST_TIMEOUT_S
                )
                outcomes.append((time.monotonic() - t0, status))
                if status == 0:
                    hung.append(sent)
                time.sleep(POLL_S)

        t0 = time.monotonic()
        net.link_down(hosts[victim])
        poller = threading.Thread(target=poll_completions, args=(t0,), daemon=True)
        poller.start()
        try:
            suspect = unrouted = dead = served = other_ready = None
            while time.monotonic() - t0 < PARTITION_TIMEOUT_S:
                now = time.monotonic() - t0
                rows = nodes(f)
                if not rows:  # the admin API did not answer in time: poll again
                    time.sleep(POLL_S)
                    continue
                state = rows.get(victim, {}).get("state")
                if suspect is None and state not in (None, "live"):
                    suspect = now
                if dead is None and state in (None, "offline"):
                    dead = now
                listed = model_ids(f)
                if unrouted is None and listed is not None and MODEL not in listed:
                    unrouted = now
                if other_ready is None and any(
                    "ready" in m for m in rows.get(other, {}).get("models", [])
                ):
                    other_ready = now
                if served is None:
                    served = next((t for t, s in outcomes if s == 200 and t > 0), None)
                if None not in (suspect, dead, served, other_ready):
                    break
                time.sleep(POLL_S)
        finally:
            stop_polling.set()
            poller.join(REQUEST_TIMEOUT_S + 1)
            net.link_up(hosts[victim])
        if suspect is None or dead is None or served is None:
            raise RuntimeError(
                f"partition: suspect={suspect} dead={dead} served={served} "
                f"after {PARTITION_TIMEOUT_S:.0f} s"
            )
        errors: dict[str, int] = {}
        for _t, s in outcomes:
            key = str(s) if s else f"no answer in {REQUEST_TIMEOUT_S:.0f} s"
            errors[key] = errors.get(key, 0) + 1
        return Partition(suspect, unrouted, dead, served, other_ready, errors, hung)


# Report


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def report(
    firsts: list[FirstRequest],
    parts: list[Partition],
    cache: str,
    command: str,
    when: str,
) -> str:
    rows_a = [
        "| run | enrolled (s) | stream connected (s) | engine ready (s) "
        "| **first routed completion (s)** | load avg at start |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(firsts, 1):
        rows_a.append(
            f"| {i} | {_s(r.marks.get('enrolled'))} | {_s(r.marks.get('connected'))} "
            f"| {_s(r.marks.get('engine ready'))} | **{r.total_s:.2f}** | {r.load:.2f} |"
        )
    median_a = statistics.median(r.total_s for r in firsts)
    rows_b = [
        "| run | suspect (s) | off /v1/models (s) | dead (s) | other node's engine ready (s) "
        "| first completion served again (s) | completion polls after the cut |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, p in enumerate(parts, 1):
        polls = ", ".join(f"{k}: {v}" for k, v in sorted(p.errors.items()))
        if p.hung:
            polls += " (unanswered sent at " + ", ".join(f"{t:.1f}" for t in p.hung) + " s)"
        rows_b.append(
            f"| {i} | {p.suspect_s:.2f} | {_s(p.unrouted_s)} | {p.dead_s:.2f} "
            f"| {_s(p.other_ready_s)} | {p.served_again_s:.2f} | {polls} |"
        )
    table_a, table_b = "\n".join(rows_a), "\n".join(rows_b)
    median_suspect = statistics.median(p.suspect_s for p in parts)
    median_dead = statistics.median(p.dead_s for p in parts)
    hung_note = ""
    if any(p.hung for p in parts) and all(t < p.suspect_s for p in parts for t in p.hung):
        hung_note = (
            f"Polls with no answer in {REQUEST_TIMEOUT_S:.0f} s were all sent before the node\n"
            "was suspect, so the gateway had routed them to the cut node's engine. Its requests\n"
            "to engines have a connect timeout but no read timeout\n"
            "(`coordinator/gateway/forward.py`, `ClientTimeout(total=None, sock_connect=5)`):\n"
            "nothing in the gateway bounds such a request or fails it over; this client gave\n"
            f"up after {REQUEST_TIMEOUT_S:.0f} s.\n"
        )
    return f"""{SECTION}

Measured {when} with `{command}`.

- Machine: {harness.machine()}
- Versions: {harness.versions("grpcio", "protobuf", "cryptography", "mlx", "mlx-lm", "litellm")}
- Network: `tests/netns.py`: one network namespace per host on a Linux bridge (veth links,
  10.231.N.0/24); the coordinator on host 1 (`--host <its IP>`), agents on hosts 2 and 3
  (`--coordinator <IP>:<grpc port> --enroll-port <port> --token T --no-mdns`, a fresh
  `--home` each run); this script runs on the bridge. All hosts share the same 2 cores.
- Model: the offline demo model (`write_demo_model`) in fleet.toml,
  `context_length = {CONTEXT_LENGTH}`.
- MLX kernel cache before the first run: {cache}.

### (a) Agent start → first routed chat completion

Method: per run a fresh coordinator (fresh home, join token, API key) is up first; the timer
starts when the agent process is started on its host; this script posts a non-streamed chat
completion (`max_tokens: 4`) through the gateway every {POLL_S * 1000:.0f} ms until one returns
200 with choices. Milestones come from the agent's log (`enrolled as`, `connected to
coordinator`, `engine ... ready at`, millisecond timestamps), relative to the process start.
Load avg = the machine's 1-minute load average when the agent started: anything above ~0 is
other work competing for the same {os.cpu_count()} cores (it slows the engine's model load most).

{table_a}

Median: **{median_a:.2f} s** to the first routed completion.

### (b) Partition → the node leaves the router

Method: per run a fresh coordinator and two agents (hosts 2 and 3); once a completion is routed
and both nodes are live, the link of the host whose node holds the model's engine goes down
(`ip link set <veth> down`: a partition, no FIN, no RST). From then on this script polls the
admin API (`GET /admin/v1/nodes`, what `mlxfleet nodes --json` prints) and `/v1/models` every
{POLL_S * 1000:.0f} ms, and posts a completion every {POLL_S * 1000:.0f} ms on a second thread
({REQUEST_TIMEOUT_S:.0f} s client timeout). Suspect = the node's state is no longer `live`;
dead = the node has left the registry (state `offline`); served again = the first 200 after
the cut, which only the other node's new engine can give (the demo model has one replica, so it
is placed again only when the cut node is dead). The link comes back up after each run.
Configured: suspect after 3 s, dead after 10 s without a heartbeat (`coordinator/config.py`),
heartbeats every 1 s, liveness checked every 0.25 s.

{table_b}

Median: suspect after **{median_suspect:.2f} s**, dead after **{median_dead:.2f} s**.
{hung_note}"""


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--runs", type=int, default=3, choices=range(1, 11), metavar="1..10")
    parser.add_argument("--partitions", type=int, default=3, choices=range(1, 11), metavar="1..10")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    command, when = harness.command_line(), harness.now_utc()

    firsts: list[FirstRequest] = []
    parts: list[Partition] = []
    with tempfile.TemporaryDirectory(prefix="mlxfleet-lan-") as tmp:
        workdir = Path(tmp)
        model = demo_model(workdir)
        cache = harness.mlx_cache_state()
        with Network(3) as net:
            for i in range(args.runs):
                firsts.append(time_first_request(net, workdir / f"first-{i}", model))
                r = firsts[-1]
                print(f"(a) run {i + 1}: {r.total_s:.2f} s {r.marks}", file=sys.stderr)
            for i in range(args.partitions):
                parts.append(time_partition(net, workdir / f"partition-{i}", model))
                print(f"(b) run {i + 1}: {parts[-1]}", file=sys.stderr)
    section = report(firsts, parts, cache, command, when)
    harness.publish(SECTION, section, args.write_docs)
    return 0


if __name__ == "__main__":
    harness.run_script(main)
