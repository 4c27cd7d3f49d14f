"""`mlxfleet bench`: the acceptance ladder against any OpenAI-compatible endpoint, and
`mlxfleet bench compare A.json B.json`.

Exit status: 0 every gate passed, 1 a gate tripped (compare: a change for the worse beyond
noise), 2 an error (nothing is written when it happens before the first measurement), 130
Ctrl-C (what was measured until then is written). The bench reads this machine with the node
agent's probe, handed to it here: coordinator.bench itself never imports the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from coordinator.bench.client import Endpoint
from coordinator.bench.errors import BenchError
from coordinator.bench.gates import MIB, GateLimits
from coordinator.bench.machine import MachineProbe
from coordinator.bench.progress import ProgressLine
from coordinator.bench.runner import Bench, BenchConfig, Outcome
from coordinator.config import default_home
from node_agent.errors import Error as ProbeError
from node_agent.probes import local_probe

logger = logging.getLogger(__name__)

EXIT_GATE = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
DEFAULT_CONCURRENCY = "1,4,16"
DEFAULT_PROMPT_TOKENS = "128,2048,8192"  # prefill blows up at 8K: part of the default sweep
DEFAULT_MAX_TOKENS = 128
DEFAULT_DURATION_S = 30.0  # per cell


def _positive_ints(text: str) -> tuple[int, ...]:
    """ "1,4,16" -> (1, 4, 16), ascending, without repeats."""
    try:
        values = {int(part) for part in text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers like 1,4,16") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 1")
    return tuple(sorted(values))


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
        return value

    return parse


def _shown(value: Any) -> str:
    """A default as one would type it: 30 (not 30.0), 1,4,16."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _numbers(parser: argparse.ArgumentParser, rows: list[tuple[str, Any, Any, str, str]]) -> None:
    """Flags from (flag, parser, default, metavar, help) rows; the help names the default
    where its text has {} (else at its end)."""
    for flag, parse, default, metavar, text in rows:
        text = text if "{}" in text else text + " (default {})"
        help_text = text.replace("{}", _shown(default))
        parser.add_argument(flag, type=parse, default=default, metavar=metavar, help=help_text)


def add_parser(subparsers: Any) -> None:
    """`bench ...` and `bench compare A B`."""
    bench = subparsers.add_parser(
        "bench", help="benchmark an OpenAI-compatible endpoint (ours or another engine)"
    )
    verbs = bench.add_subparsers(dest="bench_command")
    compare = verbs.add_parser("compare", help="changes between two reports beyond noise")
    compare.add_argument("a", type=Path, help="the baseline report.json")
    compare.add_argument("b", type=Path, help="the report.json to compare with it")
    compare.set_defaults(func=cmd_compare)

    add = bench.add_argument
    add("--endpoint", help="base URL, e.g. http://127.0.0.1:8400/v1")
    add("--model", help="the model name the endpoint serves")
    add(
        "--workload",
        choices=("interactive", "batch"),
        default="interactive",
        help="streaming chats led by TTFT, or the batch tier's ramp led by tokens/s",
    )
    add("--key", help="API key (default $MLXFLEET_API_KEY; none if unset)")
    _numbers(
        bench,
        [
            ("--concurrency", _positive_ints, _positive_ints(DEFAULT_CONCURRENCY), "C,C",
             "requests in flight per cell"),
            ("--prompt-tokens", _positive_ints, _positive_ints(DEFAULT_PROMPT_TOKENS), "N,N",
             "exact prompt lengths"),
            ("--max-tokens", _positive(int), DEFAULT_MAX_TOKENS, "N",
             "tokens to generate per request"),
            ("--duration", _positive(float), DEFAULT_DURATION_S, "S", "seconds per cell"),
        ],
    )  # fmt: skip
    add(
        "--sweep",
        metavar="KNOB=V,V",
        help="our fleet: one run per value of a tier knob, e.g. batch-window=50,80,200",
    )
    add("--home", help="the coordinator's state folder, for --sweep (default $MLXFLEET_HOME)")
    add("--out", type=Path, help="output folder (default ./mlxfleet-bench-<UTC time>)")
    add(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send ignore_eos, generating exactly --max-tokens (vLLM's extension; default: "
        "on for an mlxfleet gateway, whose engines take it, off elsewhere)",
    )
    add(
        "--server-pid",
        type=int,
        metavar="PID",
        help="the endpoint's process on this machine: its RSS for the trio (not a fleet)",
    )
    limits = GateLimits()
    _numbers(
        bench,
        [
            ("--gate-tail-ratio", _positive(float), limits.tail_ratio, "R",
             "exit 1 above this TTFT p95/p50"),
            ("--gate-swap-mib", _positive(int), limits.swap_bytes // MIB, "MIB",
             "exit 1 when swap stays above this (default {}) ..."),
            ("--gate-swap-s", _positive(float), limits.swap_for_s, "S",
             "... for this long"),
            ("--gate-rss-percent", _positive(float), limits.rss_percent, "P",
             "exit 1 above this RSS peak, %% of RAM"),
        ],
    )  # fmt: skip
    bench.set_defaults(func=cmd_bench)


def cmd_compare(args: argparse.Namespace) -> int:
    from coordinator.bench.compare import compare, load, render

    comparison = compare(load(args.a), load(args.b))
    print(render(comparison), end="")
    return comparison.exit_status


def redact(argv: list[str]) -> list[str]:
    """The command line for the report, without the API key's value."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--key="):
            out[i] = "--key=***"
        elif arg == "--key" and i + 1 < len(out):
            out[i + 1] = "***"
    return out


def config_from(args: argparse.Namespace, argv: list[str]) -> BenchConfig:
    """The one config of a bench invocation, from its arguments and environment."""
    from coordinator.bench.sweep import parse_sweep

    if not args.endpoint or not args.model:
        raise BenchError("bench needs --endpoint URL and --model NAME")
    base = args.endpoint.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise BenchError(f"--endpoint {args.endpoint!r}: expected an http:// or https:// URL")
    if base.count("/") == 2:  # no path: the OpenAI API's usual place
        base += "/v1"
    sweep = None
    if args.sweep:
        knob, values = parse_sweep(args.sweep)
        sweep = (knob, tuple(values))
    return BenchConfig(
        endpoint=Endpoint(
            base_url=base,
            key=args.key or os.environ.get("MLXFLEET_API_KEY") or None,
            model=args.model,
            tier=args.workload,
            extra_body={},
        ),
        workload=args.workload,
        concurrency=args.concurrency,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        duration_s=args.duration,
        limits=GateLimits(
            tail_ratio=args.gate_tail_ratio,
            swap_bytes=args.gate_swap_mib * MIB,
            swap_for_s=args.gate_swap_s,
            rss_percent=args.gate_rss_percent,
        ),
        sweep=sweep,
        home=Path(args.home or default_home()).expanduser(),
        server_pid=args.server_pid,
        argv=tuple(argv),
        ignore_eos=args.ignore_eos,
    )


def machine_probe() -> MachineProbe | None:
    """This machine's probe (the node agent's); None on an OS without one."""
    try:
        return local_probe()
    except ProbeError as exc:
        logger.warning("cannot read this machine: %s", exc)
        return None


def cmd_bench(args: argparse.Namespace) -> int:
    from coordinator.bench.report import write_outputs

    config = config_from(args, ["mlxfleet", *redact(sys.argv[1:])])
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out: Path = args.out or Path(f"mlxfleet-bench-{stamp}")
    if (out / "report.json").exists():
        raise BenchError(f"--out {out} already holds a report: choose another folder")
    try:
        outcome = asyncio.run(_bench(config, machine_probe()))
    except asyncio.CancelledError:  # Ctrl-C before the first measurement
        print("mlxfleet: interrupted before anything was measured", file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.failure is not None and not outcome.report.runs:
        raise BenchError(f"stopped: {outcome.failure} (nothing was measured)")
    if not outcome.report.runs:
        print("mlxfleet: interrupted before a request finished: nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    paths = write_outputs(outcome.report, out)
    _print_summary(outcome, paths)
    if outcome.failure is not None:
        raise BenchError(f"stopped: {outcome.failure} (what was measured is in {out})")
    if outcome.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_GATE if outcome.report.tripped else 0


async def _bench(config: BenchConfig, probe: MachineProbe | None) -> Outcome:
    """Run the bench with the progress line; the first Ctrl-C stops it cleanly (before the
    first cell: cancels everything), a second one stops at once."""
    cells = len(config.concurrency) * len(config.prompt_tokens)
    progress = ProgressLine(sys.stderr, cells * (len(config.sweep[1]) if config.sweep else 1))
    bench = Bench(config, progress, probe)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None

    def on_sigint() -> None:
        loop.remove_signal_handler(signal.SIGINT)
        if bench.measuring:
            progress.note("interrupted: finishing with what was measured")
            bench.interrupt()
        else:
            main.cancel()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        async with progress:
            return await bench.run()
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def _print_summary(outcome: Outcome, paths: list[Path]) -> None:
    runs = outcome.report.runs
    requests = sum(len(r.samples) for r in runs)
    failed = sum(c.failed for r in runs for c in r.cells)
    print(f"{requests} requests ({failed} failed) in {sum(len(r.cells) for r in runs)} cells")
    for run in runs:
        label = ", ".join(f"{k}={v}" for k, v in run.sweep.items())
        for gate in run.gates:
            verdict = "TRIPPED" if gate.tripped else "ok"
            print(f"gate {gate.name}{f' ({label})' if label else ''}: {verdict}: {gate.detail}")
    if outcome.interrupted:
        print("interrupted: the report holds what was measured until then")
    print("wrote " + ", ".join(str(p) for p in paths))
