"""Placement on simulated fleets: the policy's placed replicas against the exact optimum, and
the time `plan()` takes for a large fleet. Pure Python; no process, no network, no MLX.
`plan()` is the planner the reconciler calls for every step's new replicas.

    python -m benchmarks.fleet_sim [--write-docs]
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass

from benchmarks.harness import command_line, machine, now_utc, parser, publish, run_script
from benchmarks.simulator import (
    LAPTOP_OPT_IN_P,
    MACS,
    MODELS,
    SearchLimit,
    exact_assignment,
    placed_groups,
    placed_replicas,
    random_demands,
    random_fleet,
)
from coordinator.policy import plan

SECTION = "## Placement: fleet simulator (issue 4)"
DEMAND_SEED_OFFSET = 1_000_000  # instance i: fleet seed i, demand seed offset + i
TARGET_DECISION_MS = 100.0  # issue 4: plan() for 100 nodes × 50 models
# Groups make the exact search much larger (any node set, any layer split): an instance it
# cannot finish in this many steps (about 10 s) is counted as unsolved and left out.
EXACT_STEPS = 1_000_000


@dataclass(frozen=True, slots=True)
class Quality:
    nodes: int
    models: int
    instances: int
    unsolved: int  # the exact search passed EXACT_STEPS: left out of every other column
    mean_ratio: float
    worst_ratio: float
    optimal: int
    contended: int  # instances where even the optimum leaves replicas unplaced
    policy_fraction: float
    exact_fraction: float
    policy_models: int  # models with at least one replica
    exact_models: int
    policy_groups: int  # replicas placed as pipeline groups
    exact_groups: int
    trades: int  # non-optimal instances whose optimum leaves unserved a model the policy served
    solver_max_ms: float


def quality(nodes: int, models: int, instances: int) -> Quality:
    """Policy vs exact optimum over `instances` random instances of one size."""
    ratios: list[float] = []
    optimal = contended = requested = policy_total = exact_total = unsolved = 0
    policy_models = exact_models = policy_groups = exact_groups = trades = 0
    solver_max = 0.0
    for i in range(instances):
        offers = random_fleet(nodes, i)
        demands = random_demands(models, DEMAND_SEED_OFFSET + i)
        result = plan(demands, offers)
        got = placed_replicas(result)
        t0 = time.perf_counter()
        try:
            assignment = exact_assignment(demands, offers, EXACT_STEPS)
        except SearchLimit:
            unsolved += 1
            continue
        finally:
            solver_max = max(solver_max, time.perf_counter() - t0)
        best = placed_replicas(assignment)
        want = sum(d.replicas for d in demands)
        ratios.append(got / best if best else 1.0)
        optimal += got == best
        served = {model for (model, _tier), p in result.items() if p.placed}
        trades += got < best and any(m in served and not p.placed for m, p in assignment.items())
        contended += best < want
        requested += want
        policy_total += got
        exact_total += best
        policy_models += sum(bool(p.placed) for p in result.values())
        exact_models += sum(bool(p.placed) for p in assignment.values())
        policy_groups += placed_groups(result)
        exact_groups += placed_groups(assignment)
    return Quality(
        nodes,
        models,
        instances,
        unsolved,
        statistics.fmean(ratios) if ratios else 1.0,
        min(ratios, default=1.0),
        optimal,
        contended,
        policy_total / requested if requested else 1.0,
        exact_total / requested if requested else 1.0,
        policy_models,
        exact_models,
        policy_groups,
        exact_groups,
        trades,
        solver_max * 1000,
    )


def decision_times(nodes: int, models: int, runs: int) -> tuple[list[float], float]:
    """Seconds per plan() call, one call per instance (seeds 0..runs-1), after one warm-up;
    and the mean placed fraction."""
    times, fractions = [], []
    plan(random_demands(models, DEMAND_SEED_OFFSET), random_fleet(nodes, 0))  # warm-up
    for i in range(runs):
        offers = random_fleet(nodes, i)
        demands = random_demands(models, DEMAND_SEED_OFFSET + i)
        t0 = time.perf_counter()
        result = plan(demands, offers)
        times.append(time.perf_counter() - t0)
        fractions.append(placed_replicas(result) / sum(d.replicas for d in demands))
    return times, statistics.fmean(fractions)


def _size(text: str) -> tuple[int, int]:
    nodes, models = text.lower().split("x")
    return int(nodes), int(models)


def main() -> int:
    p = parser(__doc__ or "")
    p.add_argument("--instances", type=int, default=200, help="random instances per size")
    p.add_argument(
        "--sizes", default="5x5,6x6", help="nodes x models of the exact comparison, comma-separated"
    )
    p.add_argument("--runs", type=int, default=20, help="timed plan() calls, large fleet")
    p.add_argument("--nodes", type=int, default=100, help="large fleet: nodes")
    p.add_argument("--models", type=int, default=50, help="large fleet: models")
    args = p.parse_args()
    command, when = command_line(), now_utc()

    rows = [quality(n, m, args.instances) for n, m in map(_size, args.sizes.split(","))]
    times, large_fraction = decision_times(args.nodes, args.models, args.runs)
    median_ms, max_ms = statistics.median(times) * 1000, max(times) * 1000
    met = "met" if max_ms <= TARGET_DECISION_MS else "missed"

    table = "\n".join(
        [
            "| nodes × models | instances (unsolved) | mean policy/optimum | worst "
            "| policy optimal | contended | placed: policy / optimum "
            "| models served: policy / count-optimum | groups: policy / optimum "
            "| non-optimal by trading a model | solver max (ms) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *(
                f"| {q.nodes} × {q.models} | {q.instances} ({q.unsolved}) | {q.mean_ratio:.3f} "
                f"| {q.worst_ratio:.3f} | {q.optimal} "
                f"({q.optimal / max(1, q.instances - q.unsolved):.0%}) "
                f"| {q.contended} | {q.policy_fraction:.1%} / {q.exact_fraction:.1%} "
                f"| {q.policy_models} / {q.exact_models} | {q.policy_groups} / {q.exact_groups} "
                f"| {q.trades} | {q.solver_max_ms:.1f} |"
                for q in rows
            ),
        ]
    )
    section = f"""{SECTION}

Measured {when} with `{command}`.

- Machine: {machine()}
- Versions: Python {platform.python_version()} (pure Python: `coordinator/policy.py`,
  `benchmarks/simulator.py`)

What is measured is the planner that runs: `coordinator/policy.py`'s `plan()` is the one call
the reconciler (`coordinator/reconcile.py`) makes each step to place every unit's missing
replicas, pinned first, then larger first, each in the room the previous ones left (replicas
already running count through `Demand.hosted_on`; they are none here, as in a fresh fleet).

Method: `benchmarks/simulator.py` draws fleets from {len(MACS)} Mac product lines (seed 002 §10:
MacBook Air M2–M4, MacBook Pro M2 Pro–M4 Max, Mac mini M4/M4 Pro, Mac Studio M2 Max–M3 Ultra, each
with the RAM tiers Apple sold from 16 GiB up; MacBooks are laptops, minis and Studios servers;
{LAPTOP_OPT_IN_P:.0%} of laptops opt in to interactive). A node's free bytes are `node_budget(RAM,
default wired limit, 0)`: min(RAM − 8 GiB, 2/3 of RAM up to 36 GiB and 3/4 above). Demands draw from
{len(MODELS)} real model shapes (Qwen2.5 0.5B–32B, Llama-3 8B/70B, Llama-3.1-405B, Mixtral-8x7B) at
4 or 8 bits, a tier (interactive: 4 sequences, batch: 12), 1–3 replicas and a context of 4K–32K
tokens (capped at the model's maximum); a replica's size is weights + 16-bit KV cache + engine
overhead from `coordinator/memory.py`, and its layers and the bytes every member of a pipeline group
holds from `memory.pipeline_shape` (a replica no single node holds runs as a group:
`coordinator/groups.py`; Llama-3.1-405B at 8 bits fits no Mac). Instance i uses fleet seed i and
demand seed {DEMAND_SEED_OFFSET:,} + i. The optimum is `exact_assignment`: branch and bound over
every model's replicas under the policy's own constraints (`policy.eligible`, free bytes, one
replica or group member of a model per node), each replica on one node or as a group of any 2 or
more eligible nodes with any split of its layers that fits, maximising placed replicas (a group
counts as one); it is cross-checked against brute force in `tests/benchmarks/test_simulator.py`. An
instance the search cannot finish in {EXACT_STEPS:,} steps is *unsolved* and left out of the other
columns. Ratio = policy's placed replicas / optimum (1 when the optimum is 0). *Contended*:
instances where even the optimum leaves replicas unplaced. *Groups*: replicas placed as pipeline
groups.

{table}

Where the optimum beats the policy there are two causes. *Trading a model* (column): the
optimum maximises the replica **count**, so it leaves unserved a large model that `plan()`
places first by design, and places several smaller replicas in its room. The rest is packing,
e.g. best fit fills the node that a later model's extra replicas needed (replicas of a model
must sit on distinct nodes); interactive spread can also take the server room a batch model
needed (both shown on hand-made instances in `tests/benchmarks/test_simulator.py`).
"Models served" counts models with at least one replica, for the policy and for the
count-optimal assignment (which does not maximise that number).

Decision time: `plan()` on {args.nodes} nodes × {args.models} models, one call per instance for
{args.runs} instances (seeds as above) after one warm-up call, `time.perf_counter` around the call:
median **{median_ms:.2f} ms**, max **{max_ms:.2f} ms** (target ≤ {TARGET_DECISION_MS:.0f} ms:
{met}); the policy placed {large_fraction:.1%} of requested replicas on average. The 2-core machine
was shared with other engineers' builds and tests, so times vary between runs (five runs on
2026-12-02, after the reconciler moved onto `plan()`, gave medians 2.5–7.2 ms and maxima
9.1–23.0 ms; three on 2026-11-22, 2.8–7.1 ms and 5.2–15.7 ms), all far under the target.
"""
    publish(SECTION, section, args.write_docs)
    return 0


if __name__ == "__main__":
    run_script(main)
