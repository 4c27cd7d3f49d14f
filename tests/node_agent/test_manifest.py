"""Building a model folder's manifest: the files an engine loads, hashed once (cached)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from mlxfleet.manifest import ManifestError, ManifestFile
from node_agent import manifest as manifest_module
from node_agent.manifest import (
    HashCache,
    HashingStopped,
    build_manifest,
    hash_file,
    model_files,
    verify_file,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_model(folder: Path) -> dict[str, bytes]:
    """A model folder as a download leaves it, with files an engine does not load."""
    files = {
        "config.json": b'{"model_type": "llama"}',
        "model.safetensors": os.urandom(3 * 2**20 + 17),  # several reads, a partial last one
        "tokenizer.json": b"{}",
        "sub/extra.json": b"[]",
    }
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    (folder / "README.md").write_text("not loaded")
    (folder / "weights.bin").write_bytes(b"not loaded")
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "x.json").write_text("{}")  # hidden: left out
    (folder / ".hidden.json").write_text("{}")
    return files


def test_the_manifest_lists_the_loaded_files_with_their_hashes(tmp_path: Path) -> None:
    files = make_model(tmp_path)
    manifest = build_manifest("org/demo", tmp_path)
    assert manifest.source == "org/demo"
    assert [f.path for f in manifest.files] == sorted(files)
    for f in manifest.files:
        assert (f.size, f.sha256) == (len(files[f.path]), sha(files[f.path]))
    assert manifest.total_bytes == sum(len(d) for d in files.values())
    assert model_files(tmp_path) == sorted(files)


def test_a_folder_without_model_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(ManifestError, match="holds no model files"):
        build_manifest("x", tmp_path)


def test_the_cache_spares_rehashing_until_size_or_mtime_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    files = make_model(folder)
    cache_path = tmp_path / "hashes.json"
    first = build_manifest("m", folder, HashCache(cache_path))
    assert cache_path.is_file()

    hashed: list[str] = []
    real = manifest_module.hash_file

    def counting(path: Path, stop: threading.Event | None = None) -> str:
        hashed.append(path.name)
        return real(path, stop)

    monkeypatch.setattr(manifest_module, "hash_file", counting)
    # A restart: a new cache object read from the file hashes nothing.
    assert build_manifest("m", folder, HashCache(cache_path)) == first
    assert hashed == []
    # A file rewritten (new mtime) is hashed again, and only it.
    (folder / "config.json").write_bytes(b'{"model_type": "qwen"}')
    again = build_manifest("m", folder, HashCache(cache_path))
    assert hashed == ["config.json"]
    assert again.file("config.json") == ManifestFile(
        "config.json", 22, sha(b'{"model_type": "qwen"}')
    )
    assert again.digest != first.digest
    assert again.file("model.safetensors") == first.file("model.safetensors")
    # A byte flipped with size and mtime kept is not noticed here (the copy's check finds it).
    weights = folder / "model.safetensors"
    st = weights.stat()
    data = bytearray(files["model.safetensors"])
    data[10] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert build_manifest("m", folder, HashCache(cache_path)).file("model.safetensors") == (
        first.file("model.safetensors")
    )


def test_a_damaged_cache_file_is_ignored(tmp_path: Path) -> None:
    make_model(tmp_path / "m")
    (tmp_path / "hashes.json").write_text("{not json")
    cache = HashCache(tmp_path / "hashes.json")
    manifest = build_manifest("m", tmp_path / "m", cache)
    assert len(manifest.files) == 4


def test_verify_file_checks_size_and_hash(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"hello")
    good = ManifestFile("f", 5, sha(b"hello"))
    assert verify_file(path, good)
    assert not verify_file(path, ManifestFile("f", 5, sha(b"jello")))
    assert not verify_file(path, ManifestFile("f", 6, sha(b"hello")))
    assert not verify_file(tmp_path / "missing", good)


def test_hashing_stops_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"\0" * (manifest_module.READ_BYTES + 1))
    stop = threading.Event()
    stop.set()
    with pytest.raises(HashingStopped):
        hash_file(path, stop)
    assert hash_file(path) == sha(path.read_bytes())


def test_a_hub_cache_link_to_an_lfs_blob_is_not_read(tmp_path: Path) -> None:
    """snapshots/<rev>/model.safetensors -> ../../blobs/<sha256>: the blob's name is its hash
    (the hub's LFS hash); a git blob (40 hex digits) is hashed."""
    weights, config = os.urandom(1000), b"{}"
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    lfs_name = sha(weights)
    (blobs / lfs_name).write_bytes(b"x" * len(weights))  # not the bytes: proves it is not read
    (blobs / ("a" * 40)).write_bytes(config)
    snapshot = tmp_path / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(Path("../../blobs") / lfs_name)
    (snapshot / "config.json").symlink_to(Path("../../blobs") / ("a" * 40))
    manifest = build_manifest("org/m", snapshot)
    assert manifest.file("model.safetensors") == ManifestFile(
        "model.safetensors", len(weights), lfs_name
    )
    assert manifest.file("config.json") == ManifestFile("config.json", 2, sha(config))
