"""An idle group: the CPU its processes burn while nothing is asked, and what the first request
after a pause waits for, with the ranks spinning in MLX's receive (--group-idle-tick-ms 0) and
sleeping between rank 0's idle beats (the default tick), in the same run, next to one engine.

Set-ups (the demo model with 6 layers, split 3,3, as benchmarks/groups.py starts them), one
running at a time, the order rotated each round:
- one engine of the whole model;
- a 2-rank group, ranks direct on 127.0.0.1: spinning, and with ticks of 10, 25 and 50 ms;
- the same through two agents' rank links (mutual TLS relays), spinning and with the default tick.

Per start, after a warm-up: idle cores = CPU seconds of every process of the set-up (ranks and
link processes) over IDLE_S seconds of nothing; then REPS times: sleep PAUSE_S, then a streamed
1-token completion of a 16-token prompt, timed to its first token ("after a pause"), and the
same request again at once ("back to back"). The difference is what idleness costs a request.

    python -m benchmarks.group_idle [--rounds 3] [--write-docs]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.groups import (
    PLANS,
    Client,
    Setup,
    _spread,
    make_certs,
    prompt_ids,
    running,
)
from node_agent.engine.config import DEFAULT_GROUP_IDLE_TICK_MS

SECTION = "## Groups: an idle group, spinning or sleeping between beats (issue 19)"
IDLE_S = 4.0
PAUSE_S = 1.0
REPS = 5
PROMPT_TOKENS = 16
TICK = f"{DEFAULT_GROUP_IDLE_TICK_MS:g}"
# (label, benchmarks.groups set-up, engine flags)
SETUPS: list[tuple[str, str, tuple[str, ...]]] = [
    ("one engine", "one engine", ()),
    ("group, direct, spinning", "group, direct", ("--group-idle-tick-ms", "0")),
    ("group, direct, tick 10 ms", "group, direct", ("--group-idle-tick-ms", "10")),
    ("group, direct, tick 25 ms", "group, direct", ("--group-idle-tick-ms", "25")),
    ("group, direct, tick 50 ms", "group, direct", ("--group-idle-tick-ms", "50")),
    ("group, rank links, spinning", "group, rank links", ("--group-idle-tick-ms", "0")),
    (f"group, rank links, tick {TICK} ms", "group, rank links", ("--group-idle-tick-ms", TICK)),
]


def measure(setup: Setup, seed: int, out: dict[str, list[float]]) -> None:
    client = Client(setup)
    try:
        client.complete(prompt_ids(seed, 64), 8)  # warm-up
        before = setup.snapshot()
        time.sleep(IDLE_S)
        after = setup.snapshot()
        out["idle_cores"].append((after[1] + after[2] - before[1] - before[2]) / IDLE_S)
        for rep in range(REPS):
            ids = prompt_ids(seed + 10 + rep, PROMPT_TOKENS)
            time.sleep(PAUSE_S)
            out["after_pause_s"].append(client.ttft_s(ids))
            out["back_to_back_s"].append(client.ttft_s(ids))
    finally:
        client.close()


def main() -> int:
    parser = harness.parser(__doc__ or "")
    parser.add_argument("--rounds", type=int, default=3, help="starts of each set-up")
    args = parser.parse_args()
    from node_agent.engine.demo_model import write_demo_model

    plan = PLANS["demo6"]
    started = harness.now_utc()
    keys = ("idle_cores", "after_pause_s", "back_to_back_s")
    results: dict[str, dict[str, list[float]]] = {s[0]: {k: [] for k in keys} for s in SETUPS}
    with tempfile.TemporaryDirectory(prefix="mlxfleet-idle-") as tmp:
        work = Path(tmp)
        (work / "logs").mkdir()
        model = write_demo_model(work / "models" / "demo6", plan.layers)
        certs = make_certs(work / "certs")
        for rnd in range(args.rounds):
            for k in range(len(SETUPS)):
                label, setup, flags = SETUPS[(rnd + k) % len(SETUPS)]
                tag = f"idle-{rnd}-{(rnd + k) % len(SETUPS)}"
                with running(setup, plan, model, work, certs, tag, flags) as s:
                    measure(s, 1000 * rnd, results[label])
                print(f"round {rnd + 1} {label}: done", flush=True)
    harness.publish(SECTION, report(results, args.rounds, started), args.write_docs)
    return 0


def report(results: dict[str, Any], rounds: int, started: str) -> str:
    rows = []
    for label, _, _ in SETUPS:
        r = results[label]
        waited = statistics.median(r["after_pause_s"]) - statistics.median(r["back_to_back_s"])
        rows.append(
            f"| {label} | {_spread(r['idle_cores'], 1, 2)} | {_spread(r['after_pause_s'], 1000)} "
            f"| {_spread(r['back_to_back_s'], 1000)} | {waited * 1000:+.0f} |"
        )

    def cores(label: str) -> float:
        return statistics.median(results[label]["idle_cores"])

    def waited_ms(label: str) -> float:
        r = results[label]
        return 1000 * (
            statistics.median(r["after_pause_s"]) - statistics.median(r["back_to_back_s"])
        )

    direct, links = f"group, direct, tick {TICK} ms", f"group, rank links, tick {TICK} ms"
    reading = (
        f"Reading: sleeping between beats (the default tick, {TICK} ms) takes an idle 2-rank "
        f"group from {cores('group, direct, spinning'):.2f} cores to {cores(direct):.2f} with "
        f"the ranks direct and from {cores('group, rank links, spinning'):.2f} to "
        f"{cores(links):.2f} through the rank links (the relays carry every beat). The first "
        f"request after a pause waits for the ranks to wake: {waited_ms(direct):+.0f} ms direct "
        f"and {waited_ms(links):+.0f} ms through the links over one back to back, against "
        f"{waited_ms('group, direct, spinning'):+.0f} ms spinning (noisy: per-request ranges "
        "overlap); in theory a tick at most and half of one on average, plus the relays' hops "
        "through the links. A Mac's idle cores matter more than this box's: a spinning "
        "group kept a laptop's core at 100 % for as long as the model was loaded."
    )
    return f"""{SECTION}

Measured {started} with `{harness.command_line()}`.

- Machine: {harness.machine()}
- Versions: {harness.versions("mlx", "mlx-lm", "uvloop")}

Method: benchmarks/group_idle.py's docstring; {rounds} starts of each set-up, medians (min–max).

| set-up | cores busy idle | first token after {PAUSE_S:g} s idle (ms) \
| first token back to back (ms) | waited for idleness (ms) |
|---|---:|---:|---:|---:|
{chr(10).join(rows)}

{reading}
"""


if __name__ == "__main__":
    harness.run_script(main)
