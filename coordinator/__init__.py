"""The mlxfleet coordinator: node registry, placement, routing and the OpenAI gateway."""

import os

__version__ = "0.1.0"

# Before anything imports grpc: no gRPC fork handlers in our processes (node_agent/__init__.py
# says why).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
