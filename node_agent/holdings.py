"""The model files this node holds: a ledger of folders, their manifests and their use.

Two kinds of holding. Store models are copies and downloads under the store's root
(node_agent/model_store.py), each with a record file inside its folder (source, manifest, last
use), so a restart finds them and deleting the folder forgets it; they are evictable. Folders
used in place (the user's own, or the Hugging Face cache) are never evicted nor counted in the
disk budget, and are forgotten at restart until an engine uses them again.

A folder an engine runs from is in use (acquire/release) and never evicted; so is a source
being fetched (pinned), so that a second load cannot lose the folder the first is about to
start from. Every holding with a manifest is complete and verified; the ledger lists those in
the file server's index, rewritten atomically whenever they change:

    {"models": {"<digest>": {"folder": "/abs", "files": [["path", size, "sha256"], ...]}}}

Use from the event loop.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mlxfleet.manifest import Manifest

logger = logging.getLogger(__name__)

RECORD = ".mlxfleet-model.json"  # a store model's record, inside its folder


@dataclass(frozen=True, slots=True)
class HeldModel:
    """A model's files complete and verified on this node (a heartbeat's HeldModel)."""

    source: str
    digest: str
    bytes: int
    in_use: bool
    evictable: bool  # in the store (a folder used in place never is)


@dataclass(slots=True)
class Holding:
    source: str
    folder: Path
    manifest: Manifest | None  # None while an in-place folder is being hashed
    in_place: bool
    last_used: float = field(default_factory=time.time)

    @property
    def bytes(self) -> int:
        return self.manifest.total_bytes if self.manifest is not None else 0

    def record(self) -> dict[str, object]:
        assert self.manifest is not None
        return {
            "source": self.source,
            "manifest": json.loads(self.manifest.to_json()),
            "last_used": self.last_used,
        }


def write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # a crash never leaves half a file


class Holdings:
    """Folders by path; what is in use; the file server's index. Use from the event loop."""

    def __init__(self, index_path: Path) -> None:
        self.index_path = index_path
        self._by_folder: dict[Path, Holding] = {}
        self._refs: Counter[Path] = Counter()  # engines running from a folder
        self._pins: Counter[str] = Counter()  # sources being fetched

    def open(self, root: Path) -> None:
        """Read the store models' records under root; delete a model whose files are missing
        or cut short (a store folder is complete, or it is nothing)."""
        for folder in sorted(root.iterdir()):
            if folder.name.startswith(".") or not (folder / RECORD).is_file():
                continue
            try:
                raw = json.loads((folder / RECORD).read_text())
                manifest = Manifest.from_json(json.dumps(raw["manifest"]))
                last_used = float(raw["last_used"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("ignoring %s: unreadable record (%s)", folder, exc)
                continue
            missing = [f.path for f in manifest.files if not _has_size(folder / f.path, f.size)]
            if missing:
                logger.warning("deleting %s: %s missing or cut short", folder, missing[0])
                shutil.rmtree(folder, ignore_errors=True)
                continue
            self._by_folder[folder] = Holding(manifest.source, folder, manifest, False, last_used)
        self.write_index()

    # Reading
    def get(self, folder: Path) -> Holding | None:
        return self._by_folder.get(folder)

    def held(self) -> list[HeldModel]:
        return [
            HeldModel(h.source, h.manifest.digest, h.bytes, self.in_use(h), not h.in_place)
            for h in self._by_folder.values()
            if h.manifest is not None
        ]

    def manifests(self) -> list[Manifest]:
        return [h.manifest for h in self._by_folder.values() if h.manifest is not None]

    def stored(self, source: str, manifest: Manifest | None) -> Holding | None:
        """The store's latest model of the source (with the manifest's files, when given)."""
        found = [
            h
            for h in self._by_folder.values()
            if not h.in_place
            and h.source == source
            and h.manifest is not None
            and (manifest is None or h.manifest.digest == manifest.digest)
        ]
        return max(found, key=lambda h: h.last_used) if found else None

    def stored_bytes(self) -> int:
        """Bytes of the store's models (folders used in place are not counted)."""
        return sum(h.bytes for h in self._by_folder.values() if not h.in_place)

    def in_use(self, h: Holding) -> bool:
        return self._refs[h.folder] > 0

    def evictable(self) -> list[Holding]:
        """Store models no engine uses and no load is fetching, least recently used first."""
        found = [
            h
            for h in self._by_folder.values()
            if not h.in_place and not self.in_use(h) and h.source not in self._pins
        ]
        return sorted(found, key=lambda h: h.last_used)

    # Changing
    def use_in_place(self, source: str, folder: Path) -> Holding:
        holding = self._by_folder.get(folder)
        if holding is None:
            holding = self._by_folder[folder] = Holding(source, folder, None, in_place=True)
        return holding

    def set_manifest(self, holding: Holding, manifest: Manifest) -> None:
        if holding.manifest != manifest:
            holding.manifest = manifest
            self.write_index()

    def add(self, holding: Holding) -> None:
        self._by_folder[holding.folder] = holding
        self.write_index()

    def forget(self, holdings: list[Holding]) -> None:
        """Take models out of the ledger (and the index) before their folders are deleted."""
        for h in holdings:
            self._by_folder.pop(h.folder, None)
        if holdings:
            self.write_index()

    def pin(self, source: str) -> None:
        self._pins[source] += 1

    def unpin(self, source: str) -> None:
        self._pins[source] -= 1
        if self._pins[source] <= 0:
            del self._pins[source]

    def acquire(self, folder: Path) -> None:
        """An engine runs from `folder`: it is not evicted until released."""
        self._refs[folder] += 1
        self._touch(folder)

    def release(self, folder: Path) -> None:
        self._refs[folder] -= 1
        if self._refs[folder] <= 0:
            del self._refs[folder]
        self._touch(folder)

    def _touch(self, folder: Path) -> None:
        holding = self._by_folder.get(folder)
        if holding is None:
            return
        holding.last_used = time.time()
        if not holding.in_place:
            try:
                write_json(folder / RECORD, holding.record())
            except OSError as exc:
                logger.warning("cannot record the use of %s: %s", folder, exc)

    def write_index(self) -> None:
        """The file server's index: the complete, verified holdings, by manifest digest."""
        models = {
            h.manifest.digest: {
                "folder": str(h.folder),
                "files": [[f.path, f.size, f.sha256] for f in h.manifest.files],
            }
            for h in self._by_folder.values()
            if h.manifest is not None
        }
        try:
            self.index_path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.index_path, {"models": models})
        except OSError as exc:
            logger.warning("cannot write the file server's index %s: %s", self.index_path, exc)


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False
