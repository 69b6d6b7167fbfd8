"""The fault benches' client (bench/faults.py, scripts/netns-mesh): runs inside host0's
namespace, one JSON object a line.

Reads requests on stdin, answers on stdout (the bench owns the timing and the faults;
this process only asks and records when each piece arrived):

    {"op": "peers", "address": A} -> {"op": "peers", "nodes": [...]} or {"error": ...}
    {"op": "generate", "address" (or "addresses": every node, the first tried first),
     "session", "prompt", "tokens", "fault_after", "mode" (default stream: the
     step-by-step path, exact token by token across a failover),
     "timeout" (default 60 s)} ->
        {"event": "sent", "at": T}  just before the request leaves,
        {"event": "fault", "at": T} once `fault_after` pieces streamed (0: never),
        {"op": "result", "ok", "text", "summary", "pieces", "times", "error"}

`python -m bench.faults_driver goodbye NODE_ID ADDRESS` instead forges an mDNS goodbye
(once a line arrives on stdin).
Times are time.monotonic(), which network namespaces share with the bench. The client is
the package's own `MeshClient`, given every node's address with host0's first, as
`dwarfmesh generate` gives it what mDNS found; whatever it does when host0's node dies is
what the bench measures.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

PEERS_TIMEOUT_S = 2.0
DEFAULT_TIMEOUT_S = 60.0      # one answer, faults and recovery included
GOODBYE_REPEATS = 3           # python-zeroconf sends its own goodbyes 3 times, 250 ms apart
GOODBYE_GAP_S = 0.25


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def peers(address: str) -> list[dict[str, Any]]:
    from dwarfmesh.ui.client import MeshClient

    async with MeshClient(address) as c:
        return await c.peers(timeout=PEERS_TIMEOUT_S)


async def generate(req: dict[str, Any], pieces: list[str], times: list[float]) -> Any:
    from dwarfmesh.ui.client import MeshClient
    from dwarfmesh.wire.protocol import GenParams

    def on_text(piece: str) -> None:
        pieces.append(piece)
        times.append(time.monotonic())
        if len(pieces) == req["fault_after"]:
            emit({"event": "fault", "at": times[-1]})

    params = GenParams(max_tokens=req["tokens"], weights="equal",
                       mode=req.get("mode", "stream"))
    async with MeshClient(req.get("addresses") or req["address"]) as c:
        emit({"event": "sent", "at": time.monotonic()})
        return await asyncio.wait_for(
            c.generate(req["prompt"], params, on_text=on_text, conversation=req["session"]),
            req.get("timeout", DEFAULT_TIMEOUT_S))


def goodbye(node_id: str, address: str) -> None:
    """Send what a node says when it leaves: its PTR record with TTL 0, to the mDNS group
    (from port 5353, as a responder does), a few times, as zeroconf itself repeats it."""
    import socket

    from zeroconf import DNSOutgoing, DNSPointer
    from zeroconf.const import (
        _CLASS_IN,
        _FLAGS_AA,
        _FLAGS_QR_RESPONSE,
        _MDNS_ADDR,
        _MDNS_PORT,
        _TYPE_PTR,
    )

    from dwarfmesh.mesh.discovery import SERVICE_TYPE, instance_name

    out = DNSOutgoing(_FLAGS_QR_RESPONSE | _FLAGS_AA)
    out.add_answer_at_time(DNSPointer(SERVICE_TYPE, _TYPE_PTR, _CLASS_IN, 0,
                                      instance_name(node_id)), 0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, _MDNS_PORT))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
    emit({"event": "ready"})
    sys.stdin.readline()                  # ready before the bench's moment: no start-up delay
    for i in range(GOODBYE_REPEATS):
        for packet in out.packets():
            sock.sendto(packet, (_MDNS_ADDR, _MDNS_PORT))
        if i + 1 < GOODBYE_REPEATS:
            time.sleep(GOODBYE_GAP_S)
    sock.close()


def main() -> None:
    if sys.argv[1:2] == ["goodbye"]:
        goodbye(sys.argv[2], sys.argv[3])
        return
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "peers":
            try:
                emit({"op": "peers", "nodes": asyncio.run(peers(req["address"]))})
            except Exception as exc:          # noqa: BLE001  (reported to the bench)
                emit({"op": "peers", "error": f"{type(exc).__name__}: {exc}"})
        elif req["op"] == "generate":
            pieces: list[str] = []
            times: list[float] = []
            out: dict[str, Any] = {"op": "result", "ok": False, "text": "", "summary": {},
                                   "error": ""}
            try:
                result = asyncio.run(generate(req, pieces, times))
                out.update(ok=True, text=result.text, summary=result.summary)
            except asyncio.TimeoutError:
                out["error"] = f"no end within {req.get('timeout', DEFAULT_TIMEOUT_S):.0f}s"
            except Exception as exc:          # noqa: BLE001
                out["error"] = f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc)
            emit({**out, "pieces": pieces, "times": times})


if __name__ == "__main__":
    main()
