"""What an agent reports of its engines, in the words both sides use (the wire's enums:
EngineState, EngineEvent.Kind and ExitReason in protos/mlxfleet/v1/fleet.proto)."""

from __future__ import annotations

from typing import Literal

EngineState = Literal["starting", "ready", "stopping", "exited"]
EventKind = Literal["started", "ready", "exited", "load_failed"]
# clean exit, crash, SIGKILL (by someone), OOM (SIGKILL while the kernel's OOM-kill count rose),
# hung (SIGKILL by the agent: a ready engine stopped answering its health check)
ExitReason = Literal["clean", "crash", "sigkill", "oom", "hung"]
# An engine's exit code when it is a rank of a group and its model's architecture cannot run
# split (node_agent/engine/layer_split.py): the coordinator then places that model on single
# nodes only, as sharding = "never" would.
EXIT_CANNOT_SPLIT = 4
