"""A peer copy's staging folder: which bytes of which file are in, and whether they hash right.

node_agent/peer_copy.py writes each manifest file at its offsets into a hidden `.NAME.part`
beside where it belongs (a manifest never lists hidden files, so the names cannot collide),
and records every written range here. The record, `.mlxfleet-copy.json` in the folder, is
saved atomically, so a later copy keeps exactly the bytes it vouches for:

    {"digest": "<manifest digest>", "files": {"path": {"size": N, "sha256": "...",
     "verified": false, "done": [[start, end], ...]}}}

Each file's hash advances over its contiguous prefix while the rest arrives, so a complete file
waits only for its last bytes to be hashed; a match moves it to its own name.

Bytes are not fsynced: a power cut can lose written bytes the record counts, and then the hash
check catches it and the file is fetched again (rare, and cheaper than syncing every second).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxfleet.manifest import Manifest, ManifestFile

MIB = 1 << 20
RECORD_FILE = ".mlxfleet-copy.json"
HASH_READ_BYTES = 4 * MIB
HASH_STEP_BYTES = 256 * MIB  # hashed per call of hash_written at most


@dataclass(eq=False)
class StagedFile:
    """One manifest file in the staging folder, and which holders may still give it.

    The copy's lock guards `done`, `served_by`, `bad` and `only`; the hash fields belong to
    the one thread that hashes."""

    entry: ManifestFile
    final: Path
    part: Path
    done: list[list[int]] = field(default_factory=list)  # sorted, disjoint [start, end)
    verified: bool = False
    served_by: set[str] = field(default_factory=set)  # holders that sent this attempt's bytes
    bad: dict[str, str] = field(default_factory=dict)  # node id -> why it cannot give this file
    only: str | None = None  # after a hash mismatch: the one holder fetching it
    refetches: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)
    hashed_to: int = 0

    def add(self, start: int, end: int) -> None:
        """Record [start, end) as written."""
        i = bisect.bisect_left(self.done, [start, start])
        self.done.insert(i, [start, end])
        merged: list[list[int]] = []
        for a, b in self.done:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.done[:] = merged

    def done_bytes(self) -> int:
        return self.entry.size if self.verified else sum(b - a for a, b in self.done)

    def complete(self) -> bool:
        return self.entry.size == 0 or self.done == [[0, self.entry.size]]

    def gaps(self) -> list[tuple[int, int]]:
        """The ranges still to fetch."""
        found, at = [], 0
        for a, b in [*self.done, [self.entry.size, self.entry.size]]:
            if a > at:
                found.append((at, a))
            at = max(at, b)
        return found

    def hashed_prefix(self) -> int:
        """Where the written bytes from the start end (what may be hashed)."""
        return self.done[0][1] if self.done and self.done[0][0] == 0 else 0

    def hash_to(self, ready: int, budget: int) -> int:
        """Hash on up to `ready` (at most `budget` bytes); returns how many were read."""
        read = 0
        with open(self.part, "rb") as part:
            part.seek(self.hashed_to)
            while self.hashed_to < ready and read < budget:
                data = part.read(min(HASH_READ_BYTES, ready - self.hashed_to))
                if not data:
                    break
                self.hasher.update(data)
                self.hashed_to += len(data)
                read += len(data)
        return read

    def matches(self) -> bool | None:
        """Whether the complete file hashes right; None until it is complete and hashed."""
        if not self.complete() or self.hashed_to != self.entry.size:
            return None
        return bool(self.hasher.hexdigest() == self.entry.sha256)

    def keep(self) -> None:
        os.replace(self.part, self.final)
        self.verified = True

    def discard(self) -> None:
        """Forget every byte of the current attempt; the bad bytes must not survive a resume."""
        self.done, self.served_by, self.hasher, self.hashed_to = [], set(), hashlib.sha256(), 0
        with open(self.part, "r+b") as part:
            part.truncate(0)
            part.truncate(self.entry.size)


def hash_written(files: list[StagedFile], lock: threading.Lock) -> None:
    """Advance each file's hash over the bytes written from its start, HASH_STEP_BYTES in
    all at most (so that the copy's other checks stay on time). Blocking: run it in a thread."""
    budget = HASH_STEP_BYTES
    for f in files:
        with lock:
            ready = 0 if f.verified else f.hashed_prefix()
        if f.hashed_to < ready and budget > 0:
            budget -= f.hash_to(ready, budget)


def load(dest: Path, manifest: Manifest) -> list[StagedFile]:
    """The manifest's files in `dest`: what the record and the disk vouch for is kept, a file
    already at its own name counts when it hashes right; every other `.part` is made."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        saved = json.loads((dest / RECORD_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        saved = {}
    files = []
    for entry in manifest.files:
        final = dest / entry.path
        f = StagedFile(entry, final, final.with_name(f".{final.name}.part"))
        record = saved.get(entry.path) or {}
        same = record.get("sha256") == entry.sha256 and record.get("size") == entry.size
        if _size(final) == entry.size and (
            (same and record.get("verified")) or _sha256(final) == entry.sha256
        ):
            f.verified = True
        else:
            final.unlink(missing_ok=True)
            if same and _size(f.part) == entry.size:
                for a, b in record.get("done", []):
                    if 0 <= int(a) < int(b) <= entry.size:
                        f.add(int(a), int(b))
            final.parent.mkdir(parents=True, exist_ok=True)
            with open(f.part, "ab") as part:
                part.truncate(entry.size)  # sparse: only recorded ranges count
        files.append(f)
    return files


def save(dest: Path, manifest: Manifest, files: list[StagedFile], lock: threading.Lock) -> None:
    """Write the record atomically; `lock` is the copy's (taken to read the ranges)."""
    with lock:
        record = {
            f.entry.path: {
                "size": f.entry.size,
                "sha256": f.entry.sha256,
                "verified": f.verified,
                "done": [list(r) for r in f.done],
            }
            for f in files
        }
    tmp = dest / f"{RECORD_FILE}.tmp"
    tmp.write_text(json.dumps({"digest": manifest.digest, "files": record}))
    os.replace(tmp, dest / RECORD_FILE)  # a crash never leaves half a record


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(HASH_READ_BYTES):
            h.update(data)
    return h.hexdigest()
