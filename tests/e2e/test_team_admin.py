"""Running the fleet as a team, end to end: key revocation, rotation and expiry; usage and
audit; models added, changed and removed at runtime; fleet.toml reloaded.

Real coordinator, agent and engines (the demo model) on 127.0.0.1, the real CLI against them,
the official `openai` client, and the SQLite store as the coordinator writes it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import mlxfleet, wait_for
from tests.e2e.fleet import Fleet, model_toml, running_fleet

LONG = 1500  # tokens of a stream that must outlast a CLI call (ignore_eos: it runs them all)
PROMPTS = ("the usage prompt alpha", "the usage prompt bravo", "the usage prompt charlie")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Fleet]:
    keys = {"usage-a": (), "usage-b": ("--tiers", "interactive")}
    with running_fleet(tmp_path_factory, model_toml(demo_model, pinned=True), keys=keys) as f:
        yield f


def cli_fails(fleet: Fleet, *args: str) -> str:
    """The one line a failing `mlxfleet ARGS` prints (and that it failed, without a trace)."""
    import subprocess

    done = subprocess.run(
        mlxfleet(*args, "--home", str(fleet.home)), capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


class LongStream(threading.Thread):
    """One long streamed chat in a thread: its text chunks' times, its end and its error."""

    def __init__(self, fleet: Fleet, key: str, model: str = "demo") -> None:
        super().__init__(daemon=True)
        self.client, self.model = fleet.client(key), model
        self.arrivals: list[float] = []
        self.finish: str | None = None
        self.tokens = 0
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": "go on"}],
                max_tokens=LONG, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    self.arrivals.append(time.monotonic())
                if chunk.choices and chunk.choices[0].finish_reason:
                    self.finish = chunk.choices[0].finish_reason
                if chunk.usage:
                    self.tokens = chunk.usage.completion_tokens
        except Exception as exc:  # the test asserts on it
            self.error = exc

    def started(self) -> bool:
        return bool(self.arrivals)

    def completed(self) -> bool:
        return self.error is None and self.finish == "length" and self.tokens == LONG


def chat(fleet: Fleet, key: str, model: str = "demo") -> int:
    """One short chat's HTTP status."""
    r = httpx.post(
        f"{fleet.base}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    return r.status_code


def test_a_revoked_key_finishes_its_stream_then_gets_401(fleet: Fleet) -> None:
    key = fleet.cli("keys", "create", "--name", "leaked")
    stream = LongStream(fleet, key)
    stream.start()
    wait_for(stream.started, 60, "the stream to start")
    assert (
        fleet.cli("keys", "revoke", "leaked") == "revoked 1 key: refused from the next request on"
    )
    revoked_at = time.monotonic()
    assert chat(fleet, key) == 401
    stream.join(120)
    assert stream.completed(), (stream.error, stream.finish, stream.tokens)
    assert stream.arrivals[-1] > revoked_at  # it was still streaming when the key was revoked
    assert "no valid key named or with id 'leaked'" in cli_fails(fleet, "keys", "revoke", "leaked")
    assert "no valid key named or with id 'nobody'" in cli_fails(fleet, "keys", "revoke", "nobody")


def test_rotation_keeps_the_old_secret_for_its_grace_and_expiry_ends_a_key(fleet: Fleet) -> None:
    old = fleet.cli("keys", "create", "--name", "ci")
    new = fleet.cli("keys", "rotate", "ci", "--grace", "4s")
    short = fleet.cli("keys", "create", "--name", "temp", "--expires", "4s")
    rotated_at = time.monotonic()
    assert new.startswith("mlxf-") and new != old
    assert [chat(fleet, k) for k in (old, new, short)] == [200, 200, 200]
    listed = {r["name"] + ":" + r["id"]: r for r in json.loads(fleet.cli("keys", "list", "--json"))}
    states = sorted(r["state"] for name, r in listed.items() if name.startswith(("ci:", "temp:")))
    assert states == ["active", "expiring", "expiring"]
    time.sleep(max(0.0, rotated_at + 4.5 - time.monotonic()))
    assert [chat(fleet, k) for k in (old, new, short)] == [401, 200, 401]
    used = [r for r in json.loads(fleet.cli("keys", "list", "--json")) if r["name"] == "ci"]
    assert all(r["last_used"] is not None for r in used)  # written by the request log


def usage_of(reply: Any) -> tuple[int, int]:
    return reply.usage.prompt_tokens, reply.usage.completion_tokens


def test_usage_per_key_equals_what_the_clients_received(fleet: Fleet) -> None:
    got: dict[str, list[int]] = {"usage-a": [0, 0, 0], "usage-b": [0, 0, 0]}  # prompt, out, n
    for name, prompt in [("usage-a", PROMPTS[0]), ("usage-b", PROMPTS[1]), ("usage-a", PROMPTS[2])]:
        client = fleet.client(fleet.keys[name])
        messages = [{"role": "user", "content": prompt}]
        replies = [
            client.chat.completions.create(model="demo", messages=messages, max_tokens=5),
            client.completions.create(model="demo", prompt=prompt, max_tokens=7),
        ]
        counts = [usage_of(r) for r in replies]
        stream = client.chat.completions.create(
            model="demo", messages=messages, max_tokens=6, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        counts += [usage_of(c) for c in stream if c.usage]
        for prompt_tokens, completion_tokens in counts:
            got[name][0] += prompt_tokens
            got[name][1] += completion_tokens
            got[name][2] += 1
    with pytest.raises(openai.NotFoundError):  # an error or two: counted, with no tokens
        fleet.client(fleet.keys["usage-a"]).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
    with pytest.raises(openai.PermissionDeniedError):
        fleet.client(fleet.keys["usage-b"]).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "x"}], max_tokens=2,
            extra_headers={"X-Mlxfleet-Tier": "batch"},
        )  # fmt: skip
    rows = {r["key"]: r for r in json.loads(fleet.cli("usage", "--json", "--since", "1h"))}
    for name, (prompt, completion, answered) in got.items():
        row = rows[name]
        assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
        assert (row["requests"], row["ok"]) == (answered + 1, answered)
    by_model = {r["model"]: r for r in json.loads(fleet.cli("usage", "--json", "--by", "model"))}
    assert "" in by_model and "no-such-model" not in by_model  # never a name a client chose
    table = fleet.cli("usage", "--since", "1h")
    assert table.splitlines()[0].split() == [
        "key", "requests", "ok", "prompt_tokens", "completion_tokens", "cached_tokens"
    ]  # fmt: skip

    # The Prometheus counters agree, per key.
    text = httpx.get(f"{fleet.base}/metrics", timeout=10).text
    counted: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("mlxfleet_prompt_tokens_total", "mlxfleet_generation_tokens_total"):
                k = (s.name, s.labels["key"])
                counted[k] = counted.get(k, 0) + s.value
    for name, (prompt, completion, _) in got.items():
        assert counted[("mlxfleet_prompt_tokens_total", name)] == prompt
        assert counted[("mlxfleet_generation_tokens_total", name)] == completion

    # The audit log: every request of the key, newest first, and never its text.
    audit = json.loads(fleet.cli("audit", "--key", "usage-a", "--json"))
    assert [r["status"] for r in audit][0] == 404  # the refused one came last
    assert len(audit) == got["usage-a"][2] + 1
    assert {(r["api"], r["route"]) for r in audit if r["status"] == 200} == {
        ("chat", "local"),
        ("completions", "local"),
    }
    streamed = [r for r in audit if r["ttft_s"] is not None]
    assert len(streamed) == 2 and all(0 < r["ttft_s"] <= r["duration_s"] for r in streamed)
    stored = b"".join(p.read_bytes() for p in fleet.home.glob("coordinator.sqlite3*"))
    for prompt in PROMPTS:
        assert prompt.encode() not in stored
        assert prompt.encode() not in (fleet.logs / "coordinator.log").read_bytes()


def test_models_added_changed_and_removed_at_runtime(fleet: Fleet, demo_model: Path) -> None:
    streaming = LongStream(fleet, fleet.key)  # another model streams through all of it
    streaming.start()
    wait_for(streaming.started, 60, "the demo stream to start")
    added = fleet.cli("models", "add", "second", str(demo_model), "--tiers", "interactive")
    assert added == "second: added (interactive); placing it now"
    fleet.wait_ready([("second", "interactive")])
    assert chat(fleet, fleet.key, "second") == 200
    assert "model 'second' exists" in cli_fails(fleet, "models", "add", "second", str(demo_model))
    missing = cli_fails(fleet, "models", "add", "third", "/no/such/model")
    assert "source '/no/such/model'" in missing
    assert "no model 'nobody' is configured" in cli_fails(fleet, "models", "remove", "nobody")
    assert "'replicas' must be an integer 1-64" in cli_fails(
        fleet, "models", "set", "second", "--replicas", "0"
    )
    assert """'sharding' must be "auto" or "never", got 'maybe'""" in cli_fails(
        fleet, "models", "set", "second", "--sharding", "maybe"
    )
    assert fleet.cli("models", "set", "second", "--sharding", "never") == (
        "second: changed (interactive)"
    )
    streaming.join(120)
    assert streaming.completed(), (streaming.error, streaming.finish, streaming.tokens)

    # Removing drains: a stream in flight on it finishes, new requests get 404 at once.
    draining = LongStream(fleet, fleet.key, "second")
    draining.start()
    wait_for(draining.started, 60, "the second stream to start")
    assert fleet.cli("models", "remove", "second").startswith("second: removed")
    assert chat(fleet, fleet.key, "second") == 404
    draining.join(120)
    assert draining.completed(), (draining.error, draining.finish, draining.tokens)
    wait_for(lambda: "second" not in fleet.models(), 30, "second to leave /v1/models")
    rows = json.loads(fleet.cli("models", "--json"))
    assert {r["model"] for r in rows} == {"demo"}

    # The change outlives a reload; an edited fleet.toml applies; a broken one is refused.
    config = fleet.home / "fleet.toml"
    config.write_text(
        model_toml(demo_model, pinned=True) + model_toml(demo_model, "third", tiers=["batch"])
    )
    reloaded = fleet.cli("reload")
    assert reloaded.splitlines()[0] == "reloaded: serving demo, third"
    fleet.wait_ready([("third", "batch")])

    # A runtime change wins over the file until it is reset.
    assert fleet.cli("models", "set", "third", "--replicas", "2") == "third: changed (batch)"
    assert fleet.cli("reload").splitlines()[-1] == (
        "third: changed at runtime, which wins over fleet.toml (`models reset third`)"
    )
    reset = fleet.cli("models", "reset", "third")
    assert reset == "third: runtime change forgotten; fleet.toml's tables apply"
    assert len(fleet.cli("reload").splitlines()) == 1  # nothing overridden any more
    assert "model 'third' has no runtime change" in cli_fails(fleet, "models", "reset", "third")
    config.write_text("[[models]\nname = ")
    assert "not reloaded" in cli_fails(fleet, "reload")
    assert "invalid TOML" in cli_fails(fleet, "reload")
    assert chat(fleet, fleet.key, "demo") == 200  # the running configuration stays
    assert set(fleet.models()) == {"demo", "third"}
