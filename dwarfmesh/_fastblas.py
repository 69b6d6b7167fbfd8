"""Make mlx's CPU backend use OpenBLAS on Linux, by default.

The ``mlx[cpu]`` wheel links a slow reference BLAS (~6 GFLOPS on a 1024² matmul here).
Loading OpenBLAS into the process's global symbol scope *before* mlx is imported makes
mlx's ``cblas_*``/``sgemm_`` calls resolve to OpenBLAS (~300 GFLOPS on the same matmul),
exactly as ``LD_PRELOAD`` would, without asking the user to set anything.

This module owns only that preload. It must be imported before anything imports mlx;
``dwarfmesh/__init__.py`` does so. Set ``DWARFMESH_NO_OPENBLAS=1`` to opt out.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

# Debian/Ubuntu (libopenblas0-pthread), Fedora, and a generic soname as last resort.
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "libopenblas.so.0",
)

_loaded: str | None = None


def preload() -> str | None:
    """Load OpenBLAS with RTLD_GLOBAL on Linux; return its path, or None if not done."""
    global _loaded
    if _loaded is not None or not sys.platform.startswith("linux"):
        return _loaded
    if os.environ.get("DWARFMESH_NO_OPENBLAS"):
        return None
    if "mlx.core" in sys.modules:
        log.warning("mlx was imported before dwarfmesh; OpenBLAS preload would have no effect")
        return None
    for candidate in OPENBLAS_CANDIDATES:
        try:
            ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _loaded = candidate
        return candidate
    log.warning(
        "OpenBLAS not found: mlx on the CPU will be ~30x slower. "
        "Install it with: apt-get install libopenblas0-pthread"
    )
    return None


def loaded() -> str | None:
    """The OpenBLAS library preloaded into this process, if any."""
    return _loaded
