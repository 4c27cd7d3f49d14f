"""The embedded state store: one SQLite file under MLXFLEET_HOME, nothing to install."""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.errors import StoreError

API_KEY_PREFIX = "mlxf-"

SCHEMA_VERSION = 4  # 2: certificates, join tokens; 3: key tiers, cordons, knobs; 4: key limits
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
    models       TEXT      -- comma list of models; NULL: every model
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


@dataclass(frozen=True, slots=True)
class Event:
    """One stored event: an engine exit, a load failure, an enrollment."""

    ts: float
    node_id: str | None
    kind: str
    detail: str


_API_KEY_COLUMNS = "name, tiers, default_tier, rpm, tpm, models"


def _api_key(row: tuple[str, str, str, int | None, int | None, str | None]) -> ApiKey:
    name, tiers, default_tier, rpm, tpm, models = row
    names = frozenset(m for m in (models or "").split(",") if m)
    return ApiKey(name, tiers, default_tier, rpm, tpm, names)


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
    ) -> str:
        """Store a new team key (hashed) and return it; the plain key is never stored."""
        key = key or API_KEY_PREFIX + secrets.token_urlsafe(32)
        self._db.execute(
            "INSERT OR REPLACE INTO api_keys (key_hash, name, created_at, tiers, default_tier, "
            "rpm, tpm, models) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                hash_secret(key),
                name,
                time.time(),
                tiers,
                default_tier,
                rpm,
                tpm,
                ",".join(sorted(models)) or None,
            ),
        )
        return key

    def api_key(self, key: str) -> ApiKey | None:
        """The record of a valid key, or None."""
        row = self._db.execute(
            f"SELECT {_API_KEY_COLUMNS} FROM api_keys WHERE key_hash = ?", (hash_secret(key),)
        ).fetchone()
        return _api_key(row) if row else None

    def api_keys(self) -> list[ApiKey]:
        """Every key's record, oldest first (for `mlxfleet keys list`)."""
        rows = self._db.execute(f"SELECT {_API_KEY_COLUMNS} FROM api_keys ORDER BY created_at")
        return [_api_key(row) for row in rows]

    def revoke_api_keys(self, name: str) -> int:
        """Delete every key with this name; returns how many."""
        return self._db.execute("DELETE FROM api_keys WHERE name = ?", (name,)).rowcount

    def api_key_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM api_keys").fetchone()[0])

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
