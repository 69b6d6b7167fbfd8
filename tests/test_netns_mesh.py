"""scripts/netns-mesh end to end: three hosts in network namespaces on one bridge, nodes
found by mDNS, one session per fault kind (none, a member killed, the leader killed, a
member's link down) with the exact expected tokens, bounded recovery, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from netns import netns_unavailable

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "netns-mesh"
KINDS = ["none", "member", "leader", "link"]
DEADLINE_S = 240.0               # the run takes ~75 s on 2 cores
RECOVERY_BOUND_S = 20.0


def run_script(args: list[str], deadline_s: float
               ) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run the script; past the deadline, SIGTERM it (it tears down), then SIGKILL."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"netns-mesh ran past {deadline_s:.0f}s; stderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def leftovers(pid: int, workdir: Path) -> tuple[list[str], list[str]]:
    """Namespaces named after the script's pid, and processes using files of its run."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    spaces = [line.split()[0] for line in names.splitlines() if line.startswith(f"dwm{pid}-")]
    procs = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(workdir) in cmdline:
                procs.append(f"{entry.name}: {cmdline[:200]}")
    return spaces, procs


def logs(workdir: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}"
                     for f in sorted(workdir.glob("*.log")))


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
