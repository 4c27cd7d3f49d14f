"""The bench report: every measured number in report.md, report.json round trip, PNG plots."""

from __future__ import annotations

import dataclasses
import io
import os
import struct
from pathlib import Path

import numpy as np
from matplotlib.image import imread

from coordinator.bench.plots import throughput_png, ttft_png
from coordinator.bench.report import markdown, write_outputs
from coordinator.bench.results import (
    SCHEMA,
    Cell,
    Gate,
    ProcessMemory,
    Quantiles,
    Report,
    Resources,
    Run,
    Sample,
    Snapshot,
    from_json,
)

GIB, MIB = 2**30, 2**20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def snapshot(batch_window_ms: int) -> Snapshot:
    return Snapshot(
        taken_at=1_700_000_000.0,
        client_host="laptop",
        client_os="macOS 15.1",
        client_chip="Apple M3 Pro",
        client_ram_bytes=36 * GIB,
        fleet=True,
        chips=["Apple M2 Ultra", "Apple M2 Ultra"],
        oses=["macOS 15.1"],
        mlx_versions=["0.32.4"],
        mlx_lm_versions=["0.32.2"],
        ram_bytes=192 * GIB,
        batch_window_ms=batch_window_ms,
        max_batch_size=8,
        max_concurrency=4,
        knobs={"batch_window_ms": batch_window_ms, "max_concurrency": 4, "queue_limit": 64},
        top_processes=[ProcessMemory(4242, "python3.12", 12 * GIB + 512 * MIB),
                       ProcessMemory(77, "WindowServer", 300 * MIB)],
    )  # fmt: skip


def samples(concurrency: int, ttfts: list[float], failed: int = 0) -> list[Sample]:
    ok = [
        Sample(concurrency, 128, i * 0.5, t / 10, t, t + 63 / 20, 128, 64, 64, "length")
        for i, t in enumerate(ttfts)
    ]
    bad = [Sample(concurrency, 128, 9.0, None, None, 0.1, 0, 0, 0, None, "HTTP 503: overloaded")]
    return ok + bad * failed


def two_run_report() -> Report:
    """A --sweep batch-window=50,80 run whose second value was interrupted and tripped a gate."""
    c4 = Cell(
        concurrency=4,
        prompt_tokens=128,
        max_tokens=64,
        duration_s=10.0,
        requests=10,
        failed=1,
        ttft_s=Quantiles(0.25, 0.4, 0.5, 9),
        first_byte_s=Quantiles(0.02, 0.03, 0.04, 9),
        tail_ratio=1.6,
        prefill_tokens_per_s=Quantiles(512.0, 600.0, 640.0, 9),
        decode_tokens_per_s=Quantiles(20.0, 25.0, 26.0, 9),
        aggregate_tokens_per_s=57.6,
        completion_tokens=576,
        ran_to_max_tokens=9,
    )
    c1 = dataclasses.replace(
        c4,
        concurrency=1,
        duration_s=5.0,
        requests=5,
        failed=0,
        ttft_s=Quantiles(0.1, 0.12, 0.13, 5),
        first_byte_s=None,
        tail_ratio=1.2,
        prefill_tokens_per_s=None,
        decode_tokens_per_s=Quantiles(30.0, 31.0, 32.0, 5),
        aggregate_tokens_per_s=30.0,
        completion_tokens=320,
        ran_to_max_tokens=5,
        prompt_tokens_missed=2,
    )
    first = Run(
        "interactive", {"batch_window_ms": 50}, 1_700_000_000.0, 15.0, False, [c4, c1],
        samples(4, [0.2, 0.25, 0.3, 0.4, 0.5], failed=1) + samples(1, [0.1, 0.12])
        + [dataclasses.replace(samples(1, [0.13])[0], tokens_counted=63)],
        snapshot(50),
        Resources("fleet", 120, 48 * GIB, 25.0, 512 * MIB, 0.0, [(0.0, 48 * GIB, 512 * MIB)]),
        [Gate("tail_ratio", 2.8, 1.6, False, "worst cell p95/p50 1.60"),
         Gate("swap", 90.0, 0.0, False, "swap never above 768 MiB"),
         Gate("rss", 82.0, None, False, "not measured: no agent metrics")],
    )  # fmt: skip
    c4b = dataclasses.replace(
        c4,
        failed=0,
        ttft_s=Quantiles(0.3, 0.5, 0.6, 10),
        tail_ratio=5 / 3,
        prefill_tokens_per_s=None,
        decode_tokens_per_s=Quantiles(22.0, 26.0, 27.0, 10),
        aggregate_tokens_per_s=63.36,
        completion_tokens=634,
        ran_to_max_tokens=10,
    )
    second = Run(
        "interactive", {"batch_window_ms": 80}, 1_700_000_100.0, 7.5, True, [c4b],
        samples(4, [0.3, 0.35, 0.5]), snapshot(80), None,
        [Gate("tail_ratio", 2.8, 3.1, True, "worst cell p95/p50 3.10")],
    )  # fmt: skip
    argv = ["mlxfleet", "bench", "--endpoint", "http://127.0.0.1:8400/v1", "--sweep",
            "batch-window=50,80"]  # fmt: skip
    return Report(
        SCHEMA, "http://127.0.0.1:8400/v1", "demo-1b", "interactive", argv, [first, second]
    )


def empty_report() -> Report:
    """Ctrl-C before the first request finished: one run with nothing in it."""
    run = Run("batch", {}, 1_700_000_000.0, 0.4, True, [], [], snapshot(80), None, [])
    return Report(SCHEMA, "http://127.0.0.1:8400/v1", "demo-1b", "batch", ["mlxfleet"], [run])


def test_markdown_shows_every_section_and_number() -> None:
    text = markdown(two_run_report())
    lines = text.splitlines()
    for line in [
        "# mlxfleet bench: interactive",
        "- Endpoint: http://127.0.0.1:8400/v1",
        "- Model: demo-1b",
        "- Command: `mlxfleet bench --endpoint http://127.0.0.1:8400/v1"
        " --sweep batch-window=50,80`",
        "- Gates: **TRIPPED**: tail_ratio (batch_window_ms=80)",
        "**Interrupted (Ctrl-C): the numbers below are what was measured until then.**",
        "## Run 1 of 2: batch_window_ms=50",
        "Started 2023-11-14 22:13:20 UTC, ran 15.0 s.",
        "## Run 2 of 2: batch_window_ms=80",
        "Started 2023-11-14 22:15:00 UTC, ran 7.5 s, interrupted by Ctrl-C.",
        # latency: TTFT and first byte p50/p95/p99 in ms, p95/p50; c=1 first runs (sorted)
        "| 1 | 128 | 5 | 0 | 100.0 | 120.0 | 130.0 | — | — | — | 1.20 |",
        "| 4 | 128 | 10 | 1 | 250.0 | 400.0 | 500.0 | 20.0 | 30.0 | 40.0 | 1.60 |",
        # throughput: prefill p50/p95, decode per slot p50/p95, aggregate, tokens, ran to max
        "| 4 | 128 | 64 | 10.0 | 512.0 | 600.0 | 20.0 | 25.0 | 57.6 | 576 | 9 | 0 |",
        "| 1 | 128 | 64 | 5.0 | — | — | 30.0 | 31.0 | 30.0 | 320 | 5 | 2 |",
        "1 requests' usage.completion_tokens differ from the tokens counted on the stream.",
        "| 1 | HTTP 503: overloaded |",
        # the numeric trio
        "- Batch window: 50 ms",
        "- Concurrent slots per engine: 4 (max batch size 8)",
        "- RSS peak: 48.0 GiB = 25.0 % of 192.0 GiB RAM (fleet, 120 samples)",
        "- Swap peak: 512 MiB; longest stretch over the swap gate's limit: 0.0 s",
        "- RSS peak: not measured",
        # gates
        "| tail_ratio | 2.8 | 1.6 | pass | worst cell p95/p50 1.60 |",
        "| swap | 90 | 0 | pass | swap never above 768 MiB |",
        "| rss | 82 | — | not measured | not measured: no agent metrics |",
        "| tail_ratio | 2.8 | 3.1 | TRIPPED | worst cell p95/p50 3.10 |",
        # snapshot
        "- Taken: 2023-11-14 22:13:20 UTC",
        "- Client: laptop, macOS 15.1, Apple M3 Pro, 36.0 GiB RAM",
        "- Server (the fleet): chips Apple M2 Ultra; OS macOS 15.1; RAM 192.0 GiB",
        "- mlx 0.32.4, mlx-lm 0.32.2",
        "- Engine knobs: batch_window_ms=80, max_concurrency=4, queue_limit=64",
        "| 4242 | python3.12 | 12.5 GiB |",
        "| 77 | WindowServer | 300 MiB |",
        # sweep deltas against the first value
        "## Sweep deltas against batch_window_ms=50",
        "| batch_window_ms=80 | 4 | 128 | 300.0 (+20.0 %) | 500.0 (+25.0 %) | 1.67 (+4.2 %)"
        " | 22.0 (+10.0 %) | 63.4 (+10.0 %) |",
        "| batch_window_ms=50 | 25.0 % | none |",
        "| batch_window_ms=80 | — | tail_ratio |",
        "![TTFT distribution](ttft.png)",
        "![Tokens/s against concurrency](throughput.png)",
    ]:
        assert line in lines, line
    for section in ["### Latency", "### Throughput", "### Failed requests", "### Numeric trio",
                    "### Gates", "### Snapshot", "## Plots"]:  # fmt: skip
        assert lines.count(section) == (1 if section in ("## Plots", "### Failed requests") else 2)


def test_markdown_of_an_interrupted_empty_run_says_so() -> None:
    text = markdown(empty_report())
    assert "**Interrupted (Ctrl-C): the numbers below are what was measured until then.**" in text
    assert "- Gates: none evaluated" in text
    assert "- RSS peak: not measured" in text
    assert "## Sweep deltas" not in text
    no_runs = Report(SCHEMA, "http://x/v1", "m", "batch", [], [])
    assert "No run was measured." in markdown(no_runs)


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def colours(png: bytes) -> int:
    pixels = imread(io.BytesIO(png))
    return len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0))


def test_write_outputs_writes_four_files_that_round_trip(tmp_path: Path) -> None:
    report = two_run_report()
    out = tmp_path / "runs" / "today"
    paths = write_outputs(report, out)
    assert paths == [out / n for n in ("report.json", "report.md", "ttft.png", "throughput.png")]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temp left
    assert from_json(paths[0].read_text()) == report
    assert paths[1].read_text() == markdown(report)
    umask = os.umask(0o022)
    os.umask(umask)
    assert paths[0].stat().st_mode & 0o777 == 0o666 & ~umask  # not a temp file's 0600
    assert png_size(paths[2].read_bytes()) == (500, 400)  # one panel: one prompt length
    assert png_size(paths[3].read_bytes()) == (1000, 400)  # aggregate and per-slot panels
    for png in paths[2:]:
        assert len(png.read_bytes()) > 10_000 and colours(png.read_bytes()) > 20
    write_outputs(empty_report(), out)  # a second run overwrites in place
    assert from_json(paths[0].read_text()) == empty_report()
    assert len(list(out.iterdir())) == 4


def test_plots_are_deterministic_and_draw_no_data_rather_than_fail() -> None:
    report = two_run_report()
    assert ttft_png(report) == ttft_png(report)
    assert throughput_png(report) == throughput_png(report)
    one = Run("interactive", {}, 0.0, 1.0, False, report.runs[0].cells[1:],
              samples(1, [0.1]), snapshot(50), None, [])  # fmt: skip
    for r in (empty_report(), Report(SCHEMA, "e", "m", "interactive", [], [one])):
        for png in (ttft_png(r), throughput_png(r)):
            assert png_size(png)[1] == 400 and len(png) > 5_000
    empty = ttft_png(empty_report())
    assert empty != ttft_png(Report(SCHEMA, "e", "m", "interactive", [], [one]))
    assert colours(empty) > 2  # the "no data" text and the title are drawn
