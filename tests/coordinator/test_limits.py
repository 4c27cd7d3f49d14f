"""Per-key rpm/tpm windows and model lists, on a fake clock (no I/O)."""

from __future__ import annotations

import pytest

from coordinator.gateway.limits import (
    BYTES_PER_TOKEN,
    DEFAULT_COMPLETION_TOKENS,
    WINDOW_S,
    Limiter,
    RateLimited,
    check_model,
    estimate_tokens,
)
from mlxfleet.errors import ApiError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_rpm_admits_up_to_the_limit_then_says_when_to_retry(clock: Clock) -> None:
    limiter = Limiter(clock)
    limiter.acquire("team", 2, None, 10)
    clock.now += 10.5
    limiter.acquire("team", 2, None, 10)
    clock.now += 5
    with pytest.raises(RateLimited) as refused:
        limiter.acquire("team", 2, None, 10)
    # The first request leaves the window 60 s after it came: 44.5 s from now, rounded up.
    assert refused.value.retry_after_s == 45
    assert refused.value.headers == {"Retry-After": "45"}
    assert refused.value.status == 429
    body = refused.value.body()["error"]
    assert (body["type"], body["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "2 requests per minute" in body["message"]
    assert limiter.used("team") == (2, 20)  # a refused request is not charged


def test_the_window_slides(clock: Clock) -> None:
    limiter = Limiter(clock)
    limiter.acquire("team", 1, None, 1)
    clock.now += WINDOW_S - 0.01
    with pytest.raises(RateLimited) as refused:
        limiter.acquire("team", 1, None, 1)
    assert refused.value.retry_after_s == 1  # never 0, even with 10 ms to go
    clock.now += 0.01
    assert limiter.acquire("team", 1, None, 1) is not None
    assert limiter.used("team") == (1, 1)


def test_keys_have_separate_windows_and_unlimited_keys_are_not_tracked(clock: Clock) -> None:
    limiter = Limiter(clock)
    limiter.acquire("a", 1, None, 1)
    assert limiter.acquire("b", 1, None, 1) is not None
    for _ in range(100):
        assert limiter.acquire("free", None, None, 10_000) is None
    assert limiter.used("free") == (0, 0)


def test_tpm_refuses_past_the_limit_until_enough_tokens_leave(clock: Clock) -> None:
    limiter = Limiter(clock)
    limiter.acquire("team", None, 1000, 400)  # t = 0
    clock.now += 10
    limiter.acquire("team", None, 1000, 400)  # t = 10
    clock.now += 10
    limiter.acquire("team", None, 1000, 100)  # t = 20: 900 used
    with pytest.raises(RateLimited) as refused:
        limiter.acquire("team", None, 1000, 500)
    # 900 + 500 > 1000; once the t = 0 charge leaves, 500 + 500 fits: 40 s from now.
    assert refused.value.retry_after_s == 40
    assert "1000 tokens per minute" in refused.value.message
    assert limiter.acquire("team", None, 1000, 100) is not None  # 1000 exactly still fits


def test_settling_replaces_the_estimate_with_the_real_usage(clock: Clock) -> None:
    limiter = Limiter(clock)
    first = limiter.acquire("team", None, 1000, 800)
    with pytest.raises(RateLimited):
        limiter.acquire("team", None, 1000, 300)
    assert first is not None
    limiter.settle(first, 120)  # the completion stopped early
    assert limiter.used("team") == (1, 120)
    second = limiter.acquire("team", None, 1000, 300)
    assert second is not None
    limiter.settle(second, 900)  # a longer prompt than estimated is charged in full
    assert limiter.used("team") == (2, 1020)
    with pytest.raises(RateLimited) as refused:
        limiter.acquire("team", None, 1000, 1)
    # Both charges came at t = 0: the window is clear again in 60 s.
    assert refused.value.retry_after_s == 60


def test_an_unsettled_estimate_stays_until_it_leaves_the_window(clock: Clock) -> None:
    limiter = Limiter(clock)
    limiter.acquire("team", None, 1000, 600)
    clock.now += 30
    assert limiter.used("team") == (1, 600)
    clock.now += 30
    assert limiter.used("team") == (0, 0)


def test_rpm_and_tpm_together_wait_for_both(clock: Clock) -> None:
    limiter = Limiter(clock)
    limiter.acquire("team", 2, 1000, 900)  # t = 0
    clock.now += 30
    limiter.acquire("team", 2, 1000, 50)  # t = 30
    clock.now += 5
    with pytest.raises(RateLimited) as refused:
        limiter.acquire("team", 2, 1000, 100)
    assert refused.value.retry_after_s == 25  # both wait for the t = 0 charge
    assert "2 requests per minute and 1000 tokens per minute" in refused.value.message


def test_a_request_larger_than_the_tpm_is_refused_for_good(clock: Clock) -> None:
    limiter = Limiter(clock)
    with pytest.raises(RateLimited) as refused:
        limiter.acquire("team", None, 500, 501)
    assert refused.value.retry_after_s is None
    assert refused.value.headers == {}
    assert refused.value.param == "max_tokens"
    assert "lower max_tokens" in refused.value.message
    assert "500 tokens per minute" in refused.value.message
    assert limiter.used("team") == (0, 0)


def test_the_estimate_is_max_tokens_plus_a_quarter_of_the_body() -> None:
    assert estimate_tokens(100, 4000) == 100 + 4000 // BYTES_PER_TOKEN
    assert estimate_tokens(None, 3) == DEFAULT_COMPLETION_TOKENS
    assert estimate_tokens(0, 8) == 2


def test_allowed_models() -> None:
    check_model(frozenset(), "anything")  # no list: every model
    check_model(frozenset({"a", "b"}), "b")
    with pytest.raises(ApiError) as refused:
        check_model(frozenset({"b", "a"}), "c")
    assert refused.value.status == 403
    assert refused.value.code == "model_not_allowed"
    assert refused.value.param == "model"
    assert refused.value.message == "this key may not use model 'c' (allowed: a, b)"
