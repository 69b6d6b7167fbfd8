"""A two-node mesh of tiny models for the hostile-peer tests, and how they ask it things.

`two_nodes(models, cache)` runs two real node processes on tiny GGUFs (node0's context
is `CONTEXT`) and yields their addresses, processes, ports, state dir and the reference answer
given before any stranger; `answer` asks a node for one answer, `whole_mesh_answer` for one
fused by both nodes, and `assert_unharmed` checks both nodes still live, list each other
and give the reference answer. The fixtures that hold such a mesh stay in the test files.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager

import pytest
from meshutil import free_port, peers_of, start_node, stop, wait_for_mesh

from dwarfmesh.ui.client import MeshClient
from dwarfmesh.wire import protocol as P

CONTEXT = 256                    # node0's model takes at most this many prompt ids
VOCAB = 320                      # the tiny models' vocabulary
PROMPT = "hello"                 # the tiny mesh does not end this early: runs to max_tokens
TOKENS = 40


def answer(address: str, max_tokens: int = TOKENS, prompt: str = PROMPT,
           conversation: str = "", request_id: str = "") -> dict:
    async def go():
        async with MeshClient(address) as c:
            return (await c.generate(prompt, P.GenParams(mode="stream", max_tokens=max_tokens),
                                     conversation=conversation,
                                     request_id=request_id)).summary
    return asyncio.run(go())


@contextmanager
def two_nodes(models, cache):
    """Two nodes (tiny GGUFs from `tiny_ggufs_shared`; node0's context is CONTEXT). Yields a
    dict: addrs, procs, ports, the state dir, the reference answer (before any stranger)."""
    from gguf import GGUFReader

    from dwarfmesh.models.gguf_import import read_metadata

    meta = read_metadata(GGUFReader(models[0]))
    assert meta.get("llama.context_length", CONTEXT) == CONTEXT, "tiny GGUF's context"
    ports = [free_port(), free_port()]
    addrs = [f"127.0.0.1:{p}" for p in ports]
    procs = [start_node(models[0], "node0", ports[0], cache),
             start_node(models[1], "node1", ports[1], cache, peers=[addrs[0]])]
    try:
        for a in addrs:
            wait_for_mesh(a, 2, procs=procs)
        ref = whole_mesh_answer(addrs[0])
        yield {"addrs": addrs, "procs": procs, "ports": ports, "cache": cache, "ref": ref}
    finally:
        stop(procs)


def whole_mesh_answer(address: str, attempts: int = 3, **kw) -> dict:
    """An answer fused by both nodes (a member starved of CPU for a moment can be left out
    of one; answers fused by different members differ)."""
    for _ in range(attempts):
        out = answer(address, **kw)
        if sorted(out["members"]) == ["node0", "node1"]:
            return out
    pytest.fail(f"a member was left out of an answer {attempts} times in a row")


def assert_unharmed(mesh, reference: dict | None = None) -> None:
    """Both nodes alive, each lists the other, and the answer is the reference answer."""
    for p in mesh["procs"]:
        assert p.poll() is None, "a node died"
    for a in mesh["addrs"]:
        names = sorted(n["name"] for n in peers_of(a, timeout=5))
        assert names[:2] == ["node0", "node1"], names
    out = whole_mesh_answer(mesh["addrs"][0])
    assert out["text"] == (reference or mesh["ref"])["text"]
