"""The SQLite store keeps keys hashed and survives a reopen."""

from __future__ import annotations

from pathlib import Path

from coordinator.store import API_KEY_PREFIX, ApiKey, Store, hash_secret, key_id_of


def test_api_keys_are_stored_hashed(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = Store(path)
    key = store.create_api_key("team")
    assert key.startswith(API_KEY_PREFIX) and len(key) > 40
    assert store.api_key(key) == ApiKey(
        "team", "interactive,batch", "interactive", None, None, frozenset(), _id(key)
    )
    assert store.api_key(key + "x") is None
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert key.encode() not in raw
    assert hash_secret(key).encode() in raw
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def _id(key: str) -> str:
    return key_id_of(hash_secret(key))


def test_preset_key_and_delete(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    assert store.create_api_key("up", "mlxf-preset") == "mlxf-preset"
    store.create_api_key("team")
    assert store.delete_api_keys("up") == 1
    assert store.api_key("mlxf-preset") is None
    assert store.api_key_count() == 1


def test_revoked_and_expired_keys_are_refused_and_listed(tmp_path: Path) -> None:
    import time

    store = Store(tmp_path / "s.sqlite3")
    a, b = store.create_api_key("a"), store.create_api_key("b")
    gone = store.create_api_key("old", expires_at=time.time() - 1)
    later = store.create_api_key("later", expires_at=time.time() + 3600)
    assert store.revoke_api_key(_id(b)) == 1  # by id
    assert store.revoke_api_key("a") == 1  # by name
    assert store.revoke_api_key("a") == 0  # nothing valid left of that name
    assert [store.api_key(k) for k in (a, b, gone)] == [None, None, None]
    assert store.api_key(later) is not None
    now = time.time()
    states = {i.key.name: i.state(now) for i in store.key_infos()}
    assert states == {"a": "revoked", "b": "revoked", "old": "expired", "later": "expiring"}
    assert [k.name for k in store.api_keys()] == ["later"]
    assert store.api_key_count() == 1


def test_rotation_keeps_the_old_secret_for_the_grace_then_refuses_it(tmp_path: Path) -> None:
    import time

    store = Store(tmp_path / "s.sqlite3")
    old = store.create_api_key("etl", tiers="batch", default_tier="batch", rpm=5)
    new = store.rotate_api_key("etl", grace_s=3600)
    assert new is not None and new != old
    assert store.api_key(old) is not None  # within the grace
    record = store.api_key(new)
    assert record == ApiKey("etl", "batch", "batch", 5, None, frozenset(), _id(new))
    [before, after] = store.key_infos()
    assert before.expires_at is not None and 3590 < before.expires_at - time.time() <= 3600
    assert after.expires_at is None
    store.rotate_api_key("etl", grace_s=0)  # the grace of every valid secret: over now
    assert store.api_key(old) is None and store.api_key(new) is None
    assert store.rotate_api_key("nobody", 60) is None


def test_key_limits_are_stored_and_listed(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    limited = store.create_api_key(
        "etl", tiers="batch", default_tier="batch", rpm=2, tpm=5000, models=frozenset({"b", "a"})
    )
    store.create_api_key("team")
    record = store.api_key(limited)
    assert record == ApiKey("etl", "batch", "batch", 2, 5000, frozenset({"a", "b"}), _id(limited))
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
    old = ApiKey("old", "batch", "batch", None, None, frozenset(), _id("mlxf-old"))
    assert store.api_key("mlxf-old") == old
    new = store.create_api_key("new", rpm=3, models=frozenset({"demo"}))
    assert store.api_key(new) == ApiKey(
        "new", "interactive,batch", "interactive", 3, None, frozenset({"demo"}), _id(new)
    )
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 6
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


def test_operator_tokens_are_hashed_and_revocable(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    token = store.create_operator("alice")
    assert store.operator(token) == "alice"
    assert store.operator(token + "x") is None
    assert store.revoke_operator("alice") == 1
    assert store.operator(token) is None
    assert [(name, revoked is not None) for name, _, revoked in store.operators()] == [
        ("alice", True)
    ]
    store.close()
    assert token.encode() not in (tmp_path / "s.sqlite3").read_bytes()


def test_model_changes_persist_in_order(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = Store(path)
    store.save_model_change("b", [{"name": "b", "source": "/m/b"}])
    store.save_model_change("a", None)
    store.close()
    assert Store(path).model_changes() == {"b": [{"name": "b", "source": "/m/b"}], "a": None}
