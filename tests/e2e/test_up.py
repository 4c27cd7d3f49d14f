"""`mlxfleet up` as a user runs it: one process, the demo model, the printed endpoint and key."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FREE_PORTS, Proc, mlxfleet, wait_for

PRESET_KEY = "mlxf-preset-key-for-the-test-0123456789"
UP_TIMEOUT_S = 120.0


def test_up_serves_the_demo_model_with_the_preset_key(tmp_path: Path, procs: list[Proc]) -> None:
    """Starts the real `mlxfleet up` (coordinator, agent, engine) with MLXFLEET_HOME relocated."""
    home = tmp_path / "home"
    up = Proc(
        mlxfleet("up", *FREE_PORTS),
        tmp_path / "up.log",
        env={"MLXFLEET_HOME": str(home), "MLXFLEET_API_KEY": PRESET_KEY},
    )
    procs.append(up)
    banner = wait_for(
        lambda: re.search(r"endpoint\s+(\S+)", up.output()) or not up.alive(),
        UP_TIMEOUT_S,
        "mlxfleet up to print its endpoint",
    )
    assert up.alive(), up.output()
    assert isinstance(banner, re.Match)
    out = up.output()
    assert f"api key   {PRESET_KEY}" in out
    assert "gibberish" in out  # the demo model says plainly what it is
    assert (home / "models" / "mlxfleet-demo" / "config.json").exists()
    assert (home / "coordinator.sqlite3").exists()

    client = openai.OpenAI(base_url=banner.group(1), api_key=PRESET_KEY, max_retries=0)
    reply = client.chat.completions.create(
        model="mlxfleet-demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    chunks = list(
        client.chat.completions.create(
            model="mlxfleet-demo",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == sum(
        len(c.model_extra.get("mlxfleet", {}).get("token_ids", [])) for c in chunks
    )
    # the status page and the metrics it prints are there, and count what was just served
    status = re.search(r"^  status\s+(http\S+)", out, re.MULTILINE)
    metrics = re.search(r"^  metrics\s+(http\S+)", out, re.MULTILINE)
    assert status and metrics, out
    page = httpx.get(status.group(1))
    assert page.status_code == 200 and b"<title>mlxfleet" in page.content
    served = {
        (sample.labels["model"], sample.labels["tier"], sample.labels["status"]): sample.value
        for family in text_string_to_metric_families(httpx.get(metrics.group(1)).text)
        for sample in family.samples
        if sample.name == "mlxfleet_requests_total"
    }
    assert served == {("mlxfleet-demo", "interactive", "200"): 2.0}
    # MLX lives in the engine only: loaded in `up` its native threads can abort it at exit.
    maps = Path(f"/proc/{up.popen.pid}/maps").read_text()
    assert "libmlx" not in maps and "mlx/core" not in maps
    assert up.stop() == 0
    assert not (home / "coordinator.json").exists()
