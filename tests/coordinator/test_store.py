"""The SQLite store keeps keys hashed and survives a reopen."""

from __future__ import annotations

from pathlib import Path

from coordinator.store import API_KEY_PREFIX, Store, hash_secret


def test_api_keys_are_stored_hashed(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = Store(path)
    key = store.create_api_key("team")
    assert key.startswith(API_KEY_PREFIX) and len(key) > 40
    assert store.api_key_name(key) == "team"
    assert store.api_key_name(key + "x") is None
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert key.encode() not in raw
    assert hash_secret(key).encode() in raw
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_preset_key_and_revoke(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    assert store.create_api_key("up", "mlxf-preset") == "mlxf-preset"
    store.create_api_key("team")
    assert store.revoke_api_keys("up") == 1
    assert store.api_key_name("mlxf-preset") is None
    assert store.api_key_count() == 1


def test_state_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = Store(path)
    store.save_node("mini-1", "node-key", "mini", {"chip": "Apple M2"})
    store.save_placement("e1", "demo", "mini-1", "interactive")
    store.add_event("mini-1", "engine_exited", "demo engine e1: sigkill")
    store.close()
    store = Store(path)
    assert store.node_key_matches("mini-1", "node-key")
    assert not store.node_key_matches("mini-1", "other")
    assert not store.node_key_matches("ghost", "node-key")
    assert store.placements() == [("e1", "demo", "mini-1", "interactive")]
    [event] = store.events()
    assert (event.node_id, event.kind) == ("mini-1", "engine_exited")
