"""`mlxfleet bench` end to end: the real CLI against a real demo-model fleet and against
`mlx_lm.server` with the same model on this machine.

Processes: coordinator, agent and engines (demo model, both tiers), `mlx_lm.server`, a tiny
HTTP server that answers stream=true with JSON, and the bench CLI itself as a subprocess (it
owns its event loop and SIGINT handling). Sizes stay small for a 2-core machine: short prompts,
few tokens, a few seconds per cell.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, Proc, mlxfleet, wait_for
from tests.e2e.fleet import Fleet, model_toml, running_fleet
from tests.http_stub import serving

pytestmark = pytest.mark.e2e

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OUTPUTS = ["report.json", "report.md", "throughput.png", "ttft.png"]
SMALL = ["--prompt-tokens", "64,256", "--max-tokens", "16", "--duration", "3"]
MLX_LM_READY_TIMEOUT_S = 120.0
BENCH_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Fleet]:
    config = model_toml(
        demo_model, tiers=["interactive", "batch"], pinned=True, context_length=2048
    )
    with running_fleet(
        tmp_path_factory, config, ready=[("demo", "interactive"), ("demo", "batch")]
    ) as f:
        yield f


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mlx_lm_server(
    tmp_path_factory: pytest.TempPathFactory, demo_model: Path
) -> Iterator[tuple[str, Proc]]:
    """mlx_lm.server on the demo model; ready once it answers a real completion (its /health
    answers before the model is loaded)."""
    port = free_port()
    logs = tmp_path_factory.mktemp("mlx_lm")
    argv = [sys.executable, "-m", "mlx_lm.server", "--model", str(demo_model)]
    proc = Proc([*argv, "--port", str(port)], logs / "mlx_lm_server.log")
    base = f"http://127.0.0.1:{port}/v1"
    body = {"model": "default_model", "messages": [{"role": "user", "content": "hi"}]}

    def answers() -> bool:
        assert proc.alive(), proc.output()[-4000:]
        try:
            reply = httpx.post(f"{base}/chat/completions", json={**body, "max_tokens": 1})
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    try:
        wait_for(answers, MLX_LM_READY_TIMEOUT_S, "mlx_lm.server to answer", poll_s=0.5)
        yield base, proc
    except BaseException:
        print("--- mlx_lm.server ---\n" + proc.output()[-4000:])
        raise
    finally:
        proc.stop()


def bench(*args: str, timeout_s: float = BENCH_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        mlxfleet("bench", *args), capture_output=True, text=True, timeout=timeout_s, cwd=REPO
    )


def counters(fleet: Fleet) -> dict[str, float]:
    """The gateway's demo-model counters: tokens generated, requests answered 200."""
    text = httpx.get(f"{fleet.base}/metrics").text
    totals = {"tokens": 0.0, "ok": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") != "demo" or not s.name.endswith("_total"):
                continue
            if s.name == "mlxfleet_generation_tokens_total":
                totals["tokens"] += s.value
            elif s.name == "mlxfleet_requests_total" and s.labels["status"] == "200":
                totals["ok"] += s.value
    return totals


def check_outputs(out: Path) -> dict:
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    for png in ("ttft.png", "throughput.png"):
        assert (out / png).read_bytes().startswith(PNG_SIGNATURE)
    return json.loads((out / "report.json").read_text())


def check_cells(
    run: dict, cells: list[tuple[int, int]], max_tokens: int, ignore_eos: bool = False
) -> None:
    """Every cell has every number, and its numbers agree with its requests."""
    assert [(c["prompt_tokens"], c["concurrency"]) for c in run["cells"]] == cells
    for cell in run["cells"]:
        mine = [
            s
            for s in run["samples"]
            if (s["prompt_tokens_wanted"], s["concurrency"])
            == (cell["prompt_tokens"], cell["concurrency"])
        ]
        assert len(mine) == cell["requests"] >= cell["concurrency"] and cell["failed"] == 0
        for name in ("ttft_s", "first_byte_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
            q = cell[name]
            assert q is not None and 0 < q["p50"] <= q["p95"] <= q["p99"], (name, q)
        assert cell["tail_ratio"] == pytest.approx(cell["ttft_s"]["p95"] / cell["ttft_s"]["p50"])
        assert cell["first_byte_s"]["p50"] <= cell["ttft_s"]["p50"]
        assert cell["completion_tokens"] == sum(s["completion_tokens"] for s in mine)
        rate = cell["completion_tokens"] / cell["duration_s"]
        assert cell["aggregate_tokens_per_s"] == pytest.approx(rate)
        # exact prompt lengths, through the endpoint's own tokenizer and chat template
        assert all(s["prompt_tokens"] == cell["prompt_tokens"] for s in mine)
        assert cell["prompt_tokens_missed"] == 0
        for s in mine:
            assert s["error"] is None and s["ttft_s"] is not None
            assert (s["finish_reason"] == "length") == (s["completion_tokens"] == max_tokens)
        assert cell["ran_to_max_tokens"] == sum(s["completion_tokens"] == max_tokens for s in mine)
        if ignore_eos:  # our fleet: sent by default, every request generates max_tokens
            assert cell["ran_to_max_tokens"] == cell["requests"]
        else:  # random weights: EOS is rare
            assert cell["ran_to_max_tokens"] >= cell["requests"] // 2


def test_interactive_bench_reports_every_field_and_counts_what_the_gateway_counts(
    fleet: Fleet, tmp_path: Path
) -> None:
    """A tiny tail-ratio limit trips (p95/p50 >= 1 always) and so does a tiny RSS limit: exit
    1, the report still written, every token the client counted is the one usage reports."""
    before = counters(fleet)
    out = tmp_path / "out"
    done = bench(
        "--endpoint", f"{fleet.base}/v1", "--model", "demo", "--key", fleet.key,
        "--concurrency", "1,2", *SMALL, "--out", str(out),
        "--gate-tail-ratio", "0.9", "--gate-rss-percent", "0.001",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    after = counters(fleet)
    report = check_outputs(out)
    assert (report["schema"], report["model"], report["workload"]) == (
        "mlxfleet-bench/1",
        "demo",
        "interactive",
    )
    assert report["endpoint"] == f"{fleet.base}/v1"
    assert fleet.key not in (out / "report.json").read_text() + (out / "report.md").read_text()
    [run] = report["runs"]
    assert not run["interrupted"] and run["sweep"] == {}
    check_cells(run, [(64, 1), (64, 2), (256, 1), (256, 2)], 16, ignore_eos=True)
    for s in run["samples"]:  # the client counted mlxfleet's token ids: exactly usage
        assert s["tokens_counted"] == s["completion_tokens"]
    # The gateway counted the bench's tokens plus one per preflight/calibration probe.
    probes = after["ok"] - before["ok"] - len(run["samples"])
    assert probes >= 3  # preflight, and at least one per prompt length
    generated = sum(s["completion_tokens"] for s in run["samples"])
    assert after["tokens"] - before["tokens"] == generated + probes

    gates = {g["name"]: g for g in run["gates"]}
    assert gates["tail_ratio"]["tripped"] and gates["tail_ratio"]["value"] >= 1.0
    assert gates["rss"]["tripped"] and gates["rss"]["value"] > 0.001
    assert not gates["swap"]["tripped"]
    snapshot = run["snapshot"]
    assert snapshot["fleet"] and snapshot["chips"] and snapshot["mlx_versions"]
    assert snapshot["mlx_lm_versions"] and snapshot["ram_bytes"] > 0
    assert snapshot["batch_window_ms"] is not None and snapshot["max_concurrency"] is not None
    resources = run["resources"]
    assert resources["source"] == "fleet" and resources["samples"] > 0
    assert resources["rss_peak_bytes"] > 0 and 0 < resources["rss_peak_percent"] < 100
    markdown = (out / "report.md").read_text()
    assert "TTFT" in markdown and "tail_ratio" in markdown
    assert "gate tail_ratio: TRIPPED" in done.stdout and "gate rss: TRIPPED" in done.stdout


def test_a_batch_sweep_runs_once_per_knob_value_and_restores_the_knob(
    fleet: Fleet, tmp_path: Path
) -> None:
    """--sweep batch-window: one run per value, each snapshot shows it in force, the knob is
    back afterwards; with --ignore-eos every request generates exactly --max-tokens."""
    before = httpx.get(f"{fleet.base}/ui/status").json()["tiers"]["batch"]["batch_window_ms"]
    out = tmp_path / "out"
    done = bench(
        "--endpoint", f"{fleet.base}/v1", "--model", "demo", "--key", fleet.key,
        "--workload", "batch", "--concurrency", "1,4", "--prompt-tokens", "64",
        "--max-tokens", "32", "--duration", "3", "--out", str(out),
        "--sweep", "batch-window=20,60", "--home", str(fleet.home), "--gate-tail-ratio", "1000",
        "--ignore-eos",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = check_outputs(out)
    assert report["workload"] == "batch"
    assert [r["sweep"] for r in report["runs"]] == [
        {"batch_window_ms": 20},
        {"batch_window_ms": 60},
    ]
    for run, window in zip(report["runs"], (20, 60), strict=True):
        assert run["snapshot"]["batch_window_ms"] == window
        check_cells(run, [(64, 1), (64, 4)], 32)
        for cell in run["cells"]:
            assert cell["decode_tokens_per_s"]["p50"] > 0 and cell["aggregate_tokens_per_s"] > 0
            assert cell["ran_to_max_tokens"] == cell["requests"]  # --ignore-eos
    after = httpx.get(f"{fleet.base}/ui/status").json()["tiers"]["batch"]["batch_window_ms"]
    assert after == before  # restored
    assert "batch_window_ms=60" in (out / "report.md").read_text()


def test_ctrl_c_stops_cleanly_and_writes_what_was_measured(fleet: Fleet, tmp_path: Path) -> None:
    """A real SIGINT to the CLI in the middle of its first cell."""
    out = tmp_path / "out"
    log = tmp_path / "bench.log"
    argv = mlxfleet(
        "bench", "--endpoint", f"{fleet.base}/v1", "--model", "demo", "--key", fleet.key,
        "--concurrency", "2,4", "--prompt-tokens", "64", "--max-tokens", "16",
        "--duration", "120", "--out", str(out),
    )  # fmt: skip
    before = counters(fleet)["ok"]
    with log.open("w") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO)
        try:
            wait_for(lambda: "cell 1/2" in log.read_text(), 120, "the first cell to start")
            wait_for(lambda: counters(fleet)["ok"] >= before + 10, 60, "requests to finish")
            proc.send_signal(signal.SIGINT)
            stdout, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, log.read_text()[-3000:]
    assert "interrupted" in stdout
    report = check_outputs(out)
    [run] = report["runs"]
    assert run["interrupted"]
    assert [c["concurrency"] for c in run["cells"]] == [2]  # the second cell never started
    assert run["cells"][0]["requests"] == len(run["samples"]) >= 5
    assert all(s["error"] is None for s in run["samples"])


class JsonOnly(BaseHTTPRequestHandler):
    """An OpenAI-ish endpoint that ignores stream=true and answers JSON."""

    def _json(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self._json({"object": "list", "data": [{"id": "plain"}]})

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self._json({"choices": [{"message": {"role": "assistant", "content": "hi"}}]})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def json_only() -> Iterator[str]:
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), JsonOnly)) as port:
        yield f"http://127.0.0.1:{port}/v1"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unreachable", "cannot reach http://127.0.0.1:"),
        ("wrong key", "refused the API key (HTTP 401: missing or invalid API key"),
        ("unknown model", "does not serve model 'nope': HTTP 404: model 'nope' does not exist"),
        ("not streaming", "does not stream: a stream=true request got Content-Type"),
    ],
)
def test_bad_input_is_one_error_line_exit_2_and_no_files(
    fleet: Fleet, json_only: str, tmp_path: Path, case: str, message: str
) -> None:
    endpoint, model, key = {
        "unreachable": (f"http://127.0.0.1:{free_port()}/v1", "demo", fleet.key),
        "wrong key": (f"{fleet.base}/v1", "demo", "not-a-key"),
        "unknown model": (f"{fleet.base}/v1", "nope", fleet.key),
        "not streaming": (json_only, "plain", "any"),
    }[case]
    out = tmp_path / "out"
    done = bench(
        "--endpoint", endpoint, "--model", model, "--key", key, *SMALL, "--out", str(out),
        timeout_s=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("mlxfleet: error: ") and message in line, line
    assert not out.exists()
    assert done.stdout == ""


def test_the_same_workload_runs_against_mlx_lm_server_and_compares(
    fleet: Fleet, mlx_lm_server: tuple[str, Proc], tmp_path: Path
) -> None:
    """The same cells against mlx_lm.server: exact prompt lengths through its tokenizer, its
    RSS from its pid, no fleet; then `bench compare` matches the cells of both reports."""
    base, proc = mlx_lm_server
    cells = ["--concurrency", "1,2", "--prompt-tokens", "64", "--max-tokens", "16"]
    runs = {"ours": (f"{fleet.base}/v1", "demo", fleet.key), "theirs": (base, "default_model", "")}
    for name, (endpoint, model, key) in runs.items():
        done = bench(
            "--endpoint", endpoint, "--model", model, "--key", key, *cells, "--duration", "3",
            "--out", str(tmp_path / name), "--gate-tail-ratio", "1000",
            *(["--server-pid", str(proc.popen.pid)] if name == "theirs" else []),
        )  # fmt: skip
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
    theirs = check_outputs(tmp_path / "theirs")
    [run] = theirs["runs"]
    check_cells(run, [(64, 1), (64, 2)], 16)
    assert all(s["tokens_counted"] is None for s in run["samples"])  # no mlxfleet token ids
    assert not run["snapshot"]["fleet"]
    assert run["resources"]["source"] == "local" and run["resources"]["rss_peak_bytes"] > 0

    compared = subprocess.run(
        mlxfleet(
            "bench", "compare", str(tmp_path / "ours" / "report.json"),
            str(tmp_path / "theirs" / "report.json"),
        ),
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert compared.returncode in (0, 1), compared.stderr
    assert "| Cell | Metric |" in compared.stdout
    assert "64" in compared.stdout and "Only in" not in compared.stdout  # every cell matched
