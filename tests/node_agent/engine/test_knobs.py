"""Tier knobs: the pure admission rule, validation, and where the engine's knobs come from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mlxfleet.errors import ApiError, KnobError
from mlxfleet.openai.protocol import SamplingParams
from mlxfleet.tiers import DEFAULT_KNOBS, Knobs
from node_agent.engine.__main__ import EXIT_USAGE, main
from node_agent.engine.config import load_config
from node_agent.engine.generator import Job, ModelThread
from node_agent.engine.knobs import admit_now, updated_knobs, window_remaining_ms
from node_agent.errors import ConfigError

BATCH = Knobs(max_concurrency=8, batch_window_ms=80, max_batch_size=4, queue_limit=64)
INTERACTIVE = DEFAULT_KNOBS["interactive"]
BASE_ARGV = ["--model-path", "/m", "--model-name", "demo"]
SECRET_ENV = {"MLXFLEET_ENGINE_SECRET": "s"}


# --- the admission rule ------------------------------------------------------------------


def test_window_not_elapsed_and_group_not_full_waits() -> None:
    assert admit_now([50.0, 10.0], free_slots=8, knobs=BATCH) == 0
    assert window_remaining_ms([50.0, 10.0], BATCH) == pytest.approx(30.0)


def test_window_elapsed_admits_everyone_waiting_up_to_a_group() -> None:
    assert admit_now([80.0, 5.0], free_slots=8, knobs=BATCH) == 2
    assert admit_now([120.0] * 6, free_slots=8, knobs=BATCH) == 4  # max_batch_size
    assert window_remaining_ms([120.0], BATCH) == 0.0


def test_full_group_goes_before_the_window() -> None:
    assert admit_now([3.0, 2.0, 1.0, 0.0], free_slots=8, knobs=BATCH) == 4
    assert admit_now([3.0, 2.0, 1.0, 0.0, 0.0], free_slots=8, knobs=BATCH) == 4
    # Fewer free slots than a group: filling the free slots is enough.
    assert admit_now([3.0, 2.0], free_slots=2, knobs=BATCH) == 2


def test_never_more_than_the_free_slots() -> None:
    assert admit_now([500.0] * 5, free_slots=3, knobs=BATCH) == 3
    assert admit_now([500.0], free_slots=0, knobs=BATCH) == 0
    assert admit_now([500.0], free_slots=-2, knobs=BATCH) == 0  # max_concurrency was lowered


def test_window_zero_admits_at_once_and_nothing_waits_forever() -> None:
    assert admit_now([0.0], free_slots=4, knobs=INTERACTIVE) == 1
    assert admit_now([0.0] * 6, free_slots=4, knobs=INTERACTIVE) == 4
    assert admit_now([], free_slots=4, knobs=INTERACTIVE) == 0
    assert window_remaining_ms([], BATCH) is None


# --- validation ----------------------------------------------------------------------------


def test_knobs_are_checked_on_construction() -> None:
    with pytest.raises(KnobError) as info:
        Knobs(max_concurrency=0, batch_window_ms=0, max_batch_size=1, queue_limit=1)
    assert info.value.knob == "max_concurrency"
    with pytest.raises(KnobError) as info:
        Knobs(max_concurrency=1, batch_window_ms=10_001, max_batch_size=1, queue_limit=1)
    assert (info.value.knob, info.value.reason) == (
        "batch_window_ms",
        "must be an integer 0-10000, got 10001",
    )


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"batch_window_ms": -1}, "batch_window_ms", "invalid_value"),
        ({"max_batch_size": 0}, "max_batch_size", "invalid_value"),
        ({"queue_limit": "8"}, "queue_limit", "invalid_value"),
        ({"max_concurrency": True}, "max_concurrency", "invalid_value"),
        ({"max_concurrency": 2.5}, "max_concurrency", "invalid_value"),
        ({"batch_window": 10}, "batch_window", "unknown_parameter"),
    ],
)
def test_bad_update_names_the_field(body: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(ApiError) as info:
        updated_knobs(BATCH, body)
    assert (info.value.status, info.value.param, info.value.code) == (400, param, code)
    assert f"'{param}'" in info.value.message


def test_update_changes_only_the_fields_given() -> None:
    assert updated_knobs(BATCH, {"batch_window_ms": 0}) == Knobs(8, 0, 4, 64)
    assert updated_knobs(BATCH, {}) == BATCH


# --- configuration precedence: flags > environment (batch tier) > tier defaults -------------


def test_tier_defaults() -> None:
    assert load_config(BASE_ARGV, SECRET_ENV).knobs == Knobs(4, 0, 4, 64)
    config = load_config([*BASE_ARGV, "--tier", "batch"], SECRET_ENV)
    assert (config.tier, config.knobs) == ("batch", Knobs(12, 80, 12, 256))


def test_environment_overrides_batch_defaults_and_flags_override_both() -> None:
    env = SECRET_ENV | {"MLX_BATCH_BATCH_WINDOW_MS": "200", "MLX_BATCH_MAX_BATCH_SIZE": "6"}
    assert load_config([*BASE_ARGV, "--tier", "batch"], env).knobs == Knobs(12, 200, 6, 256)
    flags = ["--tier", "batch", "--batch-window-ms", "30", "--max-concurrency", "3"]
    flags += ["--queue-limit", "5"]
    assert load_config([*BASE_ARGV, *flags], env).knobs == Knobs(3, 30, 6, 5)
    # The seeds' variables belong to the batch tier: an interactive engine ignores them.
    assert load_config(BASE_ARGV, env).knobs == INTERACTIVE
    flags = ["--batch-window-ms", "20", "--max-batch-size", "2"]
    assert load_config([*BASE_ARGV, *flags], env).knobs == Knobs(4, 20, 2, 64)


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--tier", "bulk"], {}, "--tier"),
        (["--max-concurrency", "0"], {}, "--max-concurrency"),
        (["--queue-limit", "many"], {}, "--queue-limit"),
        (["--batch-window-ms", "10001"], {}, "--batch-window-ms"),
        (["--tier", "batch"], {"MLX_BATCH_MAX_BATCH_SIZE": "0"}, "MLX_BATCH_MAX_BATCH_SIZE"),
        (["--tier", "batch"], {"MLX_BATCH_BATCH_WINDOW_MS": "x"}, "MLX_BATCH_BATCH_WINDOW_MS"),
    ],
)
def test_bad_knob_exits_2_with_one_line_naming_it(
    argv: list[str],
    env: dict[str, str],
    named: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(ConfigError):
        load_config([*BASE_ARGV, *argv], SECRET_ENV | env)
    for name, value in (SECRET_ENV | env).items():
        monkeypatch.setenv(name, value)
    assert main([*BASE_ARGV, *argv]) == EXIT_USAGE
    out = capsys.readouterr()
    assert out.out == ""
    assert len(out.err.strip().splitlines()) == 1
    assert named in out.err


# --- the model thread's admissions, with a fake decoder (no model) -------------------------


class FakeDecoder:
    """Records insert calls and the slots asked for; never generates (admission only)."""

    def __init__(self) -> None:
        self.inserts: list[int] = []
        self.slots_asked = 0

    def slots(self, max_concurrency: int) -> int:
        self.slots_asked = max_concurrency
        return max_concurrency

    def insert(self, prompts: list[list[int]], *args: Any) -> list[int]:
        first = sum(self.inserts)
        self.inserts.append(len(prompts))
        return list(range(first, first + len(prompts)))

    def remove(self, uid: int) -> None:
        pass

    def cached(self, uid: int) -> int:
        return 0  # no prefix cache

    def cache_stats(self) -> None:
        return None

    def idle_interval_s(self) -> None:
        return None  # a single engine: nothing to tell anyone while idle

    def idle(self) -> None:
        pass


class FakeTokenizer:
    detokenizer = None


def idle_thread(knobs: Knobs) -> tuple[ModelThread, FakeDecoder]:
    thread = ModelThread(Path("/nonexistent"), knobs=knobs)
    decoder = FakeDecoder()
    thread._decoder, thread.tokenizer = decoder, FakeTokenizer()  # type: ignore[assignment]
    return thread, decoder


def submit(thread: ModelThread, request_id: int) -> None:
    params = SamplingParams(max_tokens=4, temperature=0.0, top_p=1.0, seed=None, stop=())
    thread.submit(Job(request_id, [1, 2], 4, params, lambda event: None))


def test_model_thread_admits_a_full_group_in_one_insert_and_respects_new_knobs() -> None:
    thread, bg = idle_thread(Knobs(8, 10_000, 3, 64))
    submit(thread, 1)
    submit(thread, 2)
    thread._take_inbox(0.0)
    thread._admit()
    assert bg.inserts == [] and thread.stats().queued == 2
    # Idle with requests waiting: block on the inbox until the window ends, not spin.
    timeout_s = thread._inbox_timeout_s()
    assert timeout_s is not None and 5.0 < timeout_s <= 10.0
    submit(thread, 3)
    thread._take_inbox(0.0)
    thread._admit()
    assert bg.inserts == [3]  # one group, prefilled together
    assert bg.slots_asked == 8
    stats = thread.stats()
    assert (stats.active, stats.queued, stats.admission_groups, stats.largest_admission) == (
        3,
        0,
        1,
        3,
    )
    assert thread._inbox_timeout_s() == 0.0  # decoding: never block
    # Lowering max_concurrency below the running count admits nothing and stops nobody.
    thread.set_knobs(Knobs(1, 0, 3, 64))
    submit(thread, 4)
    thread._take_inbox(0.0)
    thread._admit()
    assert bg.inserts == [3]
    assert (thread.stats().active, thread.stats().queued) == (3, 1)
    assert bg.slots_asked == 1
    # Window 0 and a free slot: admitted at once.
    for request_id in (1, 2, 3):
        thread._cancel(request_id)
    thread._admit()
    assert bg.inserts == [3, 1]
    assert (thread.stats().active, thread.stats().queued) == (1, 0)
