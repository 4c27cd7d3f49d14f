"""The SQLite store keeps keys hashed and survives a reopen."""

from __future__ import annotations

from pathlib import Path

from coordinator.store import API_KEY_PREFIX, ApiKey, Store, hash_secret


def test_api_keys_are_stored_hashed(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = Store(path)
    key = store.create_api_key("team")
    assert key.startswith(API_KEY_PREFIX) and len(key) > 40
    assert store.api_key(key) == ApiKey(
        "team", "interactive,batch", "interactive", None, None, frozenset()
    )
    assert store.api_key(key + "x") is None
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
    assert store.api_key("mlxf-preset") is None
    assert store.api_key_count() == 1


def test_key_limits_are_stored_and_listed(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    limited = store.create_api_key(
        "etl", tiers="batch", default_tier="batch", rpm=2, tpm=5000, models=frozenset({"b", "a"})
    )
    store.create_api_key("team")
    record = store.api_key(limited)
    assert record == ApiKey("etl", "batch", "batch", 2, 5000, frozenset({"a", "b"}))
    assert [k.name for k in store.api_keys()] == ["etl", "team"]
    assert store.api_keys()[1].models == frozenset()


def test_a_version_3_store_gets_key_limits_and_keeps_its_keys(tmp_path: Path) -> None:
    """Keys made before limits existed keep working, with no limits."""
    import sqlite3

    path = tmp_path / "s.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE api_keys (
            key_hash     TEXT PRIMARY KEY,
            name         TEXT NOT NULL,
            created_at   REAL NOT NULL,
            tiers        TEXT NOT NULL DEFAULT 'interactive,batch',
            default_tier TEXT NOT NULL DEFAULT 'interactive'
        );
        PRAGMA user_version = 3;
        """
    )
    db.execute(
        "INSERT INTO api_keys VALUES (?, 'old', 1.0, 'batch', 'batch')", (hash_secret("mlxf-old"),)
    )
    db.commit()
    db.close()
    store = Store(path)
    assert store.api_key("mlxf-old") == ApiKey("old", "batch", "batch", None, None, frozenset())
    new = store.create_api_key("new", rpm=3, models=frozenset({"demo"}))
    assert store.api_key(new) == ApiKey(
        "new", "interactive,batch", "interactive", 3, None, frozenset({"demo"})
    )
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 4
    db.close()
    assert Store(path).api_key_count() == 2  # a second open migrates nothing twice


def test_state_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = Store(path)
    store.save_node("mini-1", "mini", {"chip": "Apple M2"})
    store.save_placement("e1", "demo", "mini-1", "interactive")
    store.add_event("mini-1", "engine_exited", "demo engine e1: sigkill")
    store.close()
    store = Store(path)
    assert store.node_is_active("mini-1")
    assert not store.node_is_active("ghost")
    assert store.enrolled_nodes() == [("mini-1", "mini", {"chip": "Apple M2"}, None)]
    assert store.placements() == [("e1", "demo", "mini-1", "interactive")]
    [event] = store.events()
    assert (event.node_id, event.kind) == ("mini-1", "engine_exited")


def test_join_tokens_expire_and_run_out(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    two = store.create_join_token(ttl_s=3600, uses=2)
    assert store.consume_join_token(two) is None
    assert store.consume_join_token(two) is None
    assert store.consume_join_token(two) == "join token used up"
    assert (
        store.consume_join_token(store.create_join_token(ttl_s=-1, uses=5)) == "join token expired"
    )
    assert store.consume_join_token("never-issued") == "unknown join token"
    raw = (tmp_path / "s.sqlite3").read_bytes()
    assert two.encode() not in raw


def test_revocation_keeps_the_id_taken(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    store.save_node("mini-1", "mini", {})
    assert store.revoke_node("mini-1")
    assert not store.revoke_node("mini-1")  # already revoked
    assert not store.node_is_active("mini-1")
    assert store.node_known("mini-1")
    assert store.revoked_nodes() == {"mini-1"}
    assert store.enrolled_nodes() == []


def test_a_version_1_store_is_migrated(tmp_path: Path) -> None:
    """Stores from the shared-token days held node keys; those nodes enroll again."""
    import sqlite3

    path = tmp_path / "s.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE nodes (node_id TEXT PRIMARY KEY, key_hash TEXT NOT NULL)")
    db.execute("INSERT INTO nodes VALUES ('old', 'h')")
    db.commit()
    db.close()
    store = Store(path)
    assert store.enrolled_nodes() == []
    store.save_node("new", "n", {})
    assert store.node_is_active("new")
