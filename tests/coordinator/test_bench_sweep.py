"""--sweep: parsing the knob and values, and TierKnobs against the real gateway's admin API."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from coordinator.bench.errors import BenchError
from coordinator.bench.snapshot import knobs_in_force, take_snapshot
from coordinator.bench.sweep import TierKnobs, parse_sweep
from coordinator.server import ADMIN_TOKEN_FILE
from mlxfleet.tiers import DEFAULT_KNOBS
from tests.coordinator.test_bench_snapshot import ADMIN_TOKEN, running_fleet

BEARER = f"Bearer {ADMIN_TOKEN}"
TIERS = "/admin/v1/tiers"


def test_parse_sweep_names_the_admin_knob() -> None:
    assert parse_sweep("batch-window=50,80,200") == ("batch_window_ms", [50, 80, 200])
    assert parse_sweep("max-batch-size=1,4") == ("max_batch_size", [1, 4])
    assert parse_sweep("max-concurrency=16") == ("max_concurrency", [16])
    assert parse_sweep(" queue-limit = 8, 16 ") == ("queue_limit", [8, 16])
    assert parse_sweep("batch-window=0") == ("batch_window_ms", [0])  # no window is a value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "batch-window",
            "--sweep 'batch-window': expected KNOB=V1,V2,... with KNOB one of batch-window, "
            "max-batch-size, max-concurrency, queue-limit",
        ),
        ("window=50", "--sweep 'window=50': expected KNOB=V1,V2,..."),
        ("batch_window_ms=50", "--sweep 'batch_window_ms=50': expected KNOB=V1,V2,..."),
        ("batch-window=", "--sweep 'batch-window=': '' is not an integer"),
        ("batch-window=50,,80", "--sweep 'batch-window=50,,80': '' is not an integer"),
        ("batch-window=fast", "--sweep 'batch-window=fast': 'fast' is not an integer"),
        ("batch-window=2.5", "--sweep 'batch-window=2.5': '2.5' is not an integer"),
        ("batch-window=50,80,50", "--sweep 'batch-window=50,80,50': 50 is listed twice"),
        (
            "batch-window=20000",
            "--sweep 'batch-window=20000': batch_window_ms must be an integer 0-10000, got 20000",
        ),
        (
            "max-concurrency=0",
            "--sweep 'max-concurrency=0': max_concurrency must be an integer 1-256, got 0",
        ),
    ],
)
def test_parse_sweep_refuses_bad_text_in_one_line(text: str, message: str) -> None:
    with pytest.raises(BenchError) as caught:
        parse_sweep(text)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_the_token_file_is_the_coordinators() -> None:
    assert ADMIN_TOKEN_FILE == "admin_token"  # sweep.py reads MLXFLEET_HOME/admin_token


async def test_set_changes_the_tier_and_exit_restores_it(tmp_path: Path) -> None:
    async with running_fleet(tmp_path) as fleet, aiohttp.ClientSession() as session:
        window = DEFAULT_KNOBS["interactive"].batch_window_ms
        async with TierKnobs(session, fleet.root + "/", "interactive", fleet.home) as knobs:
            for value in (50, 80, 200):
                reply = await knobs.set("batch_window_ms", value)
                assert reply["batch_window_ms"] == value
                assert fleet.reconciler.knobs("interactive").batch_window_ms == value
                snap = await take_snapshot(session, fleet.root, "interactive")
                assert snap.knobs["batch_window_ms"] == value  # what the run records
                # The two engines still report 25 and 50 ms (no engine process here follows
                # the change): they disagree, so the tier's value is the one in force.
                assert snap.batch_window_ms == value
                trio = await knobs_in_force(session, fleet.root, "interactive")
                assert trio == {"batch_window_ms": value, "max_batch_size": 2, "max_concurrency": 2}
            assert fleet.reconciler.knobs("batch") == DEFAULT_KNOBS["batch"]  # untouched
        assert fleet.reconciler.knobs("interactive").batch_window_ms == window
        assert fleet.requests == [
            ("GET", TIERS, BEARER, None),
            ("POST", f"{TIERS}/interactive", BEARER, {"batch_window_ms": 50}),
            ("POST", f"{TIERS}/interactive", BEARER, {"batch_window_ms": 80}),
            ("POST", f"{TIERS}/interactive", BEARER, {"batch_window_ms": 200}),
            ("POST", f"{TIERS}/interactive", BEARER, {"batch_window_ms": window}),
        ]


async def test_restore_puts_every_changed_knob_back_after_a_failure(tmp_path: Path) -> None:
    async with running_fleet(tmp_path) as fleet, aiohttp.ClientSession() as session:
        fleet.reconciler.set_tier_knobs("batch", {"queue_limit": 99})  # set before the bench
        with pytest.raises(RuntimeError):
            async with TierKnobs(session, fleet.root, "batch", fleet.home) as knobs:
                await knobs.set("max_concurrency", 3)
                await knobs.set("queue_limit", 7)
                await knobs.set("queue_limit", 8)
                raise RuntimeError("the run failed")
        after = fleet.reconciler.knobs("batch")
        assert (after.max_concurrency, after.queue_limit) == (12, 99)
        assert fleet.requests[-1] == (
            "POST",
            f"{TIERS}/batch",
            BEARER,
            {"max_concurrency": 12, "queue_limit": 99},
        )
        # Nothing changed, nothing to put back: restore sends nothing.
        count = len(fleet.requests)
        knobs = TierKnobs(session, fleet.root, "batch", fleet.home)
        await knobs.restore()
        assert len(fleet.requests) == count


async def test_the_coordinators_refusals_are_one_line_errors(tmp_path: Path) -> None:
    async with running_fleet(tmp_path) as fleet, aiohttp.ClientSession() as session:
        knobs = TierKnobs(session, fleet.root, "interactive", fleet.home)
        with pytest.raises(BenchError, match="answered 400: batch_window_ms must be an integer"):
            await knobs.set("batch_window_ms", 20_000)
        assert fleet.reconciler.knobs("interactive") == DEFAULT_KNOBS["interactive"]
        with pytest.raises(BenchError, match="has no interactive knob 'kv_bits'"):
            await knobs.set("kv_bits", 4)

        other = tmp_path / "other-home"
        other.mkdir()
        (other / "admin_token").write_text("not-this-coordinators\n")
        with pytest.raises(BenchError) as caught:
            await TierKnobs(session, fleet.root, "interactive", other).set("batch_window_ms", 50)
        assert str(caught.value) == (
            f"the admin token in {other / 'admin_token'} is not the one of the coordinator "
            f"at {fleet.root}"
        )
        assert fleet.requests[-1][2] == "Bearer not-this-coordinators"
        assert fleet.reconciler.knobs("interactive") == DEFAULT_KNOBS["interactive"]

        with pytest.raises(BenchError) as caught:
            async with TierKnobs(session, fleet.root, "interactive", tmp_path / "nowhere"):
                pass
        assert str(caught.value).startswith(
            f"--sweep needs the coordinator's admin token: no {tmp_path / 'nowhere/admin_token'}"
        )

        # The coordinator goes away before the knob is put back: the error names the value.
        knobs = TierKnobs(session, fleet.root, "interactive", fleet.home)
        await knobs.set("max_batch_size", 2)
    with pytest.raises(BenchError) as caught:
        async with aiohttp.ClientSession() as session:
            knobs._session = session
            await knobs.restore()
    assert str(caught.value).startswith(
        "could not restore the interactive tier's max_batch_size=4 (use `mlxfleet tiers set`): "
        f"the coordinator at {fleet.root} is not reachable"
    )


async def test_an_endpoint_that_is_not_our_fleet_cannot_sweep(tmp_path: Path) -> None:
    """A stand-in OpenAI server: no admin API."""

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"data": []})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    root = f"http://127.0.0.1:{runner.addresses[0][1]}"
    (tmp_path / "admin_token").write_text("token\n")
    try:
        async with aiohttp.ClientSession() as session:
            assert await knobs_in_force(session, root, "interactive") == {}
            with pytest.raises(BenchError) as caught:
                async with TierKnobs(session, root, "interactive", tmp_path):
                    pass
    finally:
        await runner.cleanup()
    assert str(caught.value) == f"{root} has no mlxfleet admin API: --sweep needs our fleet"
