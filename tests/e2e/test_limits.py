"""Key limits end to end: real coordinator, agent and engine (demo model) on 127.0.0.1.

Real processes, because the limits are read from the store the CLI writes and answered by the
gateway in front of a real engine, with the official client on the other side.
"""

from __future__ import annotations

from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.e2e.fleet import model_toml, running_fleet

KEYS = {"slow": ("--rpm", "2"), "elsewhere": ("--models", "big,small"), "tiny": ("--tpm", "100")}


def test_key_limits_answer_429_and_403(
    tmp_path_factory: pytest.TempPathFactory, demo_model: Path
) -> None:
    config = model_toml(demo_model)
    with running_fleet(tmp_path_factory, config, keys=KEYS) as fleet:
        two_a_minute = fleet.keys["slow"]
        other_models = fleet.keys["elsewhere"]
        small_tpm = fleet.keys["tiny"]

        def post(key: str, max_tokens: int = 2) -> httpx.Response:
            return httpx.post(
                f"{fleet.base}/v1/chat/completions",
                json={
                    "model": "demo",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": max_tokens,
                },
                headers={"Authorization": f"Bearer {key}"},
                timeout=90,
            )

        assert [post(two_a_minute).status_code for _ in range(2)] == [200, 200]
        refused = post(two_a_minute)
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error"
        assert error["code"] == "rate_limit_exceeded"
        assert error["param"] is None
        assert "2 requests per minute" in error["message"]

        client = fleet.client(other_models)
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

        # The other dialects share the key's window and answer in their own shape.
        hi = [{"role": "user", "content": "hi"}]
        claude = anthropic.Anthropic(base_url=fleet.base, api_key=two_a_minute, max_retries=0)
        with pytest.raises(anthropic.RateLimitError) as limited:
            claude.messages.create(model="demo", max_tokens=2, messages=hi)
        assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
        assert 1 <= int(limited.value.response.headers["Retry-After"]) <= 60
        with pytest.raises(openai.RateLimitError):
            fleet.client(two_a_minute).responses.create(model="demo", input="hi")
        elsewhere = anthropic.Anthropic(base_url=fleet.base, api_key=other_models, max_retries=0)
        with pytest.raises(anthropic.PermissionDeniedError) as refused_model:
            elsewhere.messages.create(model="demo", max_tokens=2, messages=hi)
        assert refused_model.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
