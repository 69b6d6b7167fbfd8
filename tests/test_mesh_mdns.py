"""The mesh over real mDNS across three hosts (network namespaces on a bridge, made by the
test, with their own addresses): nodes find each other with no --peer, a client finds the
mesh with no --connect, and a node that stops is expired from everyone's view."""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest
from meshutil import node_env

pytest_plugins = ("netns",)

pytestmark = pytest.mark.usefixtures("own_model_cache")   # tiny GGUFs' tokenizers

PROMPT = "def quicksort(xs):"


def cli(ns, *args, env, timeout=120):
    out = ns.run([sys.executable, "-m", "dwarfmesh", *args], timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def wait_nodes(ns, n, env, deadline_s=60.0):
    end = time.monotonic() + deadline_s
    nodes = []
    while time.monotonic() < end:
        out = ns.run([sys.executable, "-m", "dwarfmesh", "peers", "--json"], timeout=60,
                     check=False)
        if out.returncode == 0:
            nodes = json.loads(out.stdout)
            if len(nodes) == n:
                return nodes
        time.sleep(1.0)
    raise AssertionError(f"expected {n} nodes, last saw {[x['name'] for x in nodes]}")


@pytest.mark.timeout(300)
def test_three_hosts_find_each_other_by_mdns_and_generate(bridged_netns_factory, tiny_ggufs_shared,
                                                          tmp_path, monkeypatch):
    env = node_env(tmp_path)
    monkeypatch.setenv("DWARFMESH_STATE", str(tmp_path))
    hosts = bridged_netns_factory(3)
    procs = []
    for i, (ns, model) in enumerate(zip(hosts, tiny_ggufs_shared)):
        log = open(tmp_path / f"host{i}.log", "w")
        procs.append(ns.popen([sys.executable, "-m", "dwarfmesh", "node", "--model", str(model),
                               "--name", f"host{i}", "--host", ns.address, "--port", "5757"],
                              stdin=None, stdout=log, stderr=log, env=env))
    nodes = wait_nodes(hosts[0], 3, env)
    assert sorted(n["address"] for n in nodes) == sorted(f"{h.address}:5757" for h in hosts)
    out = cli(hosts[1], "generate", "--prompt", PROMPT, "--max-tokens", "8", "--json",
              "--mode", "stream", env=env)
    assert sorted(out["members"]) == ["host0", "host1", "host2"]
    assert out["steps"] == 8
    procs[2].send_signal(signal.SIGTERM)              # a clean stop sends an mDNS goodbye
    procs[2].wait(timeout=30)
    nodes = wait_nodes(hosts[0], 2, env, deadline_s=30)
    assert sorted(n["name"] for n in nodes) == ["host0", "host1"]
