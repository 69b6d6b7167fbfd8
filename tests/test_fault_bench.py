"""bench/faults.py end to end, one trial of three kinds on id sessions: the control is
exact, a killed leader and a forged goodbye are injected at the piece asked for and
recorded with their recovery, and nothing is left behind. Whether the mesh survives
those faults is the bench's finding, not this test's: it checks the bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from netns import netns_unavailable
from netns_script import leftovers, logs, run_script

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "faults.py"
KINDS = ["none", "leader", "goodbye"]
DEADLINE_S = 300.0


@pytest.mark.timeout(DEADLINE_S + 90)
def test_the_fault_bench_injects_records_and_cleans_up(tmp_path, monkeypatch):
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    out_json, workdir = tmp_path / "faults.json", tmp_path / "run"
    monkeypatch.setattr(sys.modules["netns_script"], "SCRIPT", BENCH)
    result, pid = run_script(["--sessions", "id", "--kinds", ",".join(KINDS), "--trials", "1",
                              "--tokens", "60", "--subnet", "10.199.12.0/24",
                              "--json", str(out_json), "--workdir", str(workdir)], DEADLINE_S)
    spaces, procs = leftovers(pid, workdir)
    assert not spaces, f"namespaces left behind: {spaces}"
    assert not procs, f"processes left behind: {procs}"
    assert result.returncode in (0, 1), f"{result.stderr[-3000:]}\n{logs(workdir / 'id')}"
    doc = json.loads(out_json.read_text())
    assert doc["failure"] == "", doc["failure"]
    res = doc["sessions"]["id"]
    assert list(res["faults"]) == KINDS
    assert all(st["trials"] == 1 for st in res["faults"].values())
    by_kind = {t["kind"]: t for t in res["trials"]}
    control = by_kind["none"]
    assert control["exact"] and control["events"] == [] and not control["mismatch"]
    for kind, label in (("leader", "kill"), ("goodbye", "goodbye")):
        t = by_kind[kind]
        assert [e[0] for e in t["events"]] == [label], t
        assert t["victims"] == [t["order"][0]] and t["order"][0] != "host0", t
        assert t["struck"] and t["recovery_s"] is not None, t
        assert t["rejoin_s"] is not None, t                  # healed before the next trial
        assert t["exact"] or t["mismatch"] or t["error"], t  # a failure says what it was
