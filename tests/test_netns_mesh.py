"""scripts/netns-mesh end to end: three hosts in network namespaces on one bridge, nodes
found by mDNS, one session per fault kind (none, a member killed, the leader killed, a
member's link down) with the exact expected tokens, bounded recovery, nothing left behind."""

from __future__ import annotations

import json

import pytest
from netns import netns_unavailable
from netns_script import leftovers, logs, run_script

pytestmark = pytest.mark.netns

KINDS = ["none", "member", "leader", "link"]
DEADLINE_S = 240.0               # the run takes ~75 s on 2 cores
RECOVERY_BOUND_S = 20.0


@pytest.mark.timeout(DEADLINE_S + 90)
def test_three_hosts_every_fault_kind_exact_bounded_and_cleaned_up(tmp_path):
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    out_json, workdir = tmp_path / "netns-mesh.json", tmp_path / "run"
    result, pid = run_script(["--hosts", "3", "--trials", "1", "--faults", ",".join(KINDS),
                              "--json", str(out_json), "--workdir", str(workdir)], DEADLINE_S)
    spaces, procs = leftovers(pid, workdir)
    assert not spaces, f"namespaces left behind: {spaces}"
    assert not procs, f"processes left behind: {procs}"
    assert result.returncode == 0, f"{result.stderr[-3000:]}\n{logs(workdir)}"
    doc = json.loads(out_json.read_text())
    print(result.stdout)
    assert doc["failure"] == ""
    assert list(doc["faults"]) == KINDS
    for kind, st in doc["faults"].items():
        assert (st["trials"], st["completed"], st["exact"]) == (1, 1, 1), (kind, st)
        if kind != "none":
            assert st["hits"] == 1, f"{kind}: the fault did not strike the session: {st}"
    for s in doc["sessions"]:
        assert s["exact"] and not s["mismatch"], s
        assert s["recovery_s"] is not None and 0 < s["recovery_s"] < RECOVERY_BOUND_S, s
        if s["kind"] != "none":
            assert s["fault_to_next_s"] is not None, s
            assert s["fault_to_next_s"] < RECOVERY_BOUND_S, s
            assert s["victim"] not in s["members"], s      # dropped, not waited for
    leader = next(s for s in doc["sessions"] if s["kind"] == "leader")
    assert leader["final_leader"] not in ("", leader["leader"]), leader  # a member took over
