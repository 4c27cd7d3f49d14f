"""The bench runner against a fake endpoint: cells in ramp order with exactly `c` requests in
flight, numbers that add up, Ctrl-C keeping what was measured, and a failing endpoint stopping
the run instead of spinning."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from coordinator.bench import runner
from coordinator.bench.client import Endpoint
from coordinator.bench.gates import GateLimits
from coordinator.bench.results import Sample
from coordinator.bench.runner import Bench, BenchConfig, root_of, summarize
from tests.coordinator.fake_endpoint import Behaviour, serving


class Progress:
    """Records what the runner reports; `on_cell` runs at each cell's start."""

    def __init__(self, on_cell: Callable[[], None] | None = None) -> None:
        self.cells: list[str] = []
        self.requests = 0
        self.on_cell = on_cell

    def start_cell(self, label: str) -> None:
        self.cells.append(label)
        if self.on_cell is not None:
            self.on_cell()

    def request_done(self, ok: bool) -> None:
        self.requests += 1


def config(base: str, **changes: object) -> BenchConfig:
    fields: dict = {
        "endpoint": Endpoint(base, "secret", "fake", "interactive"),
        "workload": "interactive",
        "concurrency": (1, 3),
        "prompt_tokens": (32, 64),
        "max_tokens": 4,
        "duration_s": 0.3,
        "limits": GateLimits(),
    }
    return BenchConfig(**(fields | changes))


def sample(
    started: float, ttft: float | None, total: float, tokens: int, **changes: object
) -> Sample:
    fields: dict = {
        "concurrency": 2,
        "prompt_tokens_wanted": 100,
        "started_s": started,
        "first_byte_s": None if ttft is None else ttft / 2,
        "ttft_s": ttft,
        "total_s": total,
        "prompt_tokens": 100,
        "completion_tokens": tokens,
        "content_chunks": tokens,
        "finish_reason": "length",
    }
    return Sample(**(fields | changes))


def test_a_cell_summarizes_its_requests() -> None:
    samples = [
        sample(10.0, 0.1, 1.1, 11),  # decode 10 tokens in 1 s
        sample(10.5, 0.2, 2.2, 21, prompt_tokens=101),  # decode 20 in 2 s; prompt missed
        sample(11.0, 0.4, 1.4, 5, finish_reason="stop"),  # stopped early
        sample(11.5, None, 0.5, 0, error="HTTP 503: busy"),
    ]
    cell = summarize(samples, 2, 100, 11)
    assert (cell.concurrency, cell.prompt_tokens, cell.max_tokens) == (2, 100, 11)
    assert cell.requests == 4 and cell.failed == 1
    assert cell.duration_s == pytest.approx(2.7)  # 10.0 until 10.5 + 2.2
    assert cell.completion_tokens == 37
    assert cell.aggregate_tokens_per_s == pytest.approx(37 / 2.7)
    assert cell.ttft_s is not None and (cell.ttft_s.p50, cell.ttft_s.p95, cell.ttft_s.n) == (
        0.2,
        0.4,
        3,
    )
    assert cell.tail_ratio == pytest.approx(2.0)
    assert cell.first_byte_s is not None and cell.first_byte_s.p50 == pytest.approx(0.1)
    assert cell.decode_tokens_per_s is not None and cell.decode_tokens_per_s.p50 == 10.0
    assert cell.prefill_tokens_per_s is not None and cell.prefill_tokens_per_s.p95 == 1000.0
    assert cell.ran_to_max_tokens == 2 and cell.prompt_tokens_missed == 1


def test_the_root_is_the_endpoint_without_v1() -> None:
    assert root_of("http://127.0.0.1:8400/v1") == "http://127.0.0.1:8400"
    assert root_of("http://h/api/v1/") == "http://h/api"


def in_flight_peak(samples: list[Sample]) -> int:
    events = sorted(
        [(s.started_s, 1) for s in samples] + [(s.started_s + s.total_s, -1) for s in samples]
    )
    peak = now = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


async def test_cells_run_in_ramp_order_with_c_requests_in_flight_and_add_up() -> None:
    behaviour = Behaviour(token_delay_s=0.02)
    progress = Progress()
    async with serving(behaviour) as base:
        outcome = await Bench(config(base), progress).run()
    assert outcome.failure is None and not outcome.interrupted
    [run] = outcome.report.runs
    assert [(c.prompt_tokens, c.concurrency) for c in run.cells] == [
        (32, 1),
        (32, 3),
        (64, 1),
        (64, 3),
    ]
    assert progress.cells == [
        "32 prompt tokens x 1",
        "32 prompt tokens x 3",
        "64 prompt tokens x 1",
        "64 prompt tokens x 3",
    ]
    assert progress.requests == len(run.samples) == sum(c.requests for c in run.cells)
    for cell in run.cells:
        mine = [
            s
            for s in run.samples
            if (s.concurrency, s.prompt_tokens_wanted) == (cell.concurrency, cell.prompt_tokens)
        ]
        assert len(mine) == cell.requests >= cell.concurrency
        assert in_flight_peak(mine) == cell.concurrency
        assert all(s.ok and s.prompt_tokens == cell.prompt_tokens for s in mine)  # exact
        assert cell.completion_tokens == sum(s.completion_tokens for s in mine)
        assert all(s.tokens_counted == s.completion_tokens == 4 for s in mine)
        assert cell.ran_to_max_tokens == cell.requests and cell.prompt_tokens_missed == 0
        assert cell.duration_s >= 0.3
    assert [g.name for g in run.gates] == ["tail_ratio", "swap", "rss"]
    assert not run.snapshot.fleet and run.sweep == {}
    assert min(s.started_s for s in run.samples) >= 0  # seconds since the run began
    assert outcome.report.endpoint == base and outcome.report.model == "fake"


async def test_an_interrupt_keeps_what_was_measured_and_starts_no_new_cell() -> None:
    behaviour = Behaviour(token_delay_s=0.05)
    progress = Progress()
    async with serving(behaviour) as base:
        bench = Bench(config(base, duration_s=60.0, max_tokens=8), progress)
        task = asyncio.create_task(bench.run())
        while progress.requests < 3:
            await asyncio.sleep(0.01)
        assert bench.measuring
        bench.interrupt()
        outcome = await asyncio.wait_for(task, 10)
    assert outcome.interrupted and outcome.failure is None
    [run] = outcome.report.runs
    assert run.interrupted and len(run.cells) == 1 and len(progress.cells) == 1
    assert run.cells[0].requests == len(run.samples) >= 3
    assert all(s.ok for s in run.samples)  # the request cut short is not a sample
    assert run.duration_s < 10


async def test_an_endpoint_that_fails_every_request_stops_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner, "FAILURE_PAUSE_S", 0.0)
    behaviour = Behaviour()

    def break_endpoint() -> None:
        behaviour.status = 503  # after preflight and calibration

    async with serving(behaviour) as base:
        bench = Bench(config(base, duration_s=60.0), Progress(break_endpoint))
        outcome = await asyncio.wait_for(bench.run(), 10)
    assert outcome.failure is not None
    assert outcome.failure.startswith(f"{runner.FAILURES_IN_A_ROW} requests in a row failed")
    assert outcome.failure.endswith("HTTP 503: overloaded")
    [run] = outcome.report.runs
    assert run.interrupted and run.cells[0].failed == run.cells[0].requests
