"""What the metrics record of each completion request, filled in as it goes, counted as it ends."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from aiohttp import web

from coordinator.gateway.relay import StreamRelay
from coordinator.metrics import Metrics
from mlxfleet.errors import ApiError

CLIENT_GONE = 499  # the status nginx made common for "the client closed the connection"


@dataclass(slots=True)
class Outcome:
    """One request's record: what the metrics count once it ends."""

    started: float  # time.monotonic() at arrival
    api: str = ""  # the dialect's route: chat, completions, messages or responses
    model: str = ""  # set once the request names a configured unit
    tier: str = ""
    status: int = 0  # 0: the response's own status
    served: bool = False  # an engine (or the cloud) answered
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens
    relay: StreamRelay | None = None


class Recorder:
    """Counts finished requests in the metrics (status, duration, tokens, TTFT, TPOT)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    @contextlib.contextmanager
    def measure(self) -> Iterator[Outcome]:
        """The record of the request served inside the block, counted however it ends: the
        status is the error's, 499 when the client left, 500 for anything unexpected."""
        outcome = Outcome(time.monotonic())
        try:
            yield outcome
        except ApiError as err:
            outcome.status = err.status
            raise
        except web.HTTPException as exc:
            outcome.status = exc.status
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            outcome.status = CLIENT_GONE
            raise
        except Exception:
            outcome.status = 500
            raise
        finally:
            self.record(outcome)

    def record(self, outcome: Outcome) -> None:
        metrics = self._metrics
        model, tier = outcome.model, outcome.tier
        duration = time.monotonic() - outcome.started if outcome.served else None
        metrics.request_done(model, tier, outcome.status, duration, outcome.usage, outcome.api)
        relay = outcome.relay
        if relay is not None and relay.first_content_at is not None:
            tokens = outcome.usage[1] if outcome.usage else 0
            metrics.stream_timing(
                model,
                tier,
                relay.first_content_at - outcome.started,
                relay.last_content_at - relay.first_content_at,
                tokens,
            )
