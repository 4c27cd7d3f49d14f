"""Manifests: one digest for the same files in any order, and no path that leaves the folder."""

from __future__ import annotations

import pytest

from mlxfleet.manifest import Manifest, ManifestError, ManifestFile

A = ManifestFile("model.safetensors", 10, "a" * 64)
B = ManifestFile("config.json", 2, "b" * 64)


def test_the_digest_depends_on_the_files_not_their_order() -> None:
    one, two = Manifest.of("org/m", [A, B]), Manifest.of("org/m", [B, A])
    assert one == two and one.digest == two.digest
    assert [f.path for f in one.files] == ["config.json", "model.safetensors"]
    assert one.total_bytes == 12 and one.file("config.json") == B and one.file("x") is None
    changed = Manifest.of("org/m", [A, ManifestFile("config.json", 2, "c" * 64)])
    assert changed.digest != one.digest
    assert Manifest.from_json(one.to_json()) == one
    assert Manifest.from_pb(one.to_pb()) == one


@pytest.mark.parametrize(
    ("file", "message"),
    [
        (ManifestFile("../etc/passwd", 1, "a" * 64), "not a relative path inside"),
        (ManifestFile("/etc/passwd", 1, "a" * 64), "not a relative path inside"),
        (ManifestFile("a\\..\\b", 1, "a" * 64), "not a relative path inside"),
        (ManifestFile("", 1, "a" * 64), "not a relative path inside"),
        (ManifestFile(".cache/x", 1, "a" * 64), "hidden files"),
        (ManifestFile("m", -1, "a" * 64), "negative size"),
        (ManifestFile("m", 1, "A" * 64), "64 lowercase hex"),
        (ManifestFile("m", 1, "a" * 63), "64 lowercase hex"),
    ],
)
def test_untrustworthy_entries_are_refused(file: ManifestFile, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.of("org/m", [file])


def test_a_path_listed_twice_and_broken_json_are_refused() -> None:
    with pytest.raises(ManifestError, match="listed twice"):
        Manifest.of("org/m", [A, A])
    with pytest.raises(ManifestError, match="not a manifest"):
        Manifest.from_json('{"source": "x"}')
    with pytest.raises(ManifestError, match="not a manifest"):
        Manifest.from_json("[]")
