"""The embedded state store: one SQLite file under MLXFLEET_HOME, nothing to install."""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.errors import StoreError

API_KEY_PREFIX = "mlxf-"
OPERATOR_PREFIX = "mlxfop-"

SCHEMA_VERSION = 6  # 2: certificates, join tokens; 3: key tiers, cordons, knobs; 4: key limits;
# 5: key ids, expiry, revocation and last use; request records; operators; runtime models;
# 6: model file manifests
SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id     TEXT PRIMARY KEY,
    hostname    TEXT NOT NULL,
    facts_json  TEXT NOT NULL,
    enrolled_at REAL NOT NULL,
    last_seen   REAL,
    revoked_at  REAL,
    cordoned    INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS join_tokens (
    token_hash  TEXT PRIMARY KEY,
    expires_at  REAL NOT NULL,
    uses_left   INTEGER NOT NULL,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash     TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    created_at   REAL NOT NULL,
    tiers        TEXT NOT NULL DEFAULT 'interactive,batch',
    default_tier TEXT NOT NULL DEFAULT 'interactive',
    rpm          INTEGER,  -- requests per minute; NULL: unlimited
    tpm          INTEGER,  -- tokens per minute; NULL: unlimited
    models       TEXT,     -- comma list of models; NULL: every model
    key_id       TEXT,     -- public id for `keys revoke`: 'k-' and 8 hex digits of the hash
    expires_at   REAL,     -- NULL: never (a rotated key's old secret: the end of its grace)
    revoked_at   REAL,
    last_used    REAL
);
CREATE TABLE IF NOT EXISTS requests (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    ts                REAL NOT NULL,     -- arrival (unix seconds)
    key_id            TEXT NOT NULL,
    key_name          TEXT NOT NULL,
    api               TEXT NOT NULL,     -- chat, completions, messages, responses
    model             TEXT NOT NULL,
    tier              TEXT NOT NULL,
    route             TEXT NOT NULL,     -- local, remote, cloud; '' when nothing answered
    node_id           TEXT NOT NULL,     -- the node that answered; '' for cloud or none
    status            INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens     INTEGER NOT NULL,
    ttft_s            REAL,              -- streams only
    duration_s        REAL
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
CREATE TABLE IF NOT EXISTS operators (
    token_hash  TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    revoked_at  REAL
);
CREATE TABLE IF NOT EXISTS model_changes (
    name        TEXT PRIMARY KEY,
    spec_json   TEXT,                    -- its fleet.toml tables, a JSON list; NULL: removed
    changed_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tier_knobs (
    tier         TEXT PRIMARY KEY,
    changes_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS placements (
    engine_id   TEXT PRIMARY KEY,
    model       TEXT NOT NULL,
    node_id     TEXT NOT NULL,
    tier        TEXT NOT NULL,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS manifests (
    source      TEXT PRIMARY KEY,
    manifest_json TEXT NOT NULL,             -- mlxfleet/manifest.py Manifest.to_json()
    node_id     TEXT NOT NULL,               -- the node that recorded it first
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    ts          REAL NOT NULL,
    node_id     TEXT,
    kind        TEXT NOT NULL,
    detail      TEXT NOT NULL
);
"""


def hash_secret(secret: str) -> str:
    """Keys and tokens are random and long, so a plain SHA-256 is enough to store them."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What a team key may do (its secret is never stored, only its hash)."""

    name: str
    tiers: str  # comma list, read by coordinator.tiers.key_tiers
    default_tier: str
    rpm: int | None  # requests per minute; None: unlimited
    tpm: int | None  # tokens (prompt + completion) per minute; None: unlimited
    models: frozenset[str]  # empty: every model
    key_id: str = ""  # "k-" and 8 hex digits of its hash: names one secret in lists and audit


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One stored key as `mlxfleet keys list` shows it (never its secret)."""

    key: ApiKey
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used: float | None

    def state(self, now: float) -> str:
        """revoked, expired, expiring (valid until a set time, e.g. a rotated key's grace) or
        active."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is None:
            return "active"
        return "expired" if self.expires_at <= now else "expiring"


@dataclass(frozen=True, slots=True)
class Event:
    """One stored event: an engine exit, a load failure, an enrollment."""

    ts: float
    node_id: str | None
    kind: str
    detail: str


_API_KEY_COLUMNS = "name, tiers, default_tier, rpm, tpm, models, key_id"
_KEY_INFO_COLUMNS = f"{_API_KEY_COLUMNS}, created_at, expires_at, revoked_at, last_used"
_VALID_KEY = "revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)"


def key_id_of(key_hash: str) -> str:
    return "k-" + key_hash[:8]


def _api_key(row: tuple) -> ApiKey:  # type: ignore[type-arg]
    name, tiers, default_tier, rpm, tpm, models, key_id = row[:7]
    names = frozenset(m for m in (models or "").split(",") if m)
    return ApiKey(name, tiers, default_tier, rpm, tpm, names, key_id)


class Store:
    """SQLite access. Calls are short and synchronous; safe from the event loop thread only."""

    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._migrate()
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open state store {path}: {exc}") from None
        path.chmod(0o600)

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version < 2:
            # Version 1 nodes held a shared-secret node key; they enroll again for a certificate.
            self._db.execute("DROP TABLE IF EXISTS nodes")
        if version == 2:
            self._db.execute("ALTER TABLE nodes ADD COLUMN cordoned INTEGER NOT NULL DEFAULT 0")
        if version < 3 and self._has_table("api_keys"):
            self._db.execute(
                "ALTER TABLE api_keys ADD COLUMN tiers TEXT NOT NULL DEFAULT 'interactive,batch'"
            )
            self._db.execute(
                "ALTER TABLE api_keys ADD COLUMN default_tier TEXT NOT NULL DEFAULT 'interactive'"
            )
        if version < 4 and self._has_table("api_keys"):
            for column in ("rpm INTEGER", "tpm INTEGER", "models TEXT"):
                self._db.execute(f"ALTER TABLE api_keys ADD COLUMN {column}")
        if version < 5 and self._has_table("api_keys"):
            for column in ("key_id TEXT", "expires_at REAL", "revoked_at REAL", "last_used REAL"):
                self._db.execute(f"ALTER TABLE api_keys ADD COLUMN {column}")
            self._db.execute("UPDATE api_keys SET key_id = 'k-' || substr(key_hash, 1, 8)")
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _has_table(self, name: str) -> bool:
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return self._db.execute(query, (name,)).fetchone() is not None

    # Tier knobs changed at runtime (mlxfleet tiers set), over the config's
    def save_tier_knobs(self, tier: str, changes: dict[str, int]) -> None:
        merged = {**self.tier_knobs().get(tier, {}), **changes}
        self._db.execute(
            "INSERT OR REPLACE INTO tier_knobs VALUES (?, ?)", (tier, json.dumps(merged))
        )

    def tier_knobs(self) -> dict[str, dict[str, int]]:
        rows = self._db.execute("SELECT tier, changes_json FROM tier_knobs")
        return {tier: json.loads(changes) for tier, changes in rows}

    # Join tokens
    def create_join_token(self, ttl_s: float, uses: int) -> str:
        """Store a new join token secret (hashed) and return it."""
        secret = secrets.token_urlsafe(24)
        now = time.time()
        self._db.execute(
            "INSERT INTO join_tokens VALUES (?, ?, ?, ?)",
            (hash_secret(secret), now + ttl_s, uses, now),
        )
        return secret

    def consume_join_token(self, secret: str) -> str | None:
        """Use the token once. None when accepted, else why not (unknown, expired, used up)."""
        token_hash = hash_secret(secret)
        cursor = self._db.execute(
            "UPDATE join_tokens SET uses_left = uses_left - 1 "
            "WHERE token_hash = ? AND uses_left > 0 AND expires_at > ?",
            (token_hash, time.time()),
        )
        if cursor.rowcount == 1:
            return None
        row = self._db.execute(
            "SELECT expires_at, uses_left FROM join_tokens WHERE token_hash = ?", (token_hash,)
        ).fetchone()
        if row is None:
            return "unknown join token"
        return "join token expired" if row[0] <= time.time() else "join token used up"

    # API keys
    def create_api_key(
        self,
        name: str,
        key: str | None = None,
        tiers: str = "interactive,batch",
        default_tier: str = "interactive",
        rpm: int | None = None,
        tpm: int | None = None,
        models: frozenset[str] = frozenset(),
        expires_at: float | None = None,
    ) -> str:
        """Store a new team key (hashed) and return it; the plain key is never stored."""
        key = key or API_KEY_PREFIX + secrets.token_urlsafe(32)
        key_hash = hash_secret(key)
        self._db.execute(
            "INSERT OR REPLACE INTO api_keys (key_hash, name, created_at, tiers, default_tier, "
            "rpm, tpm, models, key_id, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key_hash,
                name,
                time.time(),
                tiers,
                default_tier,
                rpm,
                tpm,
                ",".join(sorted(models)) or None,
                key_id_of(key_hash),
                expires_at,
            ),
        )
        return key

    def api_key(self, key: str) -> ApiKey | None:
        """The record of a valid key (neither revoked nor expired), or None."""
        row = self._db.execute(
            f"SELECT {_API_KEY_COLUMNS} FROM api_keys WHERE key_hash = ? AND {_VALID_KEY}",
            (hash_secret(key), time.time()),
        ).fetchone()
        return _api_key(row) if row else None

    def api_keys(self) -> list[ApiKey]:
        """Every valid key's record, oldest first."""
        rows = self._db.execute(
            f"SELECT {_API_KEY_COLUMNS} FROM api_keys WHERE {_VALID_KEY} ORDER BY created_at",
            (time.time(),),
        )
        return [_api_key(row) for row in rows]

    def key_infos(self) -> list[KeyInfo]:
        """Every stored key, revoked and expired ones too, oldest first (`keys list`)."""
        rows = self._db.execute(f"SELECT {_KEY_INFO_COLUMNS} FROM api_keys ORDER BY created_at")
        return [KeyInfo(_api_key(row), *row[7:]) for row in rows]

    def revoke_api_key(self, name_or_id: str) -> int:
        """Revoke the valid keys with this name, or the key with this id; how many."""
        return self._db.execute(
            f"UPDATE api_keys SET revoked_at = ? WHERE (name = ? OR key_id = ?) AND {_VALID_KEY}",
            (time.time(), name_or_id, name_or_id, time.time()),
        ).rowcount

    def rotate_api_key(self, name: str, grace_s: float) -> str | None:
        """A new secret for key `name`, with the newest valid one's tiers, limits and expiry;
        every valid secret of that name stops working after `grace_s` (earlier if it expires
        before). None when no valid key has that name."""
        now = time.time()
        row = self._db.execute(
            f"SELECT {_KEY_INFO_COLUMNS} FROM api_keys WHERE name = ? AND {_VALID_KEY} "
            "ORDER BY created_at DESC LIMIT 1",
            (name, now),
        ).fetchone()
        if row is None:
            return None
        info = KeyInfo(_api_key(row), *row[7:])
        k = info.key
        self._db.execute(
            "UPDATE api_keys SET expires_at = min(coalesce(expires_at, ?), ?) "
            f"WHERE name = ? AND {_VALID_KEY}",
            (now + grace_s, now + grace_s, name, now),
        )
        return self.create_api_key(
            name, None, k.tiers, k.default_tier, k.rpm, k.tpm, k.models, info.expires_at
        )

    def delete_api_keys(self, name: str) -> int:
        """Delete every key with this name (`mlxfleet up` replacing its own); how many."""
        return self._db.execute("DELETE FROM api_keys WHERE name = ?", (name,)).rowcount

    def api_key_count(self) -> int:
        """Valid keys."""
        query = f"SELECT count(*) FROM api_keys WHERE {_VALID_KEY}"
        return int(self._db.execute(query, (time.time(),)).fetchone()[0])

    # Operator tokens: the admin API from another host (`mlxfleet operator create`)
    def create_operator(self, name: str) -> str:
        """Store a new operator token (hashed) and return it."""
        token = OPERATOR_PREFIX + secrets.token_urlsafe(32)
        self._db.execute(
            "INSERT INTO operators (token_hash, name, created_at) VALUES (?, ?, ?)",
            (hash_secret(token), name, time.time()),
        )
        return token

    def operator(self, token: str) -> str | None:
        """The name of a valid (not revoked) operator token, or None."""
        token_hash = hash_secret(token)
        row = self._db.execute(
            "SELECT name FROM operators WHERE token_hash = ? AND revoked_at IS NULL",
            (token_hash,),
        ).fetchone()
        return None if row is None else str(row[0])

    def operators(self) -> list[tuple[str, float, float | None]]:
        """(name, created_at, revoked_at) of every operator token, oldest first."""
        query = "SELECT name, created_at, revoked_at FROM operators ORDER BY created_at"
        return list(self._db.execute(query))

    def revoke_operator(self, name: str) -> int:
        """Revoke every valid operator token with this name; how many."""
        return self._db.execute(
            "UPDATE operators SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
            (time.time(), name),
        ).rowcount

    # Models changed at runtime (`mlxfleet models add|set|remove`), over fleet.toml's
    def save_model_change(self, name: str, tables: list[dict[str, Any]] | None) -> None:
        """The model's fleet.toml tables (one per tier, or one with `tiers`) as now
        configured; None: removed."""
        self._db.execute(
            "INSERT OR REPLACE INTO model_changes VALUES (?, ?, ?)",
            (name, None if tables is None else json.dumps(tables), time.time()),
        )

    def forget_model_change(self, name: str) -> None:
        """`mlxfleet models reset`: fleet.toml's tables of the model apply again."""
        self._db.execute("DELETE FROM model_changes WHERE name = ?", (name,))

    def model_changes(self) -> dict[str, list[dict[str, Any]] | None]:
        """Every model changed at runtime, in the order changed: its tables, or None (removed)."""
        rows = self._db.execute("SELECT name, spec_json FROM model_changes ORDER BY rowid")
        return {name: None if spec is None else json.loads(spec) for name, spec in rows}

    # Model file manifests (coordinator/holdings.py): the first one recorded per source stays
    def save_manifest(self, source: str, manifest_json: str, node_id: str) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO manifests VALUES (?, ?, ?, ?)",
            (source, manifest_json, node_id, time.time()),
        )

    def manifests(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT source, manifest_json FROM manifests"))

    # Nodes
    def save_node(self, node_id: str, hostname: str, facts: dict[str, object]) -> None:
        """Record an enrolled node (a re-enrollment clears an old revocation of that id)."""
        self._db.execute(
            "INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?, NULL, NULL, 0)",
            (node_id, hostname, json.dumps(facts), time.time()),
        )

    def set_cordoned(self, node_id: str, cordoned: bool) -> bool:
        """Drain (True) or uncordon (False) an active node; False if there is none."""
        cursor = self._db.execute(
            "UPDATE nodes SET cordoned = ? WHERE node_id = ? AND revoked_at IS NULL",
            (int(cordoned), node_id),
        )
        return cursor.rowcount == 1

    def node_cordoned(self, node_id: str) -> bool:
        row = self._db.execute(
            "SELECT cordoned FROM nodes WHERE node_id = ?", (node_id,)
        ).fetchone()
        return bool(row and row[0])

    def node_known(self, node_id: str) -> bool:
        """Whether this id was ever enrolled (revoked ids stay taken)."""
        return (
            self._db.execute("SELECT 1 FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
            is not None
        )

    def node_is_active(self, node_id: str) -> bool:
        """Enrolled and not revoked."""
        row = self._db.execute(
            "SELECT revoked_at FROM nodes WHERE node_id = ?", (node_id,)
        ).fetchone()
        return row is not None and row[0] is None

    def revoke_node(self, node_id: str) -> bool:
        """Refuse this node's certificate from now on; False if no such active node."""
        cursor = self._db.execute(
            "UPDATE nodes SET revoked_at = ? WHERE node_id = ? AND revoked_at IS NULL",
            (time.time(), node_id),
        )
        return cursor.rowcount == 1

    def revoked_nodes(self) -> set[str]:
        return {
            row[0]
            for row in self._db.execute("SELECT node_id FROM nodes WHERE revoked_at IS NOT NULL")
        }

    def enrolled_nodes(self) -> list[tuple[str, str, dict[str, object], float | None]]:
        """(node_id, hostname, facts, last_seen) of every active node."""
        rows = self._db.execute(
            "SELECT node_id, hostname, facts_json, last_seen FROM nodes WHERE revoked_at IS NULL"
        )
        return [(r[0], r[1], json.loads(r[2]), r[3]) for r in rows]

    def touch_node(self, node_id: str) -> None:
        self._db.execute("UPDATE nodes SET last_seen = ? WHERE node_id = ?", (time.time(), node_id))

    # Placements
    def save_placement(self, engine_id: str, model: str, node_id: str, tier: str) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO placements VALUES (?, ?, ?, ?, ?)",
            (engine_id, model, node_id, tier, time.time()),
        )

    def delete_placement(self, engine_id: str) -> None:
        self._db.execute("DELETE FROM placements WHERE engine_id = ?", (engine_id,))

    def placements(self) -> list[tuple[str, str, str, str]]:
        """(engine_id, model, node_id, tier) for every recorded placement."""
        return list(self._db.execute("SELECT engine_id, model, node_id, tier FROM placements"))

    # Events
    def add_event(self, node_id: str | None, kind: str, detail: str) -> None:
        self._db.execute(
            "INSERT INTO events (ts, node_id, kind, detail) VALUES (?, ?, ?, ?)",
            (time.time(), node_id, kind, detail),
        )

    def events(self, limit: int = 100) -> list[Event]:
        rows = self._db.execute(
            "SELECT ts, node_id, kind, detail FROM events ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [Event(*row) for row in rows]
