"""Where each model's files are: manifests, holders, copies in progress and disk room.

The node that first gets a model's files (from the hub or a local folder) sends their
manifest (path, size, SHA-256 per file; mlxfleet/manifest.py); the coordinator keeps the first
one per source in the store, so a restart forgets nothing. Every heartbeat says which files a
node holds (by manifest digest), which it is copying and how much disk room it has; the
registry keeps the latest. From those this module answers placement (who holds a source, how
many bytes a copy takes) and the agents (who to copy from, best first), and feeds
`mlxfleet models`, the status page and the metrics.

A node whose files for a source differ from the recorded manifest (another revision in a local
folder of the same path) serves itself from them but is never offered as a holder: a copy is
verified against the recorded manifest, and its files would fail.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coordinator.store import Store
from mlxfleet.manifest import Manifest, ManifestError

if TYPE_CHECKING:
    from coordinator.registry import Node

logger = logging.getLogger(__name__)

GIB = 2**30
MIB = 2**20


@dataclass(frozen=True, slots=True)
class HeldFiles:
    """A model's files complete and verified on a node (a heartbeat's HeldModel)."""

    source: str
    digest: str  # of the manifest they match
    bytes: int
    in_use: bool = False
    evictable: bool = False


@dataclass(frozen=True, slots=True)
class FileCopy:
    """A copy in progress onto a node (a heartbeat's ModelCopy)."""

    source: str
    bytes_done: int
    bytes_total: int
    bytes_per_s: float
    origin: str  # "peer" or "hub"
    from_nodes: tuple[str, ...] = ()

    def describe(self) -> str:
        """ "45% of 1.2 GiB from peer vm-1 at 80.0 MiB/s"."""
        share = self.bytes_done / self.bytes_total if self.bytes_total else 0.0
        origin = f"peer {', '.join(self.from_nodes)}" if self.from_nodes else self.origin
        return (
            f"{share:.0%} of {self.bytes_total / GIB:.1f} GiB from {origin}"
            f" at {self.bytes_per_s / MIB:.1f} MiB/s"
        )


class Holdings:
    """Manifests by source (stored), and what the nodes' heartbeats say about them."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._manifests: dict[str, Manifest] = {}
        for source, text in store.manifests().items():
            try:
                self._manifests[source] = Manifest.from_json(text)
            except ManifestError as exc:  # written by us: only a damaged store gets here
                logger.warning("ignoring the stored manifest of %s: %s", source, exc)
        self._differs: set[tuple[str, str]] = set()  # (node, source) already reported

    def note_manifest(self, node_id: str, manifest: Manifest) -> None:
        """A node recorded a source's files: the first manifest of a source is kept."""
        known = self._manifests.get(manifest.source)
        if known is None:
            self._manifests[manifest.source] = manifest
            self._store.save_manifest(manifest.source, manifest.to_json(), node_id)
            logger.info(
                "recorded the files of %s: %d files, %.2f GiB, first held by %s",
                manifest.source,
                len(manifest.files),
                manifest.total_bytes / GIB,
                node_id,
            )
        elif known.digest != manifest.digest and (node_id, manifest.source) not in self._differs:
            self._differs.add((node_id, manifest.source))
            detail = f"{manifest.source}: files differ from the fleet's manifest; not copied from"
            logger.warning("node %s: %s", node_id, detail)
            self._store.add_event(node_id, "files_differ", detail)

    def manifest(self, source: str) -> Manifest | None:
        return self._manifests.get(source)

    def disk_bytes(self, source: str) -> int:
        """Bytes a copy of the source's files takes; 0 while no node has recorded them."""
        manifest = self._manifests.get(source)
        return manifest.total_bytes if manifest is not None else 0

    def held(self, node: Node) -> frozenset[str]:
        """Sources whose files the node holds as the fleet recorded them (any files of a
        source with no manifest yet)."""
        if node.status is None:
            return frozenset()
        return frozenset(
            h.source
            for h in node.status.held
            if (m := self._manifests.get(h.source)) is None or m.digest == h.digest
        )

    def holders(self, source: str, nodes: Iterable[Node]) -> list[tuple[str, str]]:
        """(node id, files URL) of the live nodes that can serve the source's files, best
        first: servers before laptops (always on, wired), then the fewest copies served now,
        then by id."""
        nodes = list(nodes)
        serving = _serving(nodes)
        able = [n for n in nodes if n.liveness == "live" and n.files_url and source in self.held(n)]
        able.sort(key=lambda n: (n.facts.role == "laptop", serving.get(n.node_id, 0), n.node_id))
        return [(n.node_id, n.files_url) for n in able]

    def where(self, source: str, nodes: Iterable[Node]) -> tuple[list[str], dict[str, str]]:
        """For `mlxfleet models`: the nodes holding the files, and each copy under way."""
        nodes = sorted(nodes, key=lambda n: n.node_id)
        held = [str(n.node_id) for n in nodes if source in self.held(n)]
        copies = {
            str(n.node_id): c.describe()
            for n in nodes
            if n.status is not None
            for c in n.status.copies
            if c.source == source
        }
        return held, copies


def _serving(nodes: Iterable[Node]) -> dict[str, int]:
    """How many copies each node serves now, from the copying nodes' heartbeats."""
    counts: dict[str, int] = {}
    for node in nodes:
        for copy in node.status.copies if node.status is not None else ():
            for holder in copy.from_nodes:
                counts[holder] = counts.get(holder, 0) + 1
    return counts
