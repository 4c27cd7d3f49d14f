"""The node agent: probes, mDNS, coordinator client, engine supervisor and the engine."""

import os

# gRPC's fork support (on by default in grpcio's Linux and macOS wheels) registers
# pthread_atfork handlers that can abort a child forked while another thread is inside gRPC,
# which the control stream makes always. No process of ours forks without exec, so nothing
# needs them. Engines are started without fork anyway (node_agent/spawn.py); this covers the
# rest (subprocess.run fork()s on macOS). Read when grpc is imported: set before any import
# of it, which is why it is here (coordinator/__init__.py does the same).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
