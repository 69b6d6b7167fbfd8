"""Running scripts/netns-mesh (or a bench run the same way) from a test, and checking that it
cleaned up: `run_script(args, deadline_s)` runs `SCRIPT` and SIGTERMs it (it tears down)
past the deadline, then SIGKILLs it; `leftovers(pid, workdir)` lists the namespaces named
after its pid and the processes still using files of its run; `logs(workdir)` gives the
tail of each of its logs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "netns-mesh"


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
