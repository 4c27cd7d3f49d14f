"""Building a model folder's manifest: each file an engine loads, with its size and SHA-256.

A manifest (mlxfleet/manifest.py) is how the fleet names a model's files: the coordinator keeps
the first one per source, copies are verified against it, and the file server serves only the
files it lists. The files are those a hub download fetches (HUB_ALLOW_PATTERNS), by path
relative to the folder, hidden files left out (a hub download's own `.cache/` among them).

Hashing a 40 GB folder takes most of a minute, so results are cached in a JSON file keyed by
(path, size, mtime_ns): an agent restart, or a second load of the same folder, reads no bytes.
A file changed in place keeps its cached hash only if its size and modification time are both
kept, which is what a corrupted disk looks like; copies from it then fail verification on the
receiving node, which is where it matters. Files in a Hugging Face cache that are links to an
LFS blob are not read at all: the blob's name is the hub's SHA-256 of its content.

Blocking, like all file reads: callers run these in a thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from mlxfleet.manifest import Manifest, ManifestError, ManifestFile
from node_agent.model_source import is_model_file

logger = logging.getLogger(__name__)

READ_BYTES = 8 * 2**20  # one read while hashing: large enough that syscalls do not count
HEX = frozenset("0123456789abcdef")


class HashingStopped(Exception):
    """Hashing was stopped (the agent is shutting down) before it finished."""


def model_files(folder: Path) -> list[str]:
    """The relative "/"-separated paths of the files an engine loads from the folder, sorted."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath).relative_to(folder)
        for name in filenames:
            path = (base / name).as_posix()
            if is_model_file(path) and os.path.isfile(os.path.join(dirpath, name)):
                found.append(path)
    return sorted(found)


def hash_file(path: Path, stop: threading.Event | None = None) -> str:
    """The file's SHA-256, lowercase hex; HashingStopped once `stop` is set."""
    digest = hashlib.sha256()
    buffer = bytearray(READ_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            if stop is not None and stop.is_set():
                raise HashingStopped(str(path))
    return digest.hexdigest()


def verify_file(path: Path, expected: ManifestFile) -> bool:
    """True when the file at `path` has the manifest's size and SHA-256."""
    try:
        if path.stat().st_size != expected.size:
            return False
        return hash_file(path) == expected.sha256
    except OSError:
        return False


def lfs_sha256(path: Path) -> str | None:
    """The SHA-256 a Hugging Face cache link names: snapshots/<rev>/<file> -> blobs/<sha256>
    for LFS files (other files' blobs are named by a 40-digit git hash)."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    name = target.name
    if target.parent.name == "blobs" and len(name) == 64 and set(name) <= HEX:
        return name
    return None


class HashCache:
    """SHA-256 of files by (absolute path, size, mtime_ns), kept in a JSON file. Thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._files: dict[str, tuple[int, int, str]] = {}
        try:
            raw = json.loads(path.read_text())
            for name, (size, mtime_ns, sha) in raw["files"].items():
                if os.path.exists(name):  # forget files that are gone
                    self._files[name] = (int(size), int(mtime_ns), str(sha))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring the hash cache %s: %s", path, exc)

    def get(self, path: Path, st: os.stat_result) -> str | None:
        with self._lock:
            known = self._files.get(str(path))
        if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
            return known[2]
        return None

    def put(self, path: Path, st: os.stat_result, sha256: str) -> None:
        with self._lock:
            self._files[str(path)] = (st.st_size, st.st_mtime_ns, sha256)

    def save(self) -> None:
        """Write the file atomically (a crash never leaves half of it)."""
        with self._lock:
            text = json.dumps({"files": {k: list(v) for k, v in self._files.items()}})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{threading.get_ident()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)


def build_manifest(
    source: str,
    folder: Path,
    cache: HashCache | None = None,
    stop: threading.Event | None = None,
) -> Manifest:
    """The manifest of the files an engine loads from `folder`, hashing only what the cache
    does not know. ManifestError for a folder with none of them; OSError if one is unreadable."""
    folder = folder.absolute()
    files: list[ManifestFile] = []
    hashed = 0
    for relative in model_files(folder):
        path = folder / relative
        st = path.stat()
        sha = (cache.get(path, st) if cache is not None else None) or lfs_sha256(path)
        if sha is None:
            sha = hash_file(path, stop)
            hashed += st.st_size
            if cache is not None:
                cache.put(path, st, sha)
        files.append(ManifestFile(relative, st.st_size, sha))
    if cache is not None and hashed:
        cache.save()
    if not files:
        raise ManifestError(f"{folder} holds no model files")
    if hashed:
        logger.info("hashed %.1f MiB of model files in %s", hashed / 2**20, folder)
    return Manifest.of(source, files)
