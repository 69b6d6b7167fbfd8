"""The mesh key: CURVE-authenticated, encrypted traffic; strangers are refused and counted."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
from meshutil import (
    ROOT,
    free_port,
    node_env,
    start_node,
    stop,
)

from dwarfmesh.ui.client import MeshClient, MeshError
from dwarfmesh.wire.security import KeyFileError, load_key, make_key_file

pytestmark = pytest.mark.usefixtures("own_model_cache")   # tiny GGUFs' tokenizers

PROMPT = "def quicksort(xs):"


def test_key_file_round_trip_and_errors(tmp_path):
    path = make_key_file(tmp_path / "k")
    assert path.stat().st_mode & 0o777 == 0o600
    a, b = load_key(path), load_key(path)
    assert a.public == b.public and a.secret == b.secret and a.key_id == b.key_id
    assert a.secret not in repr(a).encode()
    other = load_key(make_key_file(tmp_path / "k2"))
    assert other.public != a.public
    with pytest.raises(KeyFileError, match="exists"):
        make_key_file(path)
    (tmp_path / "bad").write_text("not a key\n")
    with pytest.raises(KeyFileError, match="not a dwarfmesh key"):
        load_key(tmp_path / "bad")
    with pytest.raises(KeyFileError, match="cannot read"):
        load_key(tmp_path / "missing")


def peers_with(address, key, timeout=3.0):
    async def ask():
        async with MeshClient(address, key) as c:
            return await c.peers(timeout=timeout)
    return asyncio.run(ask())


@pytest.mark.timeout(240)
def test_only_holders_of_the_key_join_and_strangers_are_counted(tiny_ggufs_shared, tmp_path):
    key_file = make_key_file(tmp_path / "mesh.key")
    stranger_key = make_key_file(tmp_path / "other.key")
    key = load_key(key_file)
    ports = [free_port() for _ in range(3)]
    a0, a1, a2 = (f"127.0.0.1:{p}" for p in ports)
    procs = [start_node(tiny_ggufs_shared[0], "n0", ports[0], tmp_path,
                        extra=["--mesh-key", str(key_file)]),
             start_node(tiny_ggufs_shared[1], "n1", ports[1], tmp_path, peers=[a0],
                        extra=["--mesh-key", str(key_file)]),
             # a stranger with another key, and one with no key at all, both dial n0
             start_node(tiny_ggufs_shared[2], "stranger", ports[2], tmp_path, peers=[a0],
                        extra=["--mesh-key", str(stranger_key)])]
    open_port = free_port()
    procs.append(start_node(tiny_ggufs_shared[2], "open", open_port, tmp_path, peers=[a0]))
    try:
        end = time.monotonic() + 60
        nodes = []
        while time.monotonic() < end:
            try:
                nodes = peers_with(a0, key)
                if len(nodes) == 2:
                    break
            except MeshError:
                pass
            time.sleep(0.5)
        time.sleep(3)                                  # give the strangers time to knock
        nodes = peers_with(a0, key)
        assert sorted(n["name"] for n in nodes) == ["n0", "n1"]
        me = next(n for n in nodes if n["self"])
        refused = {k: v for k, v in me["stats"]["dropped"].items() if k.startswith("refused")}
        assert sum(refused.values()) >= 2, me["stats"]
        with pytest.raises(MeshError, match="no answer"):
            peers_with(a0, None)                       # a client without the key
        out = subprocess.run([sys.executable, "-m", "dwarfmesh", "generate", "--connect", a1,
                              "--prompt", PROMPT, "--max-tokens", "6", "--json",
                              "--mode", "stream", "--mesh-key", str(key_file)],
                             capture_output=True, text=True, timeout=120,
                             env=node_env(tmp_path), cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert '"steps": 6' in out.stdout and '"stranger"' not in out.stdout
    finally:
        stop(procs)
