"""Node liveness from heartbeats: a silent node is suspect (its engines leave the router),
then dead (disconnected; its models are placed again)."""

from __future__ import annotations

import logging
import time

from coordinator.config import Config
from coordinator.registry import Registry
from coordinator.store import Store

logger = logging.getLogger(__name__)


def check_liveness(registry: Registry, store: Store, config: Config) -> None:
    """Mark nodes silent past suspect_after_s suspect and past dead_after_s dead."""
    now = time.monotonic()
    for node in list(registry.nodes.values()):
        silent_s = now - node.last_heartbeat
        if silent_s > config.dead_after_s:
            logger.warning("node %s silent for %.1f s: dead", node.node_id, silent_s)
            store.add_event(node.node_id, "node_dead", f"no heartbeat for {silent_s:.1f} s")
            registry.disconnect(node.node_id)
        elif silent_s > config.suspect_after_s and node.liveness == "live":
            logger.warning("node %s silent for %.1f s: suspect", node.node_id, silent_s)
            registry.mark_suspect(node.node_id)  # unroute first, then record it
            store.add_event(node.node_id, "node_suspect", f"no heartbeat for {silent_s:.1f} s")
