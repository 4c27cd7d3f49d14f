"""What `mlxfleet bench` measures and writes: the JSON report's shape, as dataclasses.

One `Report` holds one `Run` per sweep value (one run without --sweep). A run holds every
request it made (`Sample`), the summary of each (concurrency, prompt length) cell (`Cell`),
the numeric trio and machine snapshot (`Snapshot`, `Resources`) and the SLA gates (`Gate`).
`to_json`/`from_json` are the only (de)serializers: `bench compare` reads what `bench` wrote.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

SCHEMA = "mlxfleet-bench/1"
Workload = Literal["interactive", "batch"]


@dataclass(frozen=True, slots=True)
class Quantiles:
    """p50/p95/p99 of some samples (nearest-rank), and how many there were."""

    p50: float
    p95: float
    p99: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Quantiles | None:
        """None for no values."""
        if not values:
            return None
        ordered = sorted(values)

        def rank(q: float) -> float:
            return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

        return cls(rank(0.50), rank(0.95), rank(0.99), len(ordered))


@dataclass(frozen=True, slots=True)
class Sample:
    """One request as the client saw it. Times are seconds from sending it."""

    concurrency: int
    prompt_tokens_wanted: int
    started_s: float  # since the run began
    first_byte_s: float | None  # the first SSE byte arrived
    ttft_s: float | None  # the first content token arrived
    total_s: float  # the response ended (or failed)
    prompt_tokens: int  # as the endpoint's usage says (0 if it gave none)
    completion_tokens: int  # as the endpoint's usage says (0 if it gave none)
    content_chunks: int  # chunks that carried text, counted by the client
    finish_reason: str | None
    error: str | None = None  # one line; None for a success
    # Generated tokens the client counted itself (mlxfleet's token ids on the chunks); None
    # when the endpoint does not send them. Checks `completion_tokens` against the stream.
    tokens_counted: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def decode_tokens_per_s(self) -> float | None:
        """This slot's decode speed: tokens after the first over the time after the first."""
        if self.ttft_s is None or self.completion_tokens < 2 or self.total_s <= self.ttft_s:
            return None
        return (self.completion_tokens - 1) / (self.total_s - self.ttft_s)

    @property
    def prefill_tokens_per_s(self) -> float | None:
        """Prompt tokens over the time to the first token (prefill plus queueing)."""
        if self.ttft_s is None or self.ttft_s <= 0 or self.prompt_tokens == 0:
            return None
        return self.prompt_tokens / self.ttft_s


@dataclass(frozen=True, slots=True)
class Cell:
    """The summary of one (concurrency, prompt length) point of the sweep."""

    concurrency: int
    prompt_tokens: int  # the exact prompt length every request of the cell had
    max_tokens: int
    duration_s: float  # wall time of the cell
    requests: int
    failed: int
    ttft_s: Quantiles | None
    first_byte_s: Quantiles | None
    tail_ratio: float | None  # TTFT p95 / p50, the tail trigger's measure
    prefill_tokens_per_s: Quantiles | None
    decode_tokens_per_s: Quantiles | None  # per slot
    aggregate_tokens_per_s: float  # completion tokens of the cell / its wall time
    completion_tokens: int
    ran_to_max_tokens: int  # requests whose completion reached max_tokens
    # Requests whose prompt (the endpoint's usage) was not exactly prompt_tokens long: the
    # length could not be hit with this endpoint's tokenizer.
    prompt_tokens_missed: int = 0


@dataclass(frozen=True, slots=True)
class ProcessMemory:
    """One of the top memory consumers running alongside the benchmark (this machine)."""

    pid: int
    name: str
    rss_bytes: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Where and with what the numbers were taken."""

    taken_at: float  # unix time
    client_host: str
    client_os: str
    client_chip: str
    client_ram_bytes: int
    fleet: bool  # the endpoint is an mlxfleet gateway (its /ui/status answered)
    # The server side: from the fleet's agents when it is ours, else this machine.
    chips: list[str]
    oses: list[str]
    mlx_versions: list[str]
    mlx_lm_versions: list[str]
    ram_bytes: int  # physical RAM the RSS percentage is taken of
    batch_window_ms: int | None  # the numeric trio: batch window and slots in force
    max_batch_size: int | None
    max_concurrency: int | None  # concurrent slots per engine
    knobs: dict[str, Any]  # everything the fleet says about the tier's knobs
    top_processes: list[ProcessMemory]  # this machine, by RSS, at the start


@dataclass(frozen=True, slots=True)
class Resources:
    """Memory during the run: engine RSS peak (the trio's third number) and swap."""

    source: str  # "fleet" (agents' metrics) or "local" (this machine)
    samples: int
    rss_peak_bytes: int
    rss_peak_percent: float  # of `Snapshot.ram_bytes`
    swap_peak_bytes: int
    swap_over_limit_s: float  # the longest stretch with swap above the gate's limit
    series: list[tuple[float, int, int]] = field(default_factory=list)  # (t, rss, swap)


@dataclass(frozen=True, slots=True)
class Gate:
    """One SLA gate: tripped when value > limit (swap: when its stretch reaches limit s)."""

    name: Literal["tail_ratio", "swap", "rss"]
    limit: float
    value: float | None  # None: not measured (then it cannot trip)
    tripped: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Run:
    """One workload run (one sweep value)."""

    workload: Workload
    sweep: dict[str, int]  # the knob values set for this run ({} without --sweep)
    started_at: float
    duration_s: float
    interrupted: bool  # Ctrl-C: what was measured until then
    cells: list[Cell]
    samples: list[Sample]
    snapshot: Snapshot
    resources: Resources | None
    gates: list[Gate]


@dataclass(frozen=True, slots=True)
class Report:
    """Everything one `mlxfleet bench` wrote."""

    schema: str
    endpoint: str
    model: str
    workload: Workload
    argv: list[str]  # the command line, for the report
    runs: list[Run]

    @property
    def tripped(self) -> list[Gate]:
        return [g for run in self.runs for g in run.gates if g.tripped]


def to_json(report: Report) -> str:
    return json.dumps(dataclasses.asdict(report), indent=1, sort_keys=True)


def from_json(text: str) -> Report:
    """A report `to_json` wrote; ValueError naming what is wrong otherwise."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"not an mlxfleet bench report (schema {SCHEMA!r} expected)")
    try:
        return Report(
            schema=data["schema"],
            endpoint=data["endpoint"],
            model=data["model"],
            workload=data["workload"],
            argv=list(data["argv"]),
            runs=[_run(r) for r in data["runs"]],
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed bench report: {exc!r}") from None


def _quantiles(data: dict[str, Any] | None) -> Quantiles | None:
    return Quantiles(**data) if data is not None else None


def _run(data: dict[str, Any]) -> Run:
    cells = [
        Cell(
            **{
                **c,
                **{
                    k: _quantiles(c[k])
                    for k in (
                        "ttft_s",
                        "first_byte_s",
                        "prefill_tokens_per_s",
                        "decode_tokens_per_s",
                    )
                },
            }
        )
        for c in data["cells"]
    ]
    snap = dict(data["snapshot"])
    snap["top_processes"] = [ProcessMemory(**p) for p in snap["top_processes"]]
    resources = data["resources"]
    if resources is not None:
        resources = Resources(**{**resources, "series": [tuple(s) for s in resources["series"]]})
    return Run(
        workload=data["workload"],
        sweep=dict(data["sweep"]),
        started_at=data["started_at"],
        duration_s=data["duration_s"],
        interrupted=data["interrupted"],
        cells=cells,
        samples=[Sample(**s) for s in data["samples"]],
        snapshot=Snapshot(**snap),
        resources=resources,
        gates=[Gate(**g) for g in data["gates"]],
    )
