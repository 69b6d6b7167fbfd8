"""Run model-written Python where it cannot hurt the machine: one process per program.

`run_program(source)` executes `source` in a fresh child process and says whether it ran
to its end without raising (`SandboxResult`). Nothing else in the bench may execute a
model's code. What the child gets:

- **Limits** (`resource`, set before exec; `Limits`): CPU seconds, address space, size of
  any file it writes (stdout included: a flood of output is killed by SIGXFSZ), number
  of processes of its user, open files, no core dumps; and a wall-clock timeout after
  which its whole process tree is killed.
- **Isolation where root** (`unshare` and `setpriv` from util-linux): new network
  namespace (only a loopback that is down: no network at all), new PID namespace (when
  the timeout kills its first process the kernel kills every process it forked, even one
  that left the process group), new mount namespace in which a private, size-limited
  tmpfs replaces /tmp (its working directory is a fresh folder there) and empty tmpfs
  hide /work, /root, /home, /run, /opt, /srv, /mnt, /media, /var/tmp, /dev/shm, the
  project's folder and the user's home (model cache, mesh key); only the interpreter's
  own prefix is bound back, read-only. It then runs as a uid of its own
  (`SANDBOX_UID`, no passwd entry, no groups, no-new-privs), so it can neither write
  outside its tmpfs nor signal anyone else's process, and the process limit binds it.
- **Without root** (or without those tools) it still gets the limits, a fresh temporary
  working directory, a minimal environment and `python -I -S`, but it shares the network,
  the filesystem view and the user; `isolation()` says so and the bench records it.

The program comes in on stdin, so no file of the bench is visible to it; its verdict
goes out on a pipe of its own with a per-run nonce, so a program that exits early
with status 0 (`os._exit(0)`) is not mistaken for one that passed.

Owns processes and limits; knows nothing about HumanEval.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SANDBOX_UID = 64_123               # unused on any system this runs on: a user of its own
MAX_VERDICT_BYTES = 4096
HIDDEN = ("/work", "/root", "/home", "/var/tmp", "/run", "/dev/shm", "/mnt", "/media",
          "/srv", "/opt")
MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0           # the reference uses 3 s; this CPU is shared and slow
    cpu_s: int = 10
    memory_bytes: int = 1024 * MiB
    file_bytes: int = 4 * MiB      # any file, stdout/stderr included
    processes: int = 16            # of the sandbox's user (binding only when it has its own)
    open_files: int = 64
    tmpfs_bytes: int = 64 * MiB


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str                    # passed | failed | timed out | killed | crashed
    detail: str = ""
    seconds: float = 0.0


# In the child, under `python -I -S`: read the program, run it with fresh globals (as the
# reference does), report on the verdict pipe.
_RUNNER = r"""
import json, os, sys
job = json.loads(sys.stdin.read())
sys.stdin.close()
verdict = {"nonce": job["nonce"], "passed": False, "detail": ""}
try:
    exec(compile(job["source"], "<completion>", "exec"), {})
    verdict["passed"] = True
except BaseException as e:
    verdict["detail"] = (type(e).__name__ + ": " + str(e))[:300]
os.write(job["fd"], json.dumps(verdict).encode())
"""

# As root, inside the new namespaces, before the program: build the filesystem view,
# then drop to the sandbox's own uid. The shell stays as the namespace's first process, so
# a program killed by a signal comes back as exit status 128 + signal. $4 is the
# directories to hide, ':'-separated; "$@" after them is the command.
_ISOLATE_SH = r"""
set -eu
prefix=$1; uid=$2; tmpfs_bytes=$3; hide=$4; shift 4
mount -t tmpfs -o "size=$tmpfs_bytes,mode=1777" sandbox /tmp
mkdir /tmp/.py
mount --bind -o ro "$prefix" /tmp/.py
IFS=:
for d in $hide; do
  if [ -d "$d" ]; then mount -t tmpfs -o size=64k,mode=755 hidden "$d"; fi
done
unset IFS
mkdir -p "$prefix"
mount --move /tmp/.py "$prefix"
rmdir /tmp/.py
mkdir -m 700 /tmp/work
chown "$uid:$uid" /tmp/work
cd /tmp/work
set +e
setpriv --reuid="$uid" --regid="$uid" --clear-groups --no-new-privs -- "$@"
exit $?
"""


def _interpreter() -> tuple[str, str]:
    """The base interpreter (a venv's python is a link into the base prefix) and its prefix."""
    exe = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    return exe, os.path.realpath(sys.base_prefix)


def _hidden_dirs(prefix: str) -> list[str]:
    """Directories to cover, minus any that holds the interpreter (bound back instead)."""
    dirs = {*HIDDEN, str(ROOT), str(Path.home())}
    out = []
    for d in sorted(dirs):
        real = os.path.realpath(d)
        if real in ("/", "/usr", "/tmp") or not os.path.isdir(real):
            continue
        out.append(real)
    return out


def _set_limits(limits: Limits) -> None:
    """In the child before exec: the limits hold for everything it becomes and forks."""
    def cap(which: int, value: int) -> None:
        resource.setrlimit(which, (value, value))
    cap(resource.RLIMIT_CPU, limits.cpu_s)
    cap(resource.RLIMIT_AS, limits.memory_bytes)
    cap(resource.RLIMIT_FSIZE, limits.file_bytes)
    cap(resource.RLIMIT_NPROC, limits.processes)
    cap(resource.RLIMIT_NOFILE, limits.open_files)
    cap(resource.RLIMIT_CORE, 0)


def _command(isolated: bool, limits: Limits) -> list[str]:
    exe, prefix = _interpreter()
    python = [exe, "-I", "-S", "-c", _RUNNER]
    if not isolated:
        return python
    return ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc",
            "--", "sh", "-c", _ISOLATE_SH, "sandbox", prefix, str(SANDBOX_UID),
            str(limits.tmpfs_bytes), ":".join(_hidden_dirs(prefix)), *python]


@cache
def isolation() -> dict:
    """What the sandbox can do here: namespaces and own uid (root + util-linux), or not."""
    why = None
    if os.name != "posix" or not sys.platform.startswith("linux"):
        why = "not Linux"
    elif os.geteuid() != 0:
        why = "not root: no network namespace, no user of its own"
    elif not (shutil.which("unshare") and shutil.which("setpriv") and shutil.which("mount")):
        why = "unshare/setpriv/mount (util-linux) not found"
    if why is None:
        probe = _run("print(1)", isolated=True, limits=Limits(), env_extra={})
        if not probe.passed:
            why = f"namespaces refused here ({probe.status}: {probe.detail[:120]})"
    if why is None:
        return {"isolated": True, "network": "none (new network namespace, loopback down)",
                "pids": "new PID namespace (the timeout kills every process it forked)",
                "filesystem": "private tmpfs as /tmp (cwd a fresh folder there); "
                              "/work, /root, /home, /run, /opt, project and home hidden; "
                              "interpreter prefix read-only",
                "user": f"uid {SANDBOX_UID} of its own, no groups, no-new-privs",
                "limits": asdict(Limits())}
    return {"isolated": False,
            "network": f"NOT isolated ({why}): the program can reach the network",
            "pids": "process group only: a child that calls setsid() can outlive the timeout",
            "filesystem": "fresh temporary cwd, minimal env, python -I -S; the rest of the "
                          "filesystem is readable and writable as this user",
            "user": "the bench's own user", "limits": asdict(Limits())}


def run_program(source: str, limits: Limits = Limits()) -> SandboxResult:
    """Execute `source` in the sandbox; `passed` means it ran to its end without raising."""
    return _run(source, isolated=isolation()["isolated"], limits=limits, env_extra={})


def _run(source: str, *, isolated: bool, limits: Limits, env_extra: dict) -> SandboxResult:
    nonce = secrets.token_hex(8)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", **env_extra}
    with tempfile.TemporaryDirectory(prefix="dwarfmesh-sandbox-") as tmp:
        work = Path(tmp) / "work"          # cwd without isolation; outputs in both modes
        work.mkdir()
        out_path = Path(tmp) / "output"
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        t0 = time.monotonic()
        try:
            with open(out_path, "wb") as out:
                proc = subprocess.Popen(
                    _command(isolated, limits), stdin=subprocess.PIPE, stdout=out,
                    stderr=subprocess.STDOUT, cwd=work, env=env, start_new_session=True,
                    pass_fds=(write_fd,), preexec_fn=lambda: _set_limits(limits))
            job = json.dumps({"nonce": nonce, "source": source, "fd": write_fd})
            os.close(write_fd)
            write_fd = -1
            status = _wait(proc, job, limits)
            verdict = _read_verdict(read_fd)
        finally:
            if write_fd >= 0:
                os.close(write_fd)
            os.close(read_fd)
        seconds = time.monotonic() - t0
        written = out_path.stat().st_size
        with open(out_path, "rb") as f:
            f.seek(max(0, written - 300))
            tail = f.read().decode("utf-8", "replace")
    if status != "exited":
        return SandboxResult(False, status, tail[-200:], seconds)
    if verdict is None and isolated and proc.returncode > 128:
        return SandboxResult(False, f"killed ({_signal_name(proc.returncode - 128)})",
                             tail[-200:], seconds)
    if verdict is None or verdict.get("nonce") != nonce:
        return SandboxResult(False, "crashed", f"no verdict (exit {proc.returncode}) "
                             + tail[-200:], seconds)
    if written >= limits.file_bytes:       # a flood cut short by the file-size limit
        return SandboxResult(False, "failed", f"output reached the {written}-byte limit",
                             seconds)
    if verdict.get("passed") and proc.returncode == 0:
        return SandboxResult(True, "passed", "", seconds)
    return SandboxResult(False, "failed", str(verdict.get("detail", ""))[:300], seconds)


def _wait(proc: subprocess.Popen, job: str, limits: Limits) -> str:
    """Feed the job, wait for the wall clock; on time-out kill the whole tree."""
    try:
        proc.stdin.write(job.encode())
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass                                 # it died before reading: judged below
    try:
        proc.wait(timeout=limits.wall_s)
    except subprocess.TimeoutExpired:
        _kill(proc)
        return "timed out"
    _kill(proc)                              # anything it left behind in its group
    if proc.returncode < 0:
        return f"killed ({_signal_name(-proc.returncode)})"
    return "exited"


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:       # unkillable (D state): leave it, say nothing more
        pass


def _read_verdict(fd: int) -> dict | None:
    try:
        data = os.read(fd, MAX_VERDICT_BYTES)
    except BlockingIOError:
        return None
    try:
        v = json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        return None
    return v if isinstance(v, dict) else None
