"""One `mlxfleet bench` invocation: preflight, prompt calibration, then the runs and cells.

A cell is one (prompt length, concurrency) point: `c` closed loops keep exactly `c` streaming
requests in flight for the cell's duration, each finished request replaced at once (in
ascending concurrency: the batch workload's offline ramp). Both workloads measure every number;
the workload picks the tier and what the report leads with. With --sweep the same cells run once
per knob value, the knob restored afterwards. Nothing is written here: the caller writes the
Report, so a failure before the first cell leaves no file behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import aiohttp

from coordinator.bench.client import (
    CONNECT_TIMEOUT_S,
    READ_TIMEOUT_S,
    Endpoint,
    preflight,
    stream_chat,
)
from coordinator.bench.errors import PromptLengthError
from coordinator.bench.gates import GateLimits, evaluate
from coordinator.bench.machine import MachineProbe
from coordinator.bench.prompts import Messages, PromptBook
from coordinator.bench.results import SCHEMA, Cell, Quantiles, Report, Run, Sample, Workload
from coordinator.bench.sampler import ResourceSampler
from coordinator.bench.snapshot import fleet_status, take_snapshot
from coordinator.bench.sweep import TierKnobs
from coordinator.config import default_home

logger = logging.getLogger(__name__)

CONNECTIONS_SPARE = 8  # connections beyond the largest concurrency: snapshots, metrics scrapes
FAILURES_IN_A_ROW = 20  # the endpoint is down or refusing: stop instead of spinning
FAILURE_PAUSE_S = 0.2  # a slot waits this long after a failed request before the next one
KNOB_SETTLE_S = 10.0  # wait for the engines to report a swept knob in force
KNOB_POLL_S = 0.5
TRIO_FIELDS = ("batch_window_ms", "max_batch_size", "max_concurrency")


class Progress(Protocol):
    """Where the runner reports progress (the CLI's progress line)."""

    def start_cell(self, label: str) -> None: ...

    def request_done(self, ok: bool) -> None: ...


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Everything one invocation needs, built once at the CLI edge."""

    endpoint: Endpoint
    workload: Workload
    concurrency: tuple[int, ...]  # ascending
    prompt_tokens: tuple[int, ...]
    max_tokens: int
    duration_s: float  # per cell
    limits: GateLimits
    sweep: tuple[str, tuple[int, ...]] | None = None  # (admin API knob, values)
    home: Path | None = None  # the coordinator's MLXFLEET_HOME, for --sweep's admin token
    server_pid: int | None = None  # the endpoint's process on this machine (not a fleet)
    argv: tuple[str, ...] = ()
    seed: int = 0  # the prompts' word order
    # Send ignore_eos (generate exactly max_tokens): None = when the endpoint is our fleet,
    # whose engines take it (an unknown field may be refused elsewhere, e.g. by OpenAI).
    ignore_eos: bool | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a bench measured; `failure` says why it stopped early (the endpoint failed).
    A run with no finished request is left out."""

    report: Report
    failure: str | None = None

    @property
    def interrupted(self) -> bool:
        return any(run.interrupted for run in self.report.runs)


def summarize(samples: list[Sample], concurrency: int, wanted: int, max_tokens: int) -> Cell:
    """One cell's numbers from its requests (successful ones for the latencies and rates)."""
    ok = [s for s in samples if s.ok]
    start = min(s.started_s for s in samples)
    duration = max(s.started_s + s.total_s for s in samples) - start
    ttft = Quantiles.of([s.ttft_s for s in ok if s.ttft_s is not None])
    completion = sum(s.completion_tokens for s in samples)
    return Cell(
        concurrency=concurrency,
        prompt_tokens=wanted,
        max_tokens=max_tokens,
        duration_s=duration,
        requests=len(samples),
        failed=len(samples) - len(ok),
        ttft_s=ttft,
        first_byte_s=Quantiles.of([s.first_byte_s for s in ok if s.first_byte_s is not None]),
        tail_ratio=ttft.p95 / ttft.p50 if ttft is not None and ttft.p50 > 0 else None,
        prefill_tokens_per_s=Quantiles.of(
            [v for s in ok if (v := s.prefill_tokens_per_s) is not None]
        ),
        decode_tokens_per_s=Quantiles.of(
            [v for s in ok if (v := s.decode_tokens_per_s) is not None]
        ),
        aggregate_tokens_per_s=completion / duration if duration > 0 else 0.0,
        completion_tokens=completion,
        ran_to_max_tokens=sum(s.completion_tokens >= max_tokens for s in ok),
        prompt_tokens_missed=sum(s.prompt_tokens != wanted for s in ok),
    )


def root_of(base_url: str) -> str:
    """The endpoint without its /v1: where an mlxfleet gateway serves /ui and /metrics."""
    return base_url.rstrip("/").removesuffix("/v1")


class Bench:
    """Runs one invocation. Use from the event loop; `interrupt()` (the SIGINT handler) stops
    the running cell: its requests are cancelled, what finished is kept, no new cell starts.
    `probe` reads this machine for the snapshot and the local sampler (the CLI passes the
    node agent's; None: no machine facts, no local memory samples)."""

    def __init__(
        self, config: BenchConfig, progress: Progress, probe: MachineProbe | None = None
    ) -> None:
        self.config = config
        self._progress = progress
        self._machine = probe
        self._root = root_of(config.endpoint.base_url)
        self._stop = asyncio.Event()
        self._slots: list[asyncio.Task[None]] = []
        self._failure: str | None = None
        self._in_a_row = 0
        self.measuring = False  # a cell has started: from now on there is something to write

    def interrupt(self) -> None:
        self._stop.set()
        for task in self._slots:
            task.cancel()

    async def run(self) -> Outcome:
        """Preflight and calibrate (BenchError on a bad endpoint), then measure."""
        config = self.config
        connector = aiohttp.TCPConnector(limit=max(config.concurrency) + CONNECTIONS_SPARE)
        timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await preflight(session, config.endpoint)
            ignore_eos = config.ignore_eos
            if ignore_eos is None:
                ignore_eos = await fleet_status(session, self._root) is not None
            if ignore_eos:
                body = {**config.endpoint.extra_body, "ignore_eos": True}
                config = self.config = replace(
                    config, endpoint=replace(config.endpoint, extra_body=body)
                )
            book = PromptBook(lambda m: self._probe(session, m), config.seed)
            for calibration in await book.calibrate(config.prompt_tokens):
                if not calibration.exact:
                    logger.warning(
                        "prompt length %d cannot be hit exactly with this endpoint's tokenizer: "
                        "using %d tokens",
                        calibration.wanted,
                        calibration.tokens,
                    )
            if config.sweep is None:
                runs = [await self._run(session, book, {})]
            else:
                knob, values = config.sweep
                runs = []
                home = config.home or default_home()
                async with TierKnobs(session, self._root, config.workload, home) as knobs:
                    for value in values:
                        if self._stop.is_set():
                            break
                        await knobs.set(knob, value)
                        await self._settle(session, knob, value)
                        runs.append(await self._run(session, book, {knob: value}))
        report = Report(
            schema=SCHEMA,
            endpoint=config.endpoint.base_url,
            model=config.endpoint.model,
            workload=config.workload,
            argv=list(config.argv),
            runs=[r for r in runs if r.cells],
        )
        return Outcome(report, self._failure)

    async def _probe(self, session: aiohttp.ClientSession, messages: Messages) -> int:
        sample = await stream_chat(session, self.config.endpoint, messages, 1, 1, 0, 0.0)
        if sample.error is not None:
            words = len(messages[0]["content"].split())
            raise PromptLengthError(f"the endpoint refused {words} words: {sample.error}")
        return sample.prompt_tokens

    async def _settle(self, session: aiohttp.ClientSession, knob: str, value: int) -> None:
        """Wait until the engines report a swept trio knob in force (bounded)."""
        if knob not in TRIO_FIELDS:
            return
        deadline = time.monotonic() + KNOB_SETTLE_S
        while time.monotonic() < deadline and not self._stop.is_set():
            snapshot = await take_snapshot(session, self._root, self.config.workload, self._machine)
            if getattr(snapshot, knob) == value:
                return
            await asyncio.sleep(KNOB_POLL_S)
        logger.warning("%s=%d not reported in force after %.0f s", knob, value, KNOB_SETTLE_S)

    async def _run(
        self, session: aiohttp.ClientSession, book: PromptBook, sweep: dict[str, int]
    ) -> Run:
        config = self.config
        snapshot = await take_snapshot(session, self._root, config.workload, self._machine)
        sampler = ResourceSampler(
            session,
            self._root,
            snapshot.fleet,
            snapshot.ram_bytes,
            config.limits.swap_bytes,
            pid=config.server_pid,
            probe=self._machine,
        )
        started_at, t0 = time.time(), time.perf_counter()
        cells: list[Cell] = []
        samples: list[Sample] = []
        async with sampler:
            for wanted in config.prompt_tokens:
                for concurrency in config.concurrency:
                    if self._stop.is_set():
                        break
                    label = f"{wanted} prompt tokens x {concurrency}" + "".join(
                        f", {k}={v}" for k, v in sweep.items()
                    )
                    self._progress.start_cell(label)
                    done = await self._cell(session, book, concurrency, wanted, t0)
                    if done:
                        cells.append(summarize(done, concurrency, wanted, config.max_tokens))
                        samples += done
        return Run(
            workload=config.workload,
            sweep=sweep,
            started_at=started_at,
            duration_s=time.perf_counter() - t0,
            interrupted=self._stop.is_set(),  # Ctrl-C, or the endpoint failed (`failure`)
            cells=cells,
            samples=samples,
            snapshot=snapshot,
            resources=sampler.result(),
            gates=evaluate(cells, sampler.result(), config.limits),
        )

    async def _cell(
        self,
        session: aiohttp.ClientSession,
        book: PromptBook,
        concurrency: int,
        wanted: int,
        t0: float,
    ) -> list[Sample]:
        """`concurrency` slots, each sending its next request as soon as one finishes, until
        the cell's duration is up; the requests in flight then finish and are counted."""
        self.measuring = True
        done: list[Sample] = []
        deadline = time.perf_counter() + self.config.duration_s

        async def slot() -> None:
            while time.perf_counter() < deadline and not self._stop.is_set():
                messages = book.messages(wanted)
                sample = await stream_chat(
                    session,
                    self.config.endpoint,
                    messages,
                    self.config.max_tokens,
                    concurrency,
                    wanted,
                    t0,
                )
                done.append(sample)
                self._progress.request_done(sample.ok)
                if not sample.ok:
                    self._count_failure(sample)
                    await asyncio.sleep(FAILURE_PAUSE_S)
                else:
                    self._in_a_row = 0

        self._slots = [asyncio.create_task(slot()) for _ in range(concurrency)]
        try:
            await asyncio.gather(*self._slots, return_exceptions=True)
        finally:
            for task in self._slots:
                task.cancel()
            self._slots = []
        return done

    def _count_failure(self, sample: Sample) -> None:
        self._in_a_row += 1
        if self._in_a_row >= FAILURES_IN_A_ROW and self._failure is None:
            self._failure = f"{self._in_a_row} requests in a row failed, the last: {sample.error}"
            self.interrupt()
