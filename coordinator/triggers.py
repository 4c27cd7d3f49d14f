"""Offload triggers: turns node readings into fired/cleared events with actions. Pure logic.

No I/O and no clock: every reading carries its own time (monotonic seconds from the caller).
Thresholds are DESIGN.md's "Numbers the product is built around" (seed 001 §4, seed 002 §6);
each trigger clears below a lower threshold than it fires at, so a reading hovering at the
line does not make it flap.

The tail trigger compares TTFTs only among prompts of like prefill work: prefill time grows
with the tokens to prefill, so a natural mix of short and long prompts has a wide spread with
no interference at all. Samples go into half-octave bands of prefill tokens (a band's lengths
differ by less than √2), each band with its own window; even a prefill time growing with the
square of the length (attention at long contexts) spreads a band by less than 2x, the clear
ratio, so a band's p95/p50 past 2.8 is not the prompt lengths' doing (docs/operations.md).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

Action = Literal[
    "halt_ramp",
    "move_batch",
    "drain",
    "lower_concurrency",
    "relocate_heaviest",
    "offload_preferred",
]
TriggerName = Literal["swap", "memory", "pressure", "thermal", "power", "oom", "tail"]

MIB = 2**20
GIB = 2**30
DAY_S = 86400.0

SWAP_ACTIONS: frozenset[Action] = frozenset({"halt_ramp", "move_batch"})
MEMORY_ACTIONS: frozenset[Action] = frozenset({"lower_concurrency", "relocate_heaviest"})
POWER_ACTIONS: frozenset[Action] = frozenset({"move_batch"})
TAIL_ACTIONS: frozenset[Action] = frozenset({"move_batch"})
OOM_ACTIONS: frozenset[Action] = frozenset({"offload_preferred"})
# Level → actions; a level missing from the table clears the trigger, "unknown" is skipped.
PRESSURE_ACTIONS: dict[str, frozenset[Action]] = {
    "warning": frozenset({"move_batch"}),
    "critical": frozenset({"drain"}),
}
PRESSURE_CLEAR = frozenset({"normal"})
THERMAL_ACTIONS: dict[str, frozenset[Action]] = {
    "serious": frozenset({"move_batch"}),
    "critical": frozenset({"drain"}),
}
THERMAL_CLEAR = frozenset({"nominal", "fair"})
NO_ACTIONS: frozenset[Action] = frozenset()


@dataclass(frozen=True, slots=True)
class Reading:
    """One node's heartbeat reading."""

    node_id: str
    at_s: float  # monotonic seconds (the caller's clock)
    ram_bytes: int
    available_bytes: int
    swap_used_bytes: int
    memory_pressure: str  # normal|warning|critical|unknown
    thermal_state: str  # nominal|fair|serious|critical|unknown
    power_source: str  # ac|battery|unknown
    low_power_mode: bool
    role: str  # laptop|server


@dataclass(frozen=True, slots=True)
class TriggerConfig:
    """Trigger thresholds; defaults are the seeds' numbers (DESIGN.md)."""

    swap_fire_bytes: int = 768 * MIB  # seed 001 §4: > 768 MB of swap for 90 s halts the ramp
    swap_clear_bytes: int = 512 * MIB
    swap_for_s: float = 90.0
    memory_fire_fraction: float = 0.82  # seed 001 §4: used > 82 % of RAM for 10 min
    memory_clear_fraction: float = 0.75
    memory_for_s: float = 600.0
    tail_ratio_fire: float = 2.8  # seed 001 §4: interactive TTFT p95/p50 > 2.8
    tail_ratio_clear: float = 2.0
    tail_window_s: float = 300.0
    tail_min_samples: int = 20
    oom_kills_for_offload: int = 2  # seed 001 §4: two OOM kills in a week
    oom_window_s: float = 7 * DAY_S


DEFAULT_CONFIG = TriggerConfig()


@dataclass(frozen=True, slots=True)
class Change:
    """A trigger fired (or changed level) or cleared on a node."""

    node_id: str
    trigger: TriggerName
    fired: bool  # True = fired, False = cleared
    level: str  # "warning"/"critical" for pressure, "serious"/"critical" for thermal, else ""
    actions: frozenset[Action]  # in force for this trigger after the change; empty when cleared
    reading: str  # one line naming the reading that caused it


@dataclass(slots=True)
class _Band:
    """One prompt-length band's TTFT samples in the tail window."""

    samples: deque[tuple[float, float]] = field(default_factory=deque)  # (at_s, ttft_s)
    percentiles: tuple[float, float] | None = None  # (p50, p95); None: changed since

    def add(self, at_s: float, ttft_s: float) -> None:
        self.samples.append((at_s, ttft_s))
        self.percentiles = None

    def drop_before(self, start_s: float) -> None:
        """Forget the samples taken at or before `start_s`."""
        while self.samples and self.samples[0][0] <= start_s:
            self.samples.popleft()
            self.percentiles = None

    def p50_p95(self) -> tuple[float, float]:
        if self.percentiles is None:
            values = sorted(sample for _, sample in self.samples)
            self.percentiles = nearest_rank(values, 50), nearest_rank(values, 95)
        return self.percentiles


@dataclass(slots=True)
class _Node:
    """Mutable per-node state behind Triggers."""

    active: dict[TriggerName, Change] = field(default_factory=dict)
    # swap and memory: the first reading of the current run above the fire line
    above_since_s: dict[TriggerName, float] = field(default_factory=dict)
    ttft: dict[int, _Band] = field(default_factory=dict)  # by tail_band(prefill tokens)
    kills: deque[float] = field(default_factory=deque)  # at_s of each OOM kill


def nearest_rank(sorted_values: list[float], percent: float) -> float:
    """The nearest-rank percentile of an ascending, non-empty list."""
    rank = max(1, math.ceil(percent / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def tail_band(prefill_tokens: int) -> int:
    """The half-octave band of a prompt that needs `prefill_tokens` (>= 1) of prefill: the k
    with 2**(k/2) <= tokens < 2**((k+1)/2), i.e. k = floor(log2(tokens**2)), in exact integers."""
    return (prefill_tokens * prefill_tokens).bit_length() - 1


def tail_band_tokens(band: int) -> tuple[int, int]:
    """The first and last token count of a band (1024-1448, 1449-2047, 2048-2896, ...)."""
    return math.isqrt(2**band - 1) + 1, math.isqrt(2 ** (band + 1) - 1)


class Triggers:
    """Evaluates every node's triggers; each fire, level change and clear is reported once.

    Not thread-safe: call it from one thread (the coordinator's event loop).
    """

    def __init__(self, config: TriggerConfig = DEFAULT_CONFIG) -> None:
        self.config = config
        self._nodes: dict[str, _Node] = {}

    def observe(self, reading: Reading) -> list[Change]:
        """Evaluate the swap, memory, pressure, thermal, power and oom triggers on a reading."""
        node = self._node(reading.node_id)
        found = [
            self._swap(node, reading),
            self._memory(node, reading),
            self._level(node, reading, "pressure", reading.memory_pressure),
            self._level(node, reading, "thermal", reading.thermal_state),
            self._power(node, reading),
            self._oom(node, reading.node_id, reading.at_s),
        ]
        return [change for change in found if change is not None]

    def observe_ttft(
        self, node_id: str, at_s: float, ttft_s: float, prefill_tokens: int
    ) -> list[Change]:
        """Add an interactive time-to-first-token sample, of a prompt that needed
        `prefill_tokens` of prefill, and evaluate the tail trigger: it fires when a band with
        tail_min_samples has p95/p50 above the fire ratio, and clears when every such band is
        at or below the clear ratio. A sample of unknown length (< 1) is dropped: there is
        nothing like it to compare it with, and a guess would mix lengths again."""
        if prefill_tokens < 1:
            return []
        cfg = self.config
        node = self._node(node_id)
        node.ttft.setdefault(tail_band(prefill_tokens), _Band()).add(at_s, ttft_s)
        judged: list[tuple[float, int, float, float]] = []  # (ratio, band, p50, p95)
        for band, kept in list(node.ttft.items()):
            kept.drop_before(at_s - cfg.tail_window_s)
            if not kept.samples:
                del node.ttft[band]
            elif len(kept.samples) >= cfg.tail_min_samples:
                p50, p95 = kept.p50_p95()
                if p50 > 0:  # a ratio over a zero median means nothing
                    judged.append((p95 / p50, band, p50, p95))
        if not judged:
            return []  # too little evidence either way: keep the current state
        ratio, band, p50, p95 = max(judged)
        first, last = tail_band_tokens(band)
        text = (
            f"interactive TTFT p95/p50 {ratio:.2f} (p95 {p95:.3f} s, p50 {p50:.3f} s) "
            f"over {len(node.ttft[band].samples)} samples in {cfg.tail_window_s:.0f} s "
            f"of prompts with {first}-{last} tokens to prefill"
        )
        if len(judged) > 1:
            text += f" (the highest of {len(judged)} bands)"
        change: Change | None = None
        if ratio > cfg.tail_ratio_fire:
            change = _fire(
                node, node_id, "tail", "", TAIL_ACTIONS, f"{text} > {cfg.tail_ratio_fire:g}"
            )
        elif ratio <= cfg.tail_ratio_clear:
            change = _clear(node, node_id, "tail", f"{text} <= {cfg.tail_ratio_clear:g}")
        return [change] if change else []

    def observe_oom_kill(self, node_id: str, at_s: float) -> list[Change]:
        """Record a kernel OOM kill of an engine and evaluate the offload rule."""
        node = self._node(node_id)
        node.kills.append(at_s)
        change = self._oom(node, node_id, at_s)
        return [change] if change else []

    def actions(self, node_id: str) -> frozenset[Action]:
        """The union of the actions of every active trigger on the node."""
        node = self._nodes.get(node_id)
        if node is None:
            return NO_ACTIONS
        return frozenset().union(*(change.actions for change in node.active.values()))

    def active(self, node_id: str) -> dict[TriggerName, Change]:
        """The node's fired, not yet cleared triggers, each with the Change that fired it."""
        node = self._nodes.get(node_id)
        return dict(node.active) if node else {}

    def forget(self, node_id: str) -> None:
        """Drop everything known about a removed node."""
        self._nodes.pop(node_id, None)

    def _node(self, node_id: str) -> _Node:
        return self._nodes.setdefault(node_id, _Node())

    def _swap(self, node: _Node, r: Reading) -> Change | None:
        cfg = self.config
        used = r.swap_used_bytes
        if used < 0:
            return None  # unknown
        if used < cfg.swap_clear_bytes:
            node.above_since_s.pop("swap", None)
            return _clear(
                node, r.node_id, "swap", f"swap used {_mib(used)} < {_mib(cfg.swap_clear_bytes)}"
            )
        held_s = _held_s(node, "swap", r.at_s, above=used > cfg.swap_fire_bytes)
        if held_s is None or held_s < cfg.swap_for_s:
            return None
        text = f"swap used {_mib(used)} > {_mib(cfg.swap_fire_bytes)} for {held_s:.0f} s"
        return _fire(node, r.node_id, "swap", "", SWAP_ACTIONS, text)

    def _memory(self, node: _Node, r: Reading) -> Change | None:
        cfg = self.config
        if r.ram_bytes <= 0:
            return None  # unknown
        fraction = (r.ram_bytes - r.available_bytes) / r.ram_bytes
        used = f"memory used {fraction:.1%} of {r.ram_bytes / GIB:.1f} GiB"
        if fraction < cfg.memory_clear_fraction:
            node.above_since_s.pop("memory", None)
            return _clear(node, r.node_id, "memory", f"{used} < {cfg.memory_clear_fraction:.0%}")
        held_s = _held_s(node, "memory", r.at_s, above=fraction > cfg.memory_fire_fraction)
        if held_s is None or held_s < cfg.memory_for_s:
            return None
        text = f"{used} > {cfg.memory_fire_fraction:.0%} for {held_s:.0f} s"
        return _fire(node, r.node_id, "memory", "", MEMORY_ACTIONS, text)

    def _level(
        self, node: _Node, r: Reading, trigger: Literal["pressure", "thermal"], level: str
    ) -> Change | None:
        table, clear = (
            (PRESSURE_ACTIONS, PRESSURE_CLEAR)
            if trigger == "pressure"
            else (THERMAL_ACTIONS, THERMAL_CLEAR)
        )
        what = "memory pressure" if trigger == "pressure" else "thermal state"
        if level in table:
            return _fire(node, r.node_id, trigger, level, table[level], f"{what} {level}")
        if level in clear:
            return _clear(node, r.node_id, trigger, f"{what} {level}")
        return None  # unknown (or a state we do not know): no evidence either way

    def _power(self, node: _Node, r: Reading) -> Change | None:
        on_battery = r.power_source == "battery"
        if on_battery or r.low_power_mode:
            parts = (["on battery"] if on_battery else []) + (
                ["low power mode"] if r.low_power_mode else []
            )
            return _fire(node, r.node_id, "power", "", POWER_ACTIONS, ", ".join(parts))
        if r.power_source == "ac":
            return _clear(node, r.node_id, "power", "on ac power, low power mode off")
        return None  # unknown source, low power off: cannot tell

    def _oom(self, node: _Node, node_id: str, now_s: float) -> Change | None:
        cfg = self.config
        while node.kills and node.kills[0] <= now_s - cfg.oom_window_s:
            node.kills.popleft()
        count = len(node.kills)
        text = f"OOM kills in {cfg.oom_window_s / DAY_S:g} d: {count}"
        if count >= cfg.oom_kills_for_offload:
            return _fire(
                node, node_id, "oom", "", OOM_ACTIONS, f"{text} >= {cfg.oom_kills_for_offload}"
            )
        return _clear(node, node_id, "oom", f"{text} < {cfg.oom_kills_for_offload}")


def _fire(
    node: _Node,
    node_id: str,
    trigger: TriggerName,
    level: str,
    actions: frozenset[Action],
    text: str,
) -> Change | None:
    """Record a fire or a level change; None when already fired at this level."""
    current = node.active.get(trigger)
    if current is not None and current.level == level:
        return None
    change = Change(node_id, trigger, True, level, actions, text)
    node.active[trigger] = change
    return change


def _held_s(node: _Node, trigger: TriggerName, at_s: float, *, above: bool) -> float | None:
    """How long the current run above the trigger's fire line has lasted; None for a reading
    at or below the line, which restarts the count."""
    if not above:
        node.above_since_s.pop(trigger, None)
        return None
    return at_s - node.above_since_s.setdefault(trigger, at_s)


def _clear(node: _Node, node_id: str, trigger: TriggerName, text: str) -> Change | None:
    """Record a clear; None when the trigger was not active."""
    if node.active.pop(trigger, None) is None:
        return None
    return Change(node_id, trigger, False, "", NO_ACTIONS, text)


def _mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB"
