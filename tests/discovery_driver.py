"""Test driver: one Discovery (or one browse_once) in its own process, events as JSON lines.

    python tests/discovery_driver.py node NODE_ID [--host H] [--port P] [--interface IP]
        prints {"event": "started"}, then {"event": "up", "record": {...}} and
        {"event": "down", "node_id": ...}; on a line "stop" on stdin it stops cleanly and
        prints {"event": "stopped"}.
    python tests/discovery_driver.py browse [--timeout S]
        prints {"event": "browsed", "records": [...]}.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys

from dwarfmesh.mesh.discovery import Discovery, PeerRecord, browse_once


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def record_for(node_id: str, host: str, port: int) -> PeerRecord:
    return PeerRecord(node_id=node_id, name=f"name-{node_id}", model=f"model-{node_id}",
                      fingerprint=f"fp-{node_id}", vocab_size=49152, protocol_version=1,
                      host=host, port=port)


async def run_node(args: argparse.Namespace) -> None:
    discovery = Discovery(
        record_for(args.node_id, args.host, args.port),
        on_up=lambda record: emit("up", record=dataclasses.asdict(record)),
        on_down=lambda node_id: emit("down", node_id=node_id),
        interfaces=args.interface or None)
    await discovery.start()
    emit("started")
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, sys.stdin.readline) not in ("", "stop\n"):
        pass
    await discovery.stop()
    await discovery.stop()  # idempotent
    emit("stopped")


async def run_browse(args: argparse.Namespace) -> None:
    records = await browse_once(args.timeout, interfaces=args.interface or None)
    emit("browsed", records=[dataclasses.asdict(record) for record in records])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["node", "browse"])
    parser.add_argument("node_id", nargs="?", default="")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=5757)
    parser.add_argument("--interface", action="append")
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("zeroconf").setLevel(logging.INFO)
    asyncio.run(run_node(args) if args.mode == "node" else run_browse(args))


if __name__ == "__main__":
    main()
