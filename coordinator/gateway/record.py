"""What the metrics record of each completion request, filled in as it goes, counted as it ends."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiohttp import web

from coordinator.gateway.relay import StreamRelay
from coordinator.metrics import Metrics
from coordinator.request_log import RequestLog, RequestRecord
from coordinator.routing import ORDER_LOCAL, Target
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
    cached_tokens: int = 0  # of the prompt, from the engine's prefix cache
    relay: StreamRelay | None = None
    key_name: str = ""  # the team key's name and id, once it is checked
    key_id: str = ""
    target: Target | None = None  # the last engine (or cloud model) a request was sent to
    arrived: float = field(default_factory=time.time)  # unix seconds, for the audit log


def route(target: Target | None) -> str:
    """local (an engine on the coordinator's host), remote (another node's) or cloud."""
    if target is None:
        return ""
    if target.cloud:
        return "cloud"
    return "local" if target.order == ORDER_LOCAL else "remote"


class Recorder:
    """Counts finished requests in the metrics (status, duration, tokens, TTFT, TPOT) and
    records each in the request log (usage and audit)."""

    def __init__(self, metrics: Metrics, log: RequestLog | None = None) -> None:
        self._metrics = metrics
        self._log = log

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
        metrics.request_done(
            model, tier, outcome.status, duration, outcome.usage, outcome.api, outcome.key_name
        )
        relay = outcome.relay
        ttft = None
        if relay is not None and relay.first_content_at is not None:
            ttft = relay.first_content_at - outcome.started
            tokens = outcome.usage[1] if outcome.usage else 0
            metrics.stream_timing(
                model, tier, ttft, relay.last_content_at - relay.first_content_at, tokens
            )
        if self._log is not None:
            self._log.record(self.audit_record(outcome, duration, ttft))

    @staticmethod
    def audit_record(outcome: Outcome, duration: float | None, ttft: float | None) -> RequestRecord:
        target = outcome.target if outcome.served else None
        prompt, completion = outcome.usage or (0, 0)
        return RequestRecord(
            outcome.arrived, outcome.key_id, outcome.key_name, outcome.api, outcome.model,
            outcome.tier, route(target), target.node_id if target and not target.cloud else "",
            outcome.status, prompt, completion, outcome.cached_tokens, ttft, duration,
        )  # fmt: skip
