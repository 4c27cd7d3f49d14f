"""Tiers end to end: real coordinator, agent and engines on 127.0.0.1.

"demo" runs in both tiers (pinned, so it never sleeps); "sleepy" is interactive only and
unpinned, with a 2 s idle timeout, so it is unloaded and woken by a request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import engines_of, wait_for
from tests.e2e.fleet import Fleet, running_fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Fleet]:
    """The default key is for both tiers (default interactive); "batch_only" for batch."""
    config = (
        "idle_unload_s = 2\n"
        f'[[models]]\nname = "demo"\nsource = "{demo_model}"\n'
        'tiers = ["interactive", "batch"]\npinned = true\n'
        f'[[models]]\nname = "sleepy"\nsource = "{demo_model}"\n'
    )
    with running_fleet(
        tmp_path_factory,
        config,
        ready=[("demo", "interactive"), ("demo", "batch")],
        keys={"batch_only": ("--tiers", "batch")},
    ) as f:
        yield f


def post(
    fleet: Fleet, key: str, model: str, tier: str | None = None, **extra: object
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
    return httpx.post(f"{fleet.base}/v1/chat/completions", json=body, headers=headers, timeout=90)


def units(fleet: Fleet) -> dict[tuple[str, str], dict]:
    rows = json.loads(fleet.cli("models", "--json"))
    return {(r["model"], r["tier"]): r for r in rows}


def test_the_key_and_the_header_choose_the_tier(fleet: Fleet) -> None:
    default = post(fleet, fleet.key, "demo")
    assert default.status_code == 200 and default.headers["X-Mlxfleet-Tier"] == "interactive"
    batch = post(fleet, fleet.key, "demo", tier="batch")
    assert batch.status_code == 200 and batch.headers["X-Mlxfleet-Tier"] == "batch"
    assert batch.json()["usage"]["completion_tokens"] >= 1
    only = post(fleet, fleet.keys["batch_only"], "demo")  # its default is its only tier
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
    fleet: Fleet, key: str, model: str, tier: str | None, status: int, code: str
) -> None:
    r = post(fleet, fleet.key if key == "both" else fleet.keys[key], model, tier=tier)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    if code == "model_not_found":
        assert "served in: interactive" in r.json()["error"]["message"]


def test_models_lists_each_model_per_tier_for_the_key(fleet: Fleet) -> None:
    assert fleet.models(fleet.keys["batch_only"]) == {"demo": {"batch": "ready"}}
    both = fleet.models()
    assert both["demo"] == {"interactive": "ready", "batch": "ready"}


def test_tier_knobs_change_without_reloading(fleet: Fleet) -> None:
    engines_before = set(engines_of(fleet.agent.popen.pid))
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
    demo_batch = units(fleet)[("demo", "batch")]
    assert demo_batch["knobs"]["batch_window_ms"] == 250
    assert demo_batch["knobs"]["max_batch_size"] == 6
    assert set(engines_of(fleet.agent.popen.pid)) >= engines_before  # nothing restarted
    assert post(fleet, fleet.key, "demo", tier="batch").status_code == 200


def test_an_idle_model_sleeps_and_a_request_wakes_it(fleet: Fleet) -> None:
    """sleepy unloads after 2 idle seconds (its engine process exits); a request reloads it,
    waits for it, succeeds, and the cold start is counted."""
    wait_for(
        lambda: units(fleet)[("sleepy", "interactive")]["state"] == "asleep",
        60,
        "sleepy to be unloaded for idleness",
    )
    assert fleet.models()["sleepy"] == {"interactive": "asleep"}
    assert units(fleet)[("demo", "interactive")]["state"] == "ready"  # pinned: stays
    started = time.monotonic()
    r = post(fleet, fleet.key, "sleepy")
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    assert time.monotonic() - started < 90
    assert units(fleet)[("sleepy", "interactive")]["cold_starts"] == 1
