"""`mlxfleet bench` at its edge: arguments, the one config, the progress line, the exit
statuses and the files, against a fake endpoint served from a thread."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from coordinator.bench.errors import EndpointUnreachable, KeyRefused
from coordinator.bench.gates import MIB
from coordinator.bench.progress import ProgressLine
from coordinator.cli import bench as cli_bench
from tests.coordinator.fake_endpoint import Behaviour, serving_in_thread

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mlxfleet")
    cli_bench.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def test_defaults_are_the_issues_sweep_and_gates() -> None:
    args = parse("--endpoint", "http://h:8400/v1", "--model", "m")
    assert args.func is cli_bench.cmd_bench
    assert args.concurrency == (1, 4, 16) and args.prompt_tokens == (128, 2048, 8192)
    assert args.workload == "interactive"
    config = cli_bench.config_from(args, ["mlxfleet", "bench"])
    assert config.limits.tail_ratio == 2.8 and config.limits.swap_bytes == 768 * MIB
    assert config.limits.swap_for_s == 90 and config.limits.rss_percent == 82
    assert config.endpoint.extra_body == {} and config.sweep is None


def test_lists_are_sorted_and_bad_values_are_usage_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = parse("--concurrency", "16,1,4,4", "--prompt-tokens", "64")
    assert args.concurrency == (1, 4, 16) and args.prompt_tokens == (64,)
    for bad in (["--concurrency", "0,1"], ["--prompt-tokens", "a"], ["--duration", "-1"]):
        with pytest.raises(SystemExit) as exit_:
            parse(*bad)
        assert exit_.value.code == 2
    assert "every value must be at least 1" in capsys.readouterr().err


def test_the_config_normalizes_the_endpoint_and_reads_the_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLXFLEET_API_KEY", "from-env")
    args = parse(
        "--endpoint", "http://h:8400/", "--model", "m", "--workload", "batch", "--ignore-eos",
        "--sweep", "batch-window=50,80", "--gate-tail-ratio", "1.5", "--gate-swap-mib", "10",
    )  # fmt: skip
    config = cli_bench.config_from(args, ["mlxfleet", "bench"])
    assert config.endpoint.base_url == "http://h:8400/v1"
    assert config.endpoint.key == "from-env" and config.endpoint.tier == "batch"
    assert config.ignore_eos is True  # asked for; None (the default) means: on for our fleet
    assert config.sweep == ("batch_window_ms", (50, 80))
    assert config.limits.tail_ratio == 1.5 and config.limits.swap_bytes == 10 * MIB
    args = parse("--endpoint", "http://h/openai/v1", "--model", "m", "--key", "k")
    assert cli_bench.config_from(args, []).endpoint.base_url == "http://h/openai/v1"
    assert cli_bench.config_from(args, []).endpoint.key == "k"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "m"], "needs --endpoint URL and --model NAME"),
        (["--endpoint", "ftp://h", "--model", "m"], "expected an http:// or https:// URL"),
        (["--endpoint", "http://h", "--model", "m", "--sweep", "nope=1"], "--sweep 'nope=1'"),
    ],
)
def test_a_bad_argument_is_one_error(argv: list[str], message: str) -> None:
    with pytest.raises(cli_bench.BenchError, match=message):
        cli_bench.config_from(parse(*argv), [])


async def test_the_progress_line_is_rewritten_on_a_terminal_and_plain_in_a_log() -> None:
    tty, log = io.StringIO(), io.StringIO()
    for stream, is_tty in ((tty, True), (log, False)):
        progress = ProgressLine(stream, 4, tty=is_tty)
        async with progress:
            progress.start_cell("64 prompt tokens x 1")
            progress.request_done(True)
            progress.request_done(False)
    assert log.getvalue().splitlines() == [
        "bench: cell 1/4 (64 prompt tokens x 1), 0 requests, 0:00 elapsed"
    ]
    assert tty.getvalue() == (
        "\r\033[Kbench: cell 1/4 (64 prompt tokens x 1), 2 requests (1 failed), 0:00 elapsed\n"
    )


def bench_args(base: str, out: Path, *extra: str) -> argparse.Namespace:
    return parse(
        "--endpoint", base, "--model", "fake", "--key", "secret", "--concurrency", "1,2",
        "--prompt-tokens", "32", "--max-tokens", "3", "--duration", "0.6", "--out", str(out),
        "--gate-tail-ratio", "50", *extra,  # a fake this fast has a jittery tail
    )  # fmt: skip


def test_a_run_writes_the_report_and_a_tripped_gate_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with serving_in_thread(Behaviour(first_token_delay_s=0.01)) as base:
        status = cli_bench.cmd_bench(bench_args(base, tmp_path / "ok"))
        assert status == 0, capsys.readouterr()
        tripped = cli_bench.cmd_bench(bench_args(base, tmp_path / "t", "--gate-tail-ratio", "0.9"))
    assert tripped == cli_bench.EXIT_GATE  # p95 >= p50: a ratio limit below 1 always trips
    assert "gate tail_ratio: TRIPPED" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "ok").iterdir())
    assert names == ["report.json", "report.md", "throughput.png", "ttft.png"]
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert [c["concurrency"] for c in report["runs"][0]["cells"]] == [1, 2]
    for png in ("ttft.png", "throughput.png"):
        assert (tmp_path / "ok" / png).read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(cli_bench.BenchError, match="already holds a report"):
        cli_bench.cmd_bench(bench_args(base, tmp_path / "ok"))


@pytest.mark.parametrize(
    ("behaviour", "error"), [(Behaviour(key="other"), KeyRefused), (None, EndpointUnreachable)]
)
def test_a_bad_endpoint_writes_nothing(
    tmp_path: Path, behaviour: Behaviour | None, error: type[Exception]
) -> None:
    out = tmp_path / "out"
    if behaviour is None:
        with pytest.raises(error):
            cli_bench.cmd_bench(bench_args("http://127.0.0.1:9/v1", out))
    else:
        with serving_in_thread(behaviour) as base, pytest.raises(error):
            cli_bench.cmd_bench(bench_args(base, out))
    assert not out.exists()


def test_compare_prints_the_table_and_its_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with serving_in_thread(Behaviour()) as base:
        for name in ("a", "b"):
            assert cli_bench.cmd_bench(bench_args(base, tmp_path / name)) == 0
    capsys.readouterr()
    args = parse(
        "compare", str(tmp_path / "a" / "report.json"), str(tmp_path / "b" / "report.json")
    )
    assert args.func(args) in (0, 1)
    assert "| Cell | Metric |" in capsys.readouterr().out


def test_the_reported_command_line_never_holds_the_key() -> None:
    argv = ["bench", "--key", "sk-1", "--model", "m", "--key=sk-2", "--endpoint", "http://h"]
    assert cli_bench.redact(argv) == [
        "bench", "--key", "***", "--model", "m", "--key=***", "--endpoint", "http://h",
    ]  # fmt: skip
