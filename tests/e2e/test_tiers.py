"""Tiers end to end: real coordinator, agent and engines on 127.0.0.1.

"demo" runs in both tiers (pinned, so it never sleeps); "sleepy" is interactive only and
unpinned, with a 2 s idle timeout, so it is unloaded and woken by a request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    Proc,
    children_of,
    mlxfleet,
    run_ok,
    start_agent,
    start_coordinator,
    wait_for,
)

READY_TIMEOUT_S = 120.0


@dataclass
class TierFleet:
    base: str
    home: Path
    both: str  # a key for both tiers, default interactive
    batch_only: str
    agent: Proc

    def post(
        self, key: str, model: str, tier: str | None = None, **extra: object
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"}
        if tier is not None:
            headers["X-Mlxfleet-Tier"] = tier
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            **extra,
        }
        return httpx.post(
            f"{self.base}/v1/chat/completions", json=body, headers=headers, timeout=90
        )

    def models(self, key: str) -> dict[str, dict[str, str]]:
        r = httpx.get(f"{self.base}/v1/models", headers={"Authorization": f"Bearer {key}"})
        return {m["id"]: m["mlxfleet"]["tiers"] for m in r.json()["data"]}

    def cli(self, *args: str) -> str:
        return run_ok(mlxfleet(*args, "--home", str(self.home)))

    def units(self) -> dict[tuple[str, str], dict]:
        rows = json.loads(self.cli("models", "--json"))
        return {(r["model"], r["tier"]): r for r in rows}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[TierFleet]:
    home = tmp_path_factory.mktemp("coord")
    (home / "fleet.toml").write_text(
        "idle_unload_s = 2\n"
        f'[[models]]\nname = "demo"\nsource = "{demo_model}"\n'
        'tiers = ["interactive", "batch"]\npinned = true\n'
        f'[[models]]\nname = "sleepy"\nsource = "{demo_model}"\n'
    )
    logs = tmp_path_factory.mktemp("logs")
    coordinator, runtime = start_coordinator(home, home / "fleet.toml", logs / "coordinator.log")
    agent = None
    try:

        def key(*args: str) -> str:
            return run_ok(mlxfleet("keys", "create", *args, "--home", str(home)))

        both, batch_only = key("--name", "both"), key("--name", "etl", "--tiers", "batch")
        agent = start_agent(home, runtime, tmp_path_factory.mktemp("agent"), logs / "agent.log")
        f = TierFleet(f"http://127.0.0.1:{runtime['gateway_port']}", home, both, batch_only, agent)
        wait_for(
            lambda: f.models(both).get("demo") == {"interactive": "ready", "batch": "ready"},
            READY_TIMEOUT_S,
            "demo to be ready in both tiers",
        )
        yield f
    except BaseException:
        print("--- coordinator log ---\n" + coordinator.output()[-5000:])
        if agent is not None:
            print("--- agent log ---\n" + agent.output()[-5000:])
        raise
    finally:
        if agent is not None:
            agent.stop()
        coordinator.stop()


def test_the_key_and_the_header_choose_the_tier(fleet: TierFleet) -> None:
    default = fleet.post(fleet.both, "demo")
    assert default.status_code == 200 and default.headers["X-Mlxfleet-Tier"] == "interactive"
    batch = fleet.post(fleet.both, "demo", tier="batch")
    assert batch.status_code == 200 and batch.headers["X-Mlxfleet-Tier"] == "batch"
    assert batch.json()["usage"]["completion_tokens"] >= 1
    only = fleet.post(fleet.batch_only, "demo")  # its default is its only tier
    assert only.headers["X-Mlxfleet-Tier"] == "batch"


@pytest.mark.parametrize(
    ("key", "model", "tier", "status", "code"),
    [
        ("batch_only", "demo", "interactive", 403, "tier_not_allowed"),
        ("both", "demo", "turbo", 400, "invalid_tier"),
        ("batch_only", "sleepy", None, 404, "model_not_found"),
    ],
)
def test_tier_refusals(
    fleet: TierFleet, key: str, model: str, tier: str | None, status: int, code: str
) -> None:
    r = fleet.post(getattr(fleet, key), model, tier=tier)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    if code == "model_not_found":
        assert "served in: interactive" in r.json()["error"]["message"]


def test_models_lists_each_model_per_tier_for_the_key(fleet: TierFleet) -> None:
    assert fleet.models(fleet.batch_only) == {"demo": {"batch": "ready"}}
    both = fleet.models(fleet.both)
    assert both["demo"] == {"interactive": "ready", "batch": "ready"}


def test_tier_knobs_change_without_reloading(fleet: TierFleet) -> None:
    engines_before = set(children_of(fleet.agent.popen.pid))
    out = fleet.cli("tiers", "set", "batch", "--window-ms", "250", "--max-batch-size", "6")
    assert "'batch_window_ms': 250" in out
    listed = fleet.cli("tiers")
    assert "250" in listed.splitlines()[2] or "250" in listed
    wait_for(
        lambda: (
            "knobs now {'batch_window_ms': 250" in fleet.agent.output()
            or "knobs now" in fleet.agent.output()
            and "250" in fleet.agent.output()
        ),
        30,
        "the agent to apply the knobs to the batch engine",
    )
    demo_batch = fleet.units()[("demo", "batch")]
    assert demo_batch["knobs"]["batch_window_ms"] == 250
    assert demo_batch["knobs"]["max_batch_size"] == 6
    assert set(children_of(fleet.agent.popen.pid)) >= engines_before  # nothing restarted
    assert fleet.post(fleet.both, "demo", tier="batch").status_code == 200


def test_an_idle_model_sleeps_and_a_request_wakes_it(fleet: TierFleet) -> None:
    """sleepy unloads after 2 idle seconds (its engine process exits); a request reloads it,
    waits for it, succeeds, and the cold start is counted."""
    wait_for(
        lambda: fleet.units()[("sleepy", "interactive")]["state"] == "asleep",
        60,
        "sleepy to be unloaded for idleness",
    )
    assert fleet.models(fleet.both)["sleepy"] == {"interactive": "asleep"}
    assert fleet.units()[("demo", "interactive")]["state"] == "ready"  # pinned: stays
    started = time.monotonic()
    r = fleet.post(fleet.both, "sleepy")
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    assert time.monotonic() - started < 90
    assert fleet.units()[("sleepy", "interactive")]["cold_starts"] == 1
