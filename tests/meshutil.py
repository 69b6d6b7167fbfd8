"""Helpers for tests that run real node processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from dwarfmesh.ui.client import MeshClient, MeshError

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["DWARFMESH_STATE"] = str(cache)     # node ids per test; models from the real cache
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_node(model: str, name: str, port: int, cache: Path, *, peers=(), extra=(),
               log_dir: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dwarfmesh", "node", "--model", str(model), "--name", name,
           "--host", "127.0.0.1", "--port", str(port), "--no-mdns", *extra]
    for p in peers:
        cmd += ["--peer", p]
    log = open((log_dir or cache) / f"{name}.log", "w")
    return subprocess.Popen(cmd, env=node_env(cache), stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT, start_new_session=True)


def peers_of(address: str, timeout: float = 2.0) -> list[dict]:
    async def ask():
        async with MeshClient(address) as c:
            return await c.peers(timeout=timeout)
    return asyncio.run(ask())


def wait_for_mesh(address: str, n: int, deadline_s: float = 120.0, procs=()) -> list[dict]:
    """Wait until the node at `address` lists `n` nodes; fail fast if a process died."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a node process exited early with code {p.returncode}")
        try:
            nodes = peers_of(address)
            if len(nodes) >= n:
                return nodes
        except MeshError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"mesh at {address} did not reach {n} nodes in {deadline_s}s")


def stop(procs, sig=signal.SIGTERM) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, sig)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)


@contextmanager
def mesh(models: list, cache: Path, extra=()):
    """Start one node per model, each dialing the first; yield (addresses, processes)."""
    ports = [free_port() for _ in models]
    addrs = [f"127.0.0.1:{p}" for p in ports]
    procs = []
    try:
        for i, (model, port) in enumerate(zip(models, ports)):
            procs.append(start_node(model, f"node{i}", port, cache,
                                    peers=[addrs[0]] if i else [], extra=extra))
        for a in addrs:
            wait_for_mesh(a, len(models), procs=procs)
        yield addrs, procs
    finally:
        stop(procs)


def generate_cli(address: str, prompt: str, *args: str, cache: Path, timeout=300,
                 mode: str = "stream") -> dict:
    """Run `dwarfmesh generate --json` as a user would; return the parsed JSON. `mode`
    (unless `args` names one): stream, the step-by-step path most tests are about; the
    tests of the default pass "auto"."""
    if "--mode" not in args:
        args = (*args, "--mode", mode)
    out = subprocess.run(
        [sys.executable, "-m", "dwarfmesh", "generate", "--connect", address, "--prompt", prompt,
         "--json", *args], env=node_env(cache), capture_output=True, text=True, timeout=timeout,
        cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def session_led_by(leader_id: str, node_ids: list[str], second: str | None = None,
                   avoid_second: str | None = None) -> str:
    """A conversation id whose rendezvous leader is `leader_id` (and, if given, whose
    next in rank is `second`, or is not `avoid_second`)."""
    from types import SimpleNamespace

    from dwarfmesh.mesh.membership import rank_for_session

    members = [SimpleNamespace(node_id=n) for n in node_ids]
    for i in range(10_000):
        ranked = [m.node_id for m in rank_for_session(f"conv-{i}", members)]
        if ranked[0] != leader_id or (second is not None and ranked[1] != second):
            continue
        if avoid_second is None or ranked[1] != avoid_second:
            return f"conv-{i}"
    raise AssertionError("no session id found")
