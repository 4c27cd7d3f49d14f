"""A model's files, content-addressed: each file's path, size and SHA-256.

The node that first gets a model (from the hub or a local folder) records its manifest; the
coordinator keeps the first one per source and hands it, with the nodes holding the files, to
every node that must copy them. Copies are verified file by file against it. Two manifests of
the same files have the same digest, whatever order they were listed in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from mlxfleet.v1 import fleet_pb2 as pb


class ManifestError(ValueError):
    """A manifest that cannot be trusted: a path outside the folder, a bad hash or size."""


@dataclass(frozen=True, slots=True)
class ManifestFile:
    path: str  # relative, "/"-separated, never "..", never absolute
    size: int
    sha256: str  # 64 lowercase hex digits


def check_path(path: str) -> str:
    """The path if it names a file inside a model folder, else ManifestError."""
    parts = PurePosixPath(path).parts
    if not path or path.startswith("/") or "\\" in path or not parts or ".." in parts:
        raise ManifestError(f"{path!r} is not a relative path inside the model folder")
    if any(p.startswith(".") for p in parts):
        raise ManifestError(f"{path!r}: hidden files are not model files")
    return path


def _check(file: ManifestFile) -> ManifestFile:
    check_path(file.path)
    if file.size < 0:
        raise ManifestError(f"{file.path}: negative size")
    if len(file.sha256) != 64 or any(c not in "0123456789abcdef" for c in file.sha256):
        raise ManifestError(f"{file.path}: sha256 must be 64 lowercase hex digits")
    return file


@dataclass(frozen=True, slots=True)
class Manifest:
    source: str
    files: tuple[ManifestFile, ...]  # sorted by path

    @classmethod
    def of(cls, source: str, files: list[ManifestFile] | tuple[ManifestFile, ...]) -> Manifest:
        """A checked manifest: files sorted by path, each path once."""
        ordered = tuple(sorted((_check(f) for f in files), key=lambda f: f.path))
        paths = [f.path for f in ordered]
        if len(set(paths)) != len(paths):
            raise ManifestError("a path is listed twice")
        return cls(source, ordered)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def digest(self) -> str:
        """SHA-256 of the file list (path, size, hash per line): equal lists, equal digests."""
        text = "".join(f"{f.path}\t{f.size}\t{f.sha256}\n" for f in self.files)
        return hashlib.sha256(text.encode()).hexdigest()

    def file(self, path: str) -> ManifestFile | None:
        return next((f for f in self.files if f.path == path), None)

    # Wire and disk forms
    def to_pb(self) -> pb.ModelManifest:
        return pb.ModelManifest(
            source=self.source,
            files=[pb.ModelFile(path=f.path, size=f.size, sha256=f.sha256) for f in self.files],
        )

    @classmethod
    def from_pb(cls, message: pb.ModelManifest) -> Manifest | None:
        """None for an empty manifest (the coordinator knows none); ManifestError if bad."""
        if not message.files:
            return None
        return cls.of(
            message.source, [ManifestFile(f.path, f.size, f.sha256) for f in message.files]
        )

    def to_json(self) -> str:
        return json.dumps(
            {"source": self.source, "files": [[f.path, f.size, f.sha256] for f in self.files]}
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            raw: Any = json.loads(text)
            files = [ManifestFile(str(p), int(s), str(h)) for p, s, h in raw["files"]]
            return cls.of(str(raw["source"]), files)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ManifestError):
                raise
            raise ManifestError(f"not a manifest: {exc}") from None
