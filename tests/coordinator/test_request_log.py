"""The request log writes usage and audit records off the loop, totals them, and keeps them
within the retention and the row cap."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from coordinator.request_log import RequestLog, RequestRecord
from coordinator.store import Store, hash_secret, key_id_of


def record(
    key: str, model: str, status: int = 200, tokens: int = 10, ts: float = 0.0
) -> RequestRecord:
    return RequestRecord(
        ts or time.time(), key_id_of(hash_secret(key)), key.split("-")[0], "chat", model,
        "interactive", "local", "node-1", status, tokens, 2 * tokens, 3, 0.05, 0.5,
    )  # fmt: skip


def test_usage_totals_by_key_model_tier_and_day(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = Store(path)
    alice = store.create_api_key("alice", "alice-secret")
    log = RequestLog(path, retention_days=1, max_rows=100)
    for r in (
        record(alice, "demo", tokens=10),
        record(alice, "demo", status=429, tokens=0),
        record("bob-secret", "big", tokens=5),
    ):
        log.record(r)
    assert log.usage(0, "key") == [
        {"key": "alice", "requests": 2, "ok": 1, "prompt_tokens": 10, "completion_tokens": 20,
         "cached_tokens": 6},
        {"key": "bob", "requests": 1, "ok": 1, "prompt_tokens": 5, "completion_tokens": 10,
         "cached_tokens": 3},
    ]  # fmt: skip
    assert [(r["model"], r["requests"]) for r in log.usage(0, "model")] == [("big", 1), ("demo", 2)]
    [day] = log.usage(0, "day")
    assert day["day"] == time.strftime("%Y-%m-%d", time.gmtime()) and day["requests"] == 3
    assert log.usage(time.time() + 60, "tier") == []  # since: nothing newer
    # the key's last use, written with its records
    [info] = store.key_infos()
    assert info.last_used is not None and time.time() - info.last_used < 60
    log.close()


def test_audit_lists_newest_first_filtered_by_key_name_or_id_and_model(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    Store(path).close()
    log = RequestLog(path, retention_days=1, max_rows=100)
    for i in range(5):
        log.record(record("alice-1", "demo" if i % 2 else "big", tokens=i + 1))
    log.record(record("bob-1", "demo"))
    rows = log.audit(0, "alice", None, 10)
    assert [r["prompt_tokens"] for r in rows] == [5, 4, 3, 2, 1]
    assert set(rows[0]) >= {"ts", "key_id", "key_name", "api", "model", "tier", "route", "node_id",
                            "status", "prompt_tokens", "completion_tokens", "cached_tokens",
                            "ttft_s", "duration_s"}  # fmt: skip
    by_id = log.audit(0, key_id_of(hash_secret("alice-1")), "demo", 10)
    assert [r["prompt_tokens"] for r in by_id] == [4, 2]
    assert len(log.audit(0, None, None, 2)) == 2
    log.close()


def test_old_records_and_those_beyond_the_cap_are_deleted(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    Store(path).close()
    old = time.time() - 3 * 86400
    log = RequestLog(path, retention_days=2, max_rows=3)
    log.record(record("alice-1", "demo", ts=old))  # past the retention
    for i in range(5):
        log.record(record("alice-1", "demo", tokens=i + 1))
    log.close()  # the writer prunes on its first batch, then once a minute
    log = RequestLog(path, retention_days=2, max_rows=3)
    assert [r["prompt_tokens"] for r in log.audit(0, None, None, 10)] == [5, 4, 3]
    log.close()


def test_a_locked_store_loses_the_batch_not_the_writer(tmp_path: Path) -> None:
    """A write that fails (here: the table is gone) is logged; later records still land."""
    path = tmp_path / "s.sqlite3"
    Store(path).close()
    log = RequestLog(path, retention_days=1, max_rows=10)
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE requests RENAME TO requests_away")
    db.commit()
    log.record(record("alice-1", "demo"))
    log.flush()
    db.execute("ALTER TABLE requests_away RENAME TO requests")
    db.commit()
    db.close()
    log.record(record("alice-1", "demo", tokens=7))
    assert [r["prompt_tokens"] for r in log.audit(0, None, None, 10)] == [7]
    log.close()
