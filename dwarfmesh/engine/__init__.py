"""The engine package: one worker thread that owns a backend, and the backends.

- `worker`: `Engine` (session table, eviction, the asyncio bridge, id-level frames)
- `text`: text-level sessions (rank, fuse-text) on the same thread and table
- `kv`: per-session state, sizing constants, top-k
- `backend`: the contract a backend meets, the tokenizer fingerprint
- `mlx_backend`, `llamacpp_backend`: the two backends (imported only when chosen)
- `choose`: which backend a node runs (`--engine auto|mlx|llamacpp`) and why

Importing this package imports neither mlx nor llama.cpp.
"""

from dwarfmesh.engine.backend import Loaded, tokenizer_fingerprint
from dwarfmesh.engine.kv import (
    DECODE_CONTEXT,
    LOGP_FLOOR,
    MAX_SESSIONS,
    PREFILL_STEP,
    SESSION_IDLE_S,
)
from dwarfmesh.engine.text import Proposed, TextLogp, TextTopKOut
from dwarfmesh.engine.worker import Engine, EngineBusy, StepOut

__all__ = [
    "DECODE_CONTEXT", "LOGP_FLOOR", "MAX_SESSIONS", "PREFILL_STEP", "SESSION_IDLE_S",
    "Engine", "EngineBusy", "Loaded", "Proposed", "StepOut", "TextLogp", "TextTopKOut",
    "tokenizer_fingerprint",
]
