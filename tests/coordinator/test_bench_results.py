"""The bench report's data model: nearest-rank quantiles, per-request rates, JSON round trip."""

from __future__ import annotations

import pytest

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
    to_json,
)


def test_quantiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert Quantiles.of(values) == Quantiles(50.0, 95.0, 99.0, 100)
    assert Quantiles.of([3.0]) == Quantiles(3.0, 3.0, 3.0, 1)
    assert Quantiles.of([]) is None


def test_a_sample_splits_prefill_from_decode() -> None:
    sample = Sample(4, 128, 0.0, 0.05, 0.25, 1.25, 128, 21, 20, "length")
    assert sample.ok
    assert sample.decode_tokens_per_s == pytest.approx(20.0)  # 20 tokens after the first in 1 s
    assert sample.prefill_tokens_per_s == pytest.approx(512.0)  # 128 prompt tokens in 0.25 s
    failed = Sample(4, 128, 0.0, None, None, 0.1, 0, 0, 0, None, "HTTP 503")
    assert not failed.ok and failed.decode_tokens_per_s is None
    assert failed.prefill_tokens_per_s is None


def report() -> Report:
    sample = Sample(1, 64, 0.5, 0.01, 0.02, 0.5, 64, 16, 16, "length")
    q = Quantiles(0.02, 0.02, 0.02, 1)
    cell = Cell(1, 64, 16, 1.0, 1, 0, q, q, 1.0, q, q, 32.0, 16, 1)
    snapshot = Snapshot(
        1.0, "h", "Linux", "AMD EPYC", 2**34, True, ["AMD EPYC"], ["Linux 6"], ["0.32.4"],
        ["0.32.2"], 2**34, 0, 4, 4, {"queue_limit": 64}, [ProcessMemory(1, "python", 2**20)],
    )  # fmt: skip
    resources = Resources("fleet", 3, 2**30, 6.25, 0, 0.0, [(0.0, 2**30, 0)])
    gate = Gate("tail_ratio", 2.8, 1.0, False, "worst cell p95/p50 1.00")
    run = Run("interactive", {}, 1.0, 2.0, False, [cell], [sample], snapshot, resources, [gate])
    return Report(SCHEMA, "http://x/v1", "demo", "interactive", ["bench"], [run])


def test_a_report_survives_json_and_a_foreign_file_is_refused() -> None:
    original = report()
    assert from_json(to_json(original)) == original
    with pytest.raises(ValueError, match="not an mlxfleet bench report"):
        from_json('{"schema": "other"}')
    with pytest.raises(ValueError, match="malformed bench report"):
        from_json(f'{{"schema": "{SCHEMA}"}}')
