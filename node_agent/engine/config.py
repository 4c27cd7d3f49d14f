"""The engine's configuration, built once from argv and the environment."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from mlxfleet.errors import KnobError, KvCacheError
from mlxfleet.kv import (
    DEFAULT_KV_GROUP_SIZE,
    DEFAULT_PREFIX_CACHE_MIB,
    KV_GROUP_SIZES,
    QUANTIZED_KV_BITS,
    check_kv,
)
from mlxfleet.tiers import DEFAULT_KNOBS, TIERS, Knobs, Tier
from node_agent.errors import ConfigError

SECRET_ENV = "MLXFLEET_ENGINE_SECRET"
MLX_RANK_ENV, MLX_HOSTFILE_ENV = "MLX_RANK", "MLX_HOSTFILE"  # MLX's ring backend reads these
DEFAULT_GROUP_STALL_S = 5.0  # the gateway's stream stall limit (coordinator/config.py)
BEAT_FRACTION = 0.25  # a spinning group's idle rank 0 beats this often, a fraction of the stall
# Idle, MLX's ring waits for a message by spinning on a non-blocking receive: a core per rank.
# Instead rank 0 beats this often and the others sleep until just before the next beat; the
# first request after idle waits up to a tick for them (docs/benchmarks.md, benchmarks/
# group_idle.py: idle cores and that wait against spinning).
DEFAULT_GROUP_IDLE_TICK_MS = 25.0
DEFAULT_HOST = "127.0.0.1"
# The seeds' names (seed 001); honoured by the batch tier when the flags are not given.
KV_FLAGS = ("--kv-bits", "--kv-group-size", "--max-concurrency")  # check_kv names them
BATCH_ENV = {
    "batch_window_ms": "MLX_BATCH_BATCH_WINDOW_MS",
    "max_batch_size": "MLX_BATCH_MAX_BATCH_SIZE",
}


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """One rank of a model spread over several nodes (group.py). The rank and the ranks'
    addresses are MLX's own environment, MLX_RANK and MLX_HOSTFILE, which the agent sets."""

    group_id: str
    split: tuple[int, ...]  # layers per rank, as mlx-lm's pipeline() takes it
    stall_s: float  # a collective that takes longer means the group is broken
    rank: int = 0
    idle_tick_s: float = 0.0  # idle: rank 0 beats this often, the others sleep between; 0: spin


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything one engine process needs; the secret never appears in its repr."""

    model_path: Path
    model_name: str
    secret: str = field(repr=False)
    host: str = DEFAULT_HOST
    port: int = 0
    context_length: int | None = None
    tier: Tier = "interactive"
    knobs: Knobs = DEFAULT_KNOBS["interactive"]
    # None: the KV cache stays in the model's dtype. 8 or 4 (batch tier only): quantized, and
    # requests run one at a time (mlx-lm 0.32.2 cannot batch a quantized cache; sequential.py).
    kv_bits: int | None = None
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE
    prefix_cache_mib: int = DEFAULT_PREFIX_CACHE_MIB  # prefix_cache.py's budget, 0: off
    # Serve HTTPS with the node's certificate (an engine reached from another host).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    group: GroupSpec | None = None  # one rank of a group; None: the whole model here


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value}")
    return value


def _flag(knob: str) -> str:
    return "--" + knob.replace("_", "-")


def _knobs(args: argparse.Namespace, environ: Mapping[str, str]) -> Knobs:
    """Flags, then (batch tier) the seeds' environment variables, then the tier's defaults."""
    tier: Tier = args.tier
    values = DEFAULT_KNOBS[tier].as_dict()
    sources: dict[str, str] = {}  # knob -> the flag or variable that set it
    for name in values:
        env_name = BATCH_ENV.get(name) if tier == "batch" else None
        if getattr(args, name) is not None:
            sources[name], text = _flag(name), getattr(args, name)
        elif env_name is not None and environ.get(env_name, "").strip():
            sources[name], text = env_name, environ[env_name]
        else:
            continue
        try:
            values[name] = int(text)
        except ValueError:
            raise ConfigError(f"{sources[name]} must be an integer, got {text!r}") from None
    try:
        return Knobs(**values)
    except KnobError as exc:
        raise ConfigError(f"{sources.get(exc.knob, exc.knob)} {exc.reason}") from None


def _choice(flag: str, text: str, choices: tuple[int, ...]) -> int:
    allowed = ", ".join(map(str, choices))
    if not text.strip().isdigit() or int(text) not in choices:
        raise ConfigError(f"{flag} must be one of {allowed}, got {text!r}")
    return int(text)


def _kv(args: argparse.Namespace, knobs: Knobs) -> tuple[int | None, int, Knobs]:
    """(kv_bits, kv_group_size, knobs). A quantized KV cache is for the batch tier only and
    decodes one sequence at a time, so its max_concurrency and max_batch_size are 1."""
    if args.kv_bits is None:
        if args.kv_group_size is not None:
            raise ConfigError("--kv-group-size needs --kv-bits")
        return None, DEFAULT_KV_GROUP_SIZE, knobs
    bits = _choice("--kv-bits", args.kv_bits, QUANTIZED_KV_BITS)
    group_size = DEFAULT_KV_GROUP_SIZE
    if args.kv_group_size is not None:
        group_size = _choice("--kv-group-size", args.kv_group_size, KV_GROUP_SIZES)
    sequences = knobs.max_concurrency if args.max_concurrency is not None else None
    try:
        check_kv(bits, group_size, tier=args.tier, sequences=sequences, names=KV_FLAGS)
    except KvCacheError as exc:
        raise ConfigError(str(exc)) from None
    return bits, group_size, replace(knobs, max_concurrency=1, max_batch_size=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m node_agent.engine",
        description=f"Serve one MLX model over an OpenAI-compatible API (secret: ${SECRET_ENV}).",
    )
    parser.add_argument("--model-path", type=Path, required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=_port, default=0, help="0 picks a free port")
    parser.add_argument("--context-length", type=_positive, default=None)
    # Tier and knobs are checked in load_config, so a bad value is one line, not usage + error.
    parser.add_argument("--tier", default="interactive", help="interactive|batch: knob defaults")
    for name in DEFAULT_KNOBS["interactive"].as_dict():
        parser.add_argument(_flag(name), dest=name, default=None, metavar="N")
    parser.add_argument(
        "--kv-bits",
        default=None,
        metavar="{8,4}",
        help="quantize the KV cache (batch tier only; requests then run one at a time)",
    )
    parser.add_argument(
        "--kv-group-size",
        default=None,
        metavar="{32,64,128}",
        help=f"values per KV quantization scale and bias (default {DEFAULT_KV_GROUP_SIZE}); "
        "must divide the model's head_dim",
    )
    parser.add_argument(
        "--prefix-cache-mib",
        type=_non_negative,
        default=DEFAULT_PREFIX_CACHE_MIB,
        metavar="MIB",
        help=f"MiB of finished requests' KV kept for reuse (default {DEFAULT_PREFIX_CACHE_MIB}; "
        "0: off)",
    )
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate (HTTPS)")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key (HTTPS)")
    parser.add_argument("--group-id", default=None, help="run as one rank of this group")
    parser.add_argument(
        "--group-split", default=None, metavar="N,N,...", help="layers per rank (rank 0 first)"
    )
    parser.add_argument(
        "--group-stall-s",
        type=float,
        default=DEFAULT_GROUP_STALL_S,
        metavar="S",
        help="a rank stuck this long in a group operation exits (the group is lost)",
    )
    parser.add_argument(
        "--group-idle-tick-ms",
        type=float,
        default=DEFAULT_GROUP_IDLE_TICK_MS,
        metavar="MS",
        help="idle, rank 0 beats this often and the other ranks sleep between beats instead of "
        "spinning in MLX's receive; the first request after idle waits up to this long. 0: "
        "they wait in the receive (a core each)",
    )
    return parser


def _group(
    args: argparse.Namespace, environ: Mapping[str, str], kv_bits: int | None
) -> GroupSpec | None:
    if args.group_id is None and args.group_split is None:
        return None
    if not args.group_id or not args.group_split:
        raise ConfigError("--group-id and --group-split go together")
    parts = args.group_split.split(",")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts) or len(parts) < 2:
        raise ConfigError(
            f"--group-split must be 2 or more positive layer counts, got {args.group_split!r}"
        )
    if kv_bits is not None:
        raise ConfigError(
            "--kv-bits cannot be used in a group (a quantized KV cache runs one sequence at a time)"
        )
    if not args.group_stall_s > 0:
        raise ConfigError("--group-stall-s must be positive")
    tick_s = args.group_idle_tick_ms / 1000
    if not 0 <= tick_s <= args.group_stall_s * BEAT_FRACTION:
        raise ConfigError(
            "--group-idle-tick-ms must be from 0 to a quarter of --group-stall-s, "
            f"got {args.group_idle_tick_ms:g}"
        )
    rank_text = environ.get(MLX_RANK_ENV, "")
    if not rank_text.isdigit() or int(rank_text) >= len(parts):
        raise ConfigError(f"{MLX_RANK_ENV} must be a rank below {len(parts)}, got {rank_text!r}")
    if not Path(environ.get(MLX_HOSTFILE_ENV, "")).is_file():
        raise ConfigError(f"{MLX_HOSTFILE_ENV} must name the group's hostfile")
    split = tuple(int(p) for p in parts)
    return GroupSpec(args.group_id, split, args.group_stall_s, int(rank_text), tick_s)


def load_config(argv: Sequence[str], environ: Mapping[str, str]) -> EngineConfig:
    """Parse argv (argparse exits 2 on bad flags) and read the secret from the environment."""
    args = build_parser().parse_args(argv)
    if args.tier not in TIERS:
        raise ConfigError(f"--tier must be one of {', '.join(TIERS)}, got {args.tier!r}")
    kv_bits, kv_group_size, knobs = _kv(args, _knobs(args, environ))
    secret = environ.get(SECRET_ENV, "")
    if not secret.strip():
        raise ConfigError(f"{SECRET_ENV} is not set or empty; refusing to start without a secret")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    for path in (args.tls_cert, args.tls_key):
        if path is not None and not path.is_file():
            raise ConfigError(f"TLS file not found: {path}")
    return EngineConfig(
        model_path=args.model_path,
        model_name=args.model_name,
        secret=secret,
        host=args.host,
        port=args.port,
        context_length=args.context_length,
        tier=args.tier,
        knobs=knobs,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        prefix_cache_mib=args.prefix_cache_mib,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        group=_group(args, environ, kv_bits),
    )
