"""The engine's configuration, built once from argv and the environment."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from node_agent.engine.errors import Error
from node_agent.engine.generator import DEFAULT_MAX_CONCURRENCY, QUEUE_LIMIT

SECRET_ENV = "MLXFLEET_ENGINE_SECRET"
DEFAULT_HOST = "127.0.0.1"


class ConfigError(Error):
    """The command line or environment cannot start an engine."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything one engine process needs; the secret never appears in its repr."""

    model_path: Path
    model_name: str
    secret: str = field(repr=False)
    host: str = DEFAULT_HOST
    port: int = 0
    context_length: int | None = None
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    queue_limit: int = QUEUE_LIMIT
    # Serve HTTPS with the node's certificate (an engine reached from another host).
    tls_cert: Path | None = None
    tls_key: Path | None = None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value}")
    return value


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
    parser.add_argument("--max-concurrency", type=_positive, default=DEFAULT_MAX_CONCURRENCY)
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate (HTTPS)")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key (HTTPS)")
    return parser


def load_config(argv: Sequence[str], environ: Mapping[str, str]) -> EngineConfig:
    """Parse argv (argparse exits 2 on bad flags) and read the secret from the environment."""
    args = build_parser().parse_args(argv)
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
        max_concurrency=args.max_concurrency,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
