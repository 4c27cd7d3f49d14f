"""The bench report's data model: nearest-rank quantiles, per-request rates, JSON round trip."""

from __future__ import annotations

import pytest

from coordinator.bench.results import SCHEMA, Quantiles, Sample, from_json, to_json
from tests.coordinator.test_bench_report import two_run_report


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


def test_a_report_survives_json_and_a_foreign_file_is_refused() -> None:
    original = two_run_report()  # every field of every record, gates and resources too
    assert from_json(to_json(original)) == original
    with pytest.raises(ValueError, match="not an mlxfleet bench report"):
        from_json('{"schema": "other"}')
    with pytest.raises(ValueError, match="malformed bench report"):
        from_json(f'{{"schema": "{SCHEMA}"}}')
