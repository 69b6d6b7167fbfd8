"""What one node process holds from the operating system: file descriptors and its identity.

- **File descriptors.** Every peer, client and HTTP connection is one; a node at the
  soft limit spins on a listening socket it cannot accept from. `raise_fd_limit` lifts
  the soft limit to the hard one at start-up. mlx-lm sets RLIMIT_NOFILE to (2048, 4096)
  when `mlx_lm.utils` is imported, lowering the *hard* limit too (which an unprivileged
  process can never raise again), so the engine is imported inside `fd_limit_kept()`.
- **Identity.** A node's id is kept per name in the state directory
  (`config.node_id_for`); two live processes with one id would shadow each other in the
  mesh. `lock_identity` takes an exclusive `flock` on a lock file there for the life of
  the process. The kernel releases it when the process dies, however it dies, so a
  crashed node leaves no stale lock behind.

It knows nothing about the mesh.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

try:                                 # POSIX only; elsewhere both are no-ops
    import fcntl
    import resource
except ImportError:                  # pragma: no cover - Windows
    fcntl = resource = None          # type: ignore[assignment]

FD_TARGET_MAX = 1 << 20             # when the hard limit is "unlimited", ask for this much


class IdentityInUse(RuntimeError):
    """Another live process holds this node's identity; str() is one line for the user."""


@contextlib.contextmanager
def fd_limit_kept() -> Iterator[None]:
    """Inside: any change to RLIMIT_NOFILE is ignored (the import of mlx-lm makes one)."""
    if resource is None:
        yield
        return
    real = resource.setrlimit

    def guarded(which: int, limits: tuple[int, int]) -> None:
        if which != resource.RLIMIT_NOFILE:
            real(which, limits)

    resource.setrlimit = guarded
    try:
        yield
    finally:
        resource.setrlimit = real


def raise_fd_limit() -> int:
    """Lift the soft RLIMIT_NOFILE as far as the hard limit allows; return the new soft."""
    if resource is None:
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_TARGET_MAX if hard == resource.RLIM_INFINITY else hard
    while target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):          # macOS caps the soft limit below "unlimited"
            target //= 2
    return soft


def lock_path(state: Path, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64]
    return state / f"node-{safe}.lock"


def lock_identity(state: Path, name: str) -> int | None:
    """Hold the identity of node `name` in `state` until the process exits; return the
    lock's file descriptor (keep it open), or raise IdentityInUse."""
    if fcntl is None:
        return None
    state.mkdir(parents=True, exist_ok=True)
    path = lock_path(state, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise IdentityInUse(
            f"a node named {name!r} is already running with this state directory ({state}, "
            f"pid {holder}); stop it, or start this one with another --name") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
