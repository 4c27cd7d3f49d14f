"""Key limits end to end: real coordinator, agent and engine (demo model) on 127.0.0.1.

Real processes, because the limits are read from the store the CLI writes and answered by the
gateway in front of a real engine, with the official client on the other side.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Proc, mlxfleet, run_ok, start_agent, start_coordinator, wait_for

READY_TIMEOUT_S = 120.0


def test_key_limits_answer_429_and_403(tmp_path: Path, demo_model: Path, procs: list[Proc]) -> None:
    home = tmp_path / "coord"
    home.mkdir()
    (home / "fleet.toml").write_text(f'[[models]]\nname = "demo"\nsource = "{demo_model}"\n')
    coordinator, runtime = start_coordinator(home, home / "fleet.toml", tmp_path / "coord.log")
    procs.append(coordinator)

    def key(*args: str) -> str:
        return run_ok(mlxfleet("keys", "create", *args, "--home", str(home)))

    two_a_minute = key("--name", "slow", "--rpm", "2")
    other_models = key("--name", "elsewhere", "--models", "big,small")
    small_tpm = key("--name", "tiny", "--tpm", "100")
    procs.append(start_agent(home, runtime, tmp_path / "agent", tmp_path / "agent.log"))
    base = f"http://127.0.0.1:{runtime['gateway_port']}"

    def post(key: str, max_tokens: int = 2) -> httpx.Response:
        return httpx.post(
            f"{base}/v1/chat/completions",
            json={
                "model": "demo",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": max_tokens,
            },
            headers={"Authorization": f"Bearer {key}"},
            timeout=90,
        )

    def ready() -> bool:
        r = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {small_tpm}"})
        return any(m["id"] == "demo" for m in r.json()["data"])

    try:
        wait_for(ready, READY_TIMEOUT_S, "the demo model to be routable")
        assert [post(two_a_minute).status_code for _ in range(2)] == [200, 200]
        refused = post(two_a_minute)
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error"
        assert error["code"] == "rate_limit_exceeded"
        assert error["param"] is None
        assert "2 requests per minute" in error["message"]

        client = openai.OpenAI(base_url=f"{base}/v1", api_key=other_models, max_retries=0)
        with pytest.raises(openai.PermissionDeniedError) as denied:
            client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        assert denied.value.code == "model_not_allowed"
        assert "may not use model 'demo' (allowed: big, small)" in denied.value.message
        assert [m.id for m in client.models.list()] == []  # nor is it listed for this key

        too_big = post(small_tpm, max_tokens=200)
        assert too_big.status_code == 429 and "Retry-After" not in too_big.headers
        assert too_big.json()["error"]["param"] == "max_tokens"
        assert post(small_tpm, max_tokens=2).status_code == 200
    except BaseException:
        for proc in procs:
            print(f"--- {proc.log.name} ---\n" + proc.output()[-4000:])
        raise
