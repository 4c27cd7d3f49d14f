"""When a unit's missing replicas must wait before they are placed again.

After its engines exit or fail to load, a unit backs off (longer after each failure, reset
once an engine is ready). After a coordinator restart, a unit recorded on a node that has not
reconnected yet waits for it a while, so an engine that outlived the coordinator is taken
back instead of loaded twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from coordinator.policy import UnitKey

RESTORE_GRACE_S = 15.0  # after a restart, how long a unit waits for its nodes to reconnect
RESTORE_WAIT = "waiting up to"  # how a restore_wait reason begins
RELOAD_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # after an engine exits or fails to load


@dataclass(slots=True)
class _Backoff:
    failures: int = 0
    not_before: float = 0.0


class PlacementHolds:
    """Backoffs and restore waits per unit. Use from the event loop."""

    def __init__(self, placements: Iterable[tuple[str, str, str, str]]) -> None:
        """`placements`: the store's (engine id, model, node id, tier) from before a restart."""
        self._started = time.monotonic()
        self._restoring: dict[UnitKey, set[str]] = {}
        for _engine_id, model, node_id, tier in placements:
            self._restoring.setdefault((model, tier), set()).add(node_id)  # type: ignore[arg-type]
        self._backoff: dict[UnitKey, _Backoff] = {}

    def failed(self, key: UnitKey) -> None:
        """An engine of this unit exited or failed to load: wait before loading it again."""
        b = self._backoff.setdefault(key, _Backoff())
        delay = RELOAD_BACKOFF_S[min(b.failures, len(RELOAD_BACKOFF_S) - 1)]
        b.failures += 1
        b.not_before = time.monotonic() + delay

    def ready(self, key: UnitKey) -> None:
        self._backoff.pop(key, None)

    def backing_off(self, key: UnitKey) -> bool:
        backoff = self._backoff.get(key)
        return backoff is not None and time.monotonic() < backoff.not_before

    def restore_wait(self, key: UnitKey, connected: Iterable[str]) -> str | None:
        """Why to hold off placing (a node that ran this unit may still come back), or None."""
        nodes = self._restoring.get(key)
        if not nodes:
            return None
        nodes -= set(connected)
        if not nodes or time.monotonic() - self._started > RESTORE_GRACE_S:
            del self._restoring[key]
            return None
        return f"{RESTORE_WAIT} {RESTORE_GRACE_S:.0f} s for {', '.join(sorted(nodes))} to reconnect"
