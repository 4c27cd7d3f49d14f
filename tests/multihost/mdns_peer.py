"""A peer process for the multi-host mDNS tests; runs inside one namespace.

`node`: advertise a node, then obey stdin lines (`thermal <state>`, `avail <gib>`, `close`).
`coordinator`: advertise a coordinator until stdin closes. `find`: print find_coordinator's answer.
Every step prints one line the test waits for.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys

from coordinator.discovery import CoordinatorAdvertiser
from node_agent.advertise import Advertiser, NodeRecord
from node_agent.discover import find_coordinator


async def node(args: argparse.Namespace) -> None:
    record = NodeRecord(
        node_id=args.node_id,
        version="0.1.0",
        metrics_port=8402,
        chip=args.chip,
        ram_gib=args.ram_gib,
        role=args.role,
        avail_gib=args.avail_gib,
        thermal="nominal",
        addresses=(args.ip,),
    )
    advertiser = Advertiser(interfaces=[args.ip])
    await advertiser.start(record)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command, *rest = line.split()
        if command == "close":
            break
        if command == "thermal":
            record = dataclasses.replace(record, thermal=rest[0])
        elif command == "avail":
            record = dataclasses.replace(record, avail_gib=float(rest[0]))
        await advertiser.update(record)
        print(f"updated {command}", flush=True)
    await advertiser.close()
    print("closed", flush=True)


async def coordinator(args: argparse.Namespace) -> None:
    advertiser = CoordinatorAdvertiser(
        "0.1.0", args.grpc, args.gw, args.fp, 9403, instance="coord", interfaces=[args.ip]
    )
    await advertiser.start()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await advertiser.close()
    print("closed", flush=True)


async def find(args: argparse.Namespace) -> None:
    found = await find_coordinator(args.timeout, interfaces=[args.ip])
    print("found " + json.dumps(None if found is None else dataclasses.asdict(found)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["node", "coordinator", "find"])
    parser.add_argument("--ip", required=True)
    parser.add_argument("--node-id", default="node-a")
    parser.add_argument("--chip", default="Apple M2 Max")
    parser.add_argument("--ram-gib", type=int, default=64)
    parser.add_argument("--role", default="server")
    parser.add_argument("--avail-gib", type=float, default=40.0)
    parser.add_argument("--grpc", type=int, default=8401)
    parser.add_argument("--gw", type=int, default=8400)
    parser.add_argument("--fp", default="sha256:00")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run({"node": node, "coordinator": coordinator, "find": find}[args.mode](args))


if __name__ == "__main__":
    main()
