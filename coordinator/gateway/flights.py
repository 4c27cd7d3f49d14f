"""Requests in flight to each engine, so that an engine leaving the router aborts its own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator

import aiohttp

from coordinator.registry import EngineId


class Flight:
    """One request to one engine, abortable while it waits for headers or reads the body."""

    def __init__(self) -> None:
        self.aborted = asyncio.Event()
        self._upstream: aiohttp.ClientResponse | None = None

    def reading(self, upstream: aiohttp.ClientResponse) -> None:
        """The engine answered: from now on an abort closes its response."""
        self._upstream = upstream

    def abort(self) -> None:
        self.aborted.set()
        if self._upstream is not None:
            self._upstream.close()  # a pending read now raises ClientConnectionError

    async def run(self, post: Awaitable[aiohttp.ClientResponse]) -> aiohttp.ClientResponse:
        """Await the response headers unless aborted first (then ClientConnectionError)."""
        task = asyncio.ensure_future(post)
        aborted = asyncio.ensure_future(self.aborted.wait())
        try:
            await asyncio.wait({task, aborted}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the client went away: no orphaned request
            task.cancel()
            raise
        finally:
            aborted.cancel()
        if not task.done():
            task.cancel()
            raise aiohttp.ClientConnectionError("engine left the router")
        return task.result()


class Flights:
    """Every request's flight, by engine. Create and use from the event loop."""

    def __init__(self) -> None:
        self._by_engine: dict[EngineId, set[Flight]] = {}

    @contextlib.contextmanager
    def track(self, engine_id: EngineId) -> Iterator[Flight]:
        """Track a request so that `abort(engine_id)` reaches it while the block runs."""
        flight = Flight()
        flights = self._by_engine.setdefault(engine_id, set())
        flights.add(flight)
        try:
            yield flight
        finally:
            flights.discard(flight)
            if not flights:
                self._by_engine.pop(engine_id, None)

    def count(self, engine_id: EngineId) -> int:
        """Requests in flight to this engine now (routing's max_parallel_requests check)."""
        return len(self._by_engine.get(engine_id, ()))

    def abort(self, engine_id: EngineId) -> None:
        """The engine left the router (its node went silent, it exited, it was unloaded):
        requests waiting on it must not hang. Aborting fails them, which retries those that
        sent nothing to the client and ends the others with an error event."""
        for flight in list(self._by_engine.get(engine_id, ())):
            flight.abort()
