"""How each unit is used: requests in flight, when it was last used, and whether it sleeps.

The gateway reports requests; the reconciler unloads units idle for too long (they sleep until
a request wakes them) and evicts the least recently used ones to make room.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from coordinator.policy import UnitKey


@dataclass(slots=True)
class Usage:
    """Requests seen by the gateway for one unit."""

    # time.monotonic() of the last request, or of the last engine becoming ready: idleness
    # counts from whichever is later, so a unit is never unloaded right after it loads.
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0


class UnitUsage:
    """Usage per unit, and the units asleep (unloaded for idleness or room; woken on demand).

    Use from the event loop. Indexing a unit never seen gives it a fresh Usage.
    """

    def __init__(self, keys: Iterable[UnitKey]) -> None:
        self._usage: dict[UnitKey, Usage] = {key: Usage() for key in keys}
        self._asleep: set[UnitKey] = set()

    def __getitem__(self, key: UnitKey) -> Usage:
        return self._usage.setdefault(key, Usage())

    def get(self, key: UnitKey) -> Usage | None:
        return self._usage.get(key)

    def values(self) -> Iterator[Usage]:
        return iter(list(self._usage.values()))

    def begin_request(self, key: UnitKey) -> None:
        usage = self[key]
        usage.in_flight += 1
        usage.last_used = time.monotonic()

    def end_request(self, key: UnitKey) -> None:
        usage = self[key]
        usage.in_flight = max(0, usage.in_flight - 1)
        usage.last_used = time.monotonic()

    def engine_ready(self, key: UnitKey) -> None:
        """An engine of this unit became ready: its idleness counts from now."""
        usage = self[key]
        usage.last_used = max(usage.last_used, time.monotonic())

    def idle_for(self, key: UnitKey, seconds: float) -> bool:
        """No request in flight, and none for `seconds`."""
        usage = self._usage.get(key, Usage())
        return usage.in_flight == 0 and time.monotonic() - usage.last_used >= seconds

    def busy(self, key: UnitKey) -> bool:
        usage = self._usage.get(key)
        return usage is not None and usage.in_flight > 0

    def last_used(self, key: UnitKey) -> float:
        return self._usage.get(key, Usage()).last_used

    def is_asleep(self, key: UnitKey) -> bool:
        return key in self._asleep

    def sleep(self, key: UnitKey) -> None:
        self._asleep.add(key)

    def awake(self, key: UnitKey) -> None:
        """The unit runs again (an engine of it is live): no longer asleep."""
        self._asleep.discard(key)

    def wake(self, key: UnitKey) -> bool:
        """A request came for a sleeping unit: it may load again. True when it was asleep."""
        if key not in self._asleep:
            return False
        self._asleep.discard(key)
        self[key].last_used = time.monotonic()
        return True
