"""Usage and audit: one record per completion request in the state store, never its text.

The gateway's event loop only puts a record on a queue (a few µs). One thread writes the queue
to SQLite in batches, notes when each key was last used, and deletes records older than the
retention or beyond the row cap. Reports (`mlxfleet usage`, `mlxfleet audit`) read through
their own connection and are meant to run in a thread, so a long scan never holds the loop.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DAY_S = 86400.0
PRUNE_EVERY_S = 60.0
MAX_BATCH = 2000  # records per transaction
CLOSE_TIMEOUT_S = 10.0
# `mlxfleet usage --by`: the column (or expression) each grouping is by; days are UTC dates.
USAGE_GROUPS = {
    "key": "key_name",
    "model": "model",
    "tier": "tier",
    "day": "date(ts, 'unixepoch')",
}


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One completion request as the audit log keeps it: who, what, where, how it went."""

    ts: float  # arrival, unix seconds
    key_id: str  # "" when no valid key came with it
    key_name: str
    api: str  # chat, completions, messages, responses
    model: str  # "" when refused before a configured model was named
    tier: str
    route: str  # local, remote, cloud; "" when nothing answered
    node_id: str  # the node whose engine answered last; "" for the cloud or none
    status: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft_s: float | None  # streams only
    duration_s: float | None  # requests an engine (or the cloud) answered


COLUMNS = tuple(f.name for f in fields(RequestRecord))
_INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


class RequestLog:
    """Records requests in the store from a thread of its own; see the module docstring.

    `record` may be called from any thread; `usage`, `audit` and `close` block (call them off
    the event loop). The `requests` table is the store's (coordinator/store.py)."""

    def __init__(self, db_path: Path, retention_days: float, max_rows: int) -> None:
        self._path = db_path
        self._retention_s = retention_days * DAY_S
        self._max_rows = max_rows
        self._queue: queue.SimpleQueue[RequestRecord | threading.Event | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    def record(self, record: RequestRecord) -> None:
        self._queue.put(record)

    def flush(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Wait until every record put before this call is written."""
        written = threading.Event()
        self._queue.put(written)
        written.wait(timeout_s)

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        self._queue.put(None)
        self._thread.join(CLOSE_TIMEOUT_S)

    # Reports
    def usage(self, since: float, by: str) -> list[dict[str, Any]]:
        """Totals per key name, model, tier or UTC day of the requests since `since` (unix
        seconds), ordered by that group."""
        group = USAGE_GROUPS[by]
        query = (
            f"SELECT {group} AS grp, count(*), sum(status BETWEEN 200 AND 299), "
            "sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens) "
            "FROM requests WHERE ts >= ? GROUP BY grp ORDER BY grp"
        )
        names = ("requests", "ok", "prompt_tokens", "completion_tokens", "cached_tokens")
        rows = self._read(query, (since,))
        return [{by: row[0], **dict(zip(names, row[1:], strict=True))} for row in rows]

    def audit(
        self, since: float, key: str | None, model: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """The newest `limit` records since `since`, of one key (name or id) and one model if
        given, newest first."""
        where: list[str] = ["ts >= ?"]
        params: list[Any] = [since]
        if key is not None:
            where.append("(key_name = ? OR key_id = ?)")
            params += [key, key]
        if model is not None:
            where.append("model = ?")
            params.append(model)
        query = (
            f"SELECT {', '.join(COLUMNS)} FROM requests WHERE {' AND '.join(where)} "
            "ORDER BY id DESC LIMIT ?"
        )
        rows = self._read(query, (*params, limit))
        return [dict(zip(COLUMNS, row, strict=True)) for row in rows]

    def _read(self, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        self.flush()
        db = sqlite3.connect(self._path, timeout=30)
        try:
            return list(db.execute(query, params))
        finally:
            db.close()

    # The writer thread
    def _run(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, timeout=30)
        next_prune = 0.0
        stop = False
        while not stop:
            batch: list[RequestRecord] = []
            done: list[threading.Event] = []
            item = self._queue.get()
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    done.append(item)
                else:
                    batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            try:
                if batch:
                    self._write(db, batch)
                if time.monotonic() >= next_prune:
                    self._prune(db)
                    next_prune = time.monotonic() + PRUNE_EVERY_S
            except sqlite3.Error as exc:  # a full disk, a locked file: the gateway goes on
                logger.warning("request log: %d records not written: %s", len(batch), exc)
            for event in done:
                event.set()
        db.close()

    def _write(self, db: sqlite3.Connection, batch: list[RequestRecord]) -> None:
        last_used: dict[str, float] = {}
        for record in batch:
            if record.key_id:
                last_used[record.key_id] = max(last_used.get(record.key_id, 0.0), record.ts)
        db.execute("BEGIN")
        try:
            db.executemany(_INSERT, [astuple(r) for r in batch])
            db.executemany(
                "UPDATE api_keys SET last_used = max(coalesce(last_used, 0), ?) WHERE key_id = ?",
                [(ts, key_id) for key_id, ts in last_used.items()],
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _prune(self, db: sqlite3.Connection) -> None:
        """Delete records past the retention, then the oldest beyond the row cap."""
        db.execute("DELETE FROM requests WHERE ts < ?", (time.time() - self._retention_s,))
        db.execute(
            "DELETE FROM requests WHERE id <= (SELECT max(id) FROM requests) - ?",
            (self._max_rows,),
        )
