"""Named constants and small settings shared by every part of a node.

Owns: ports, timings (heartbeat, liveness, deadlines), frame sizes, defaults, and where a
node keeps its persistent identity. It does no I/O except `node_id_for`, which reads and
writes one small JSON file so that a node keeps its id across restarts.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from pathlib import Path

PROTOCOL_ID = b"DWM1"          # first frame of every multipart message
PROTOCOL_VERSION = 5            # a peer with another version is refused with a clear reason

DEFAULT_PORT = 5757             # ROUTER port of a node
DEFAULT_TOP_K = 64              # entries per top-k frame (goal: <= 512 B per frame at k=64)
MAX_TOP_K = 1024                # frames with more entries are rejected
MAX_MESSAGE_BYTES = 4 << 20     # ZMQ_MAXMSGSIZE: longer messages are dropped by libzmq itself
MAX_PROMPT_TOKENS = 32768       # OPEN messages carrying more prompt ids are rejected
MAX_NEW_TOKENS = 8192
MAX_DRAFT = 16                  # drafted tokens one speculative round verifies, at most

HEARTBEAT_INTERVAL_S = 1.0      # every node pings every peer this often (Paranoid Pirate)
LIVENESS = 3                    # peer is dead after LIVENESS intervals of silence
HANDSHAKE_TIMEOUT_S = 5.0
RECONNECT_IVL_MS = 250          # libzmq reconnect backoff, from ...
RECONNECT_IVL_MAX_MS = 1000     # ... to this
OPEN_RESEND_S = 3.0             # Start/Open not acknowledged this long are sent again

PREFILL_TIMEOUT_S = 600.0       # slow CPUs prefill long prompts slowly
STEP_TIMEOUT_S = 60.0           # leader waits this long for a member's frame before dropping it
FAILOVER_GRACE_S = 10.0         # an origin waits this long for a new leader after one dies
CLIENT_TIMEOUT_S = 900.0        # a client waits this long for the whole answer
MESH_SETTLE_S = 3.0             # `generate` without --connect browses mDNS this long

# Online weights (Bayesian mixture with fixed share; README, "What it is worth")
ONLINE_ETA = 0.5                # learning rate on log p(token)
ONLINE_ALPHA = 0.05             # share of uniform mixed back in after each token
PERPLEXITY_TAU = 1.0            # temperature of PackLLM weights softmax(-NLL/tau)
# Text-level sessions (rank / fuse across tokenizers) update once per committed piece of
# text, a word or more, not per token. Chosen on dev text that the bench never scores
# (fortune files it does not use): `bench/tune_text_weights.py`, results in
# bench/results/text_weights_dev.json. The id path's constants above lose ~1 point there.
TEXT_ONLINE_ETA = 0.03125       # learning rate on log p(committed text)
TEXT_ONLINE_ALPHA = 0.01        # share of uniform mixed back in after each commit


def cache_dir() -> Path:
    """Where dwarfmesh keeps models and node identities ($DWARFMESH_CACHE or ~/.cache/dwarfmesh)."""
    env = os.environ.get("DWARFMESH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dwarfmesh"


def state_dir() -> Path:
    """Where a node keeps its identity ($DWARFMESH_STATE, else the cache directory)."""
    env = os.environ.get("DWARFMESH_STATE")
    return Path(env) if env else cache_dir()


def default_node_name() -> str:
    return socket.gethostname().split(".")[0] or "node"


def node_id_for(name: str) -> str:
    """The persistent id of the node called `name` on this host; created on first use.

    Ids are random (not derived from the hostname, which may leak or collide), kept in
    ``state_dir()/node_ids.json`` keyed by node name, so restarting a node keeps its id.
    """
    path = state_dir() / "node_ids.json"
    try:
        ids = json.loads(path.read_text())
        if not isinstance(ids, dict):
            ids = {}
    except (OSError, ValueError):
        ids = {}
    if isinstance(ids.get(name), str):
        return ids[name]
    ids[name] = secrets.token_hex(6)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(ids, indent=1))
    tmp.replace(path)
    return ids[name]
