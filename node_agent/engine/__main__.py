"""`python -m node_agent.engine`: one model, one OpenAI-compatible server (see config.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from node_agent.engine.config import load_config
from node_agent.errors import ConfigError

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(sys.argv[1:] if argv is None else argv, os.environ)
    except ConfigError as exc:
        print(f"mlxfleet engine: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=os.environ.get("MLXFLEET_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Imported late: a usage error should not pay for importing mlx.
    from node_agent.engine.server import EngineServer

    if os.environ.get("MLXFLEET_LOOP", "uvloop") == "uvloop":
        import uvloop

        return uvloop.run(EngineServer(config).serve())
    return asyncio.run(EngineServer(config).serve())


def exit_now(code: int) -> None:
    """Leave without interpreter teardown. After a clean drain, MLX's native worker threads can
    still be alive, and destroying them in C++ static destructors calls terminate() (seen as
    SIGABRT on a clean shutdown, so the agent reported a crash). Flush first: nothing is lost."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
