"""Per-key limits: allowed models, requests per minute (rpm) and tokens per minute (tpm).

Both rates use one sliding window of the last 60 s per key name, holding one charge per
admitted request. rpm counts the charges; tpm sums their tokens (prompt + completion).

The completion's length is known only when it ends, so tpm works by reservation: admission
charges an estimate, `max_tokens` (DEFAULT_COMPLETION_TOKENS when absent) + the body's bytes
/ BYTES_PER_TOKEN for the prompt, and refuses when the window's tokens + the estimate exceed
tpm. `max_tokens` caps the completion, so concurrent requests cannot overshoot the limit
together; once the real usage is known, `settle` replaces the estimate with it, which gives
back what was not used (or charges a longer prompt or an uncapped completion in full). A
charge stays at its admission time; one never settled keeps its estimate.

`KeyLimits` is what the gateway uses: it keeps a request's charge on the request itself.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiohttp import web

from coordinator.store import ApiKey
from mlxfleet.errors import ApiError

WINDOW_S = 60.0
DEFAULT_COMPLETION_TOKENS = 256  # charged for a request that sends no max_tokens
BYTES_PER_TOKEN = 4  # prompt estimate from the raw body: JSON and English run ~4 bytes a token


@dataclass(eq=False, slots=True)
class Reservation:
    """One admitted request's charge in its key's window; `settle` updates `tokens`."""

    key: str
    at: float  # the limiter's clock at admission
    tokens: int


class RateLimited(ApiError):
    """A key's rpm or tpm is spent for now: 429, with Retry-After when waiting helps."""

    def __init__(self, message: str, retry_after_s: int | None, param: str | None = None) -> None:
        super().__init__(
            429,
            message,
            type="rate_limit_error",
            param=param,
            code="rate_limit_exceeded",
            headers={} if retry_after_s is None else {"Retry-After": str(retry_after_s)},
        )
        self.retry_after_s = retry_after_s


def check_model(allowed: Iterable[str], model: str) -> None:
    """403 unless the key may use `model`; an empty `allowed` means every model."""
    names = sorted(allowed)
    if names and model not in names:
        raise ApiError(
            403,
            f"this key may not use model {model!r} (allowed: {', '.join(names)})",
            type="permission_error",
            param="model",
            code="model_not_allowed",
        )


def estimate_tokens(max_tokens: int | None, body_bytes: int) -> int:
    """The tokens charged at admission: the completion's cap + a prompt estimate."""
    completion = DEFAULT_COMPLETION_TOKENS if max_tokens is None else max_tokens
    return completion + body_bytes // BYTES_PER_TOKEN


class Limiter:
    """Sliding 60 s windows keyed by key name. Use from the event loop thread only: the
    check and the charge happen in one synchronous call, so concurrent requests see each
    other's charges."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, deque[Reservation]] = {}

    def acquire(
        self, key: str, rpm: int | None, tpm: int | None, estimate: int
    ) -> Reservation | None:
        """Charge one request of `estimate` tokens, or raise RateLimited. None (nothing to
        settle) when the key has no rate limits."""
        if rpm is None and tpm is None:
            return None
        if tpm is not None and estimate > tpm:
            raise RateLimited(
                f"this request needs an estimated {estimate} tokens (max_tokens + prompt), "
                f"more than this key's limit of {tpm} tokens per minute: lower max_tokens "
                "or shorten the prompt; retrying will not help",
                None,
                param="max_tokens",
            )
        now = self._clock()
        window = self._windows.setdefault(key, deque())
        while window and window[0].at + WINDOW_S <= now:
            window.popleft()
        waits = []
        if rpm is not None and len(window) >= rpm:
            # The oldest len - rpm + 1 requests must leave the window first.
            waits.append((window[len(window) - rpm].at, f"{rpm} requests per minute"))
        used = sum(r.tokens for r in window)
        if tpm is not None and used + estimate > tpm:
            for charge in window:
                used -= charge.tokens
                if used + estimate <= tpm:
                    waits.append((charge.at, f"{tpm} tokens per minute"))
                    break
        if waits:
            at, _ = max(waits)
            retry_after_s = max(1, math.ceil(at + WINDOW_S - now))
            limits = " and ".join(text for _, text in waits)
            raise RateLimited(
                f"rate limit reached for this key ({limits}); retry in {retry_after_s} s",
                retry_after_s,
            )
        reservation = Reservation(key, now, estimate)
        window.append(reservation)
        return reservation

    def settle(self, reservation: Reservation, tokens: int) -> None:
        """Replace the estimate with the request's real usage (prompt + completion)."""
        reservation.tokens = max(0, tokens)

    def used(self, key: str) -> tuple[int, int]:
        """(requests, tokens) charged to `key` in the current window."""
        now = self._clock()
        window = [r for r in self._windows.get(key, ()) if r.at + WINDOW_S > now]
        return len(window), sum(r.tokens for r in window)


# The request's tpm charge, when its key has rate limits (KeyLimits.settle reads it).
RESERVATION_KEY = web.RequestKey("mlxfleet_reservation", Reservation)


class KeyLimits:
    """A key's rate limits applied to gateway requests: the charge travels on the request.
    Use from the event loop thread only (like Limiter)."""

    def __init__(self, limiter: Limiter | None = None) -> None:
        self.limiter = limiter or Limiter()

    def charge(
        self, request: web.Request, record: ApiKey, max_tokens: int | None, body_bytes: int
    ) -> None:
        """Admit the request under its key's rpm and tpm, or raise RateLimited."""
        estimate = estimate_tokens(max_tokens, body_bytes)
        reservation = self.limiter.acquire(record.name, record.rpm, record.tpm, estimate)
        if reservation is not None:
            request[RESERVATION_KEY] = reservation

    def settle(self, request: web.Request, usage: tuple[int, int] | None) -> None:
        """Charge the request's real (prompt, completion) usage in place of its estimate;
        nothing when its key has no rate limits or the usage is unknown."""
        reservation = request.get(RESERVATION_KEY)
        if reservation is not None and usage is not None:
            self.settle_usage(reservation, *usage)

    def settle_usage(
        self, reservation: Reservation | None, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """Charge a reservation's real usage (None: the key has no rate limits)."""
        if reservation is not None:
            self.limiter.settle(reservation, prompt_tokens + completion_tokens)
