"""Generation speed through the real mesh: `dwarfmesh node` processes on 127.0.0.1.

`running_mesh` starts one node process per model (`--no-mdns`, every node dialing the
first with `--peer`), waits until every node lists all of them, and stops them after.
`timed_generate` runs one answer through `MeshClient.generate`, exactly as a user's
client would, and keeps the leader's summary (its per-step timings, wire bytes) plus
what only the client sees: the time to the first text and between text pieces.

The same path with one node is "one model alone": no network hop, the same engine,
session and client code. On one machine the members share the CPU cores, so absolute
ensemble speed says little; `compare` derives the ratios that hold anywhere: the mesh's
own overhead per token (step − slowest member's forward, plus fusion) in ms and as a
share of the slowest member's forward.

Owns node processes and timing; knows nothing about quality.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dwarfmesh.ui.client import MeshClient, MeshError
from dwarfmesh.wire.protocol import GenParams

log = logging.getLogger(__name__)

READY_DEADLINE_S = 900.0        # loading a 1.5B model in float32 on 2 cores takes a while
POLL_S = 0.5
STOP_GRACE_S = 15.0
PR_SET_PDEATHSIG = 1            # prctl option (linux/prctl.h)
ANSWER_BASE_S = 600.0           # an answer's deadline: prefill on a slow, busy CPU ...
ANSWER_PER_TOKEN_S = 20.0       # ... plus this per token (1.5B float32: ~0.3-2 s a token)
ENSEMBLE_TRIES = 2
WARMUP_TOKENS = 4               # one short answer first: allocations, caches, page-ins
SUMMARY_KEYS = ("steps", "finish_reason", "prompt_tokens", "tokens_per_s", "ttft_ms",
                "wire_bytes_per_token", "disagreement_rate", "agreement", "weights", "late",
                "stale_replies", "timing_ms", "members", "models", "leader", "mode",
                "committed_bytes", "ms_per_byte", "wire_bytes_per_byte", "dropped",
                # what one mode adds: id sessions, speculative rounds
                "frame_bytes_per_member_per_token", "speculate")


def _die_with_parent() -> None:
    """In the node process before exec: get SIGTERM when the bench dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):      # not Linux: the bench's own cleanup must do
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _count_nodes(address: str) -> int:
    async with MeshClient(address) as c:
        return len(await c.peers(timeout=2.0))


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)


@contextmanager
def running_mesh(models: list[str], *, work_dir: Path,
                 ready_deadline_s: float = READY_DEADLINE_S, node_args: list[str] = (),
                 before_stop=None, pin: bool = False) -> Iterator[list[str]]:
    """One node per model (an mlx-lm dir or any `--model` spec); yield their addresses.

    `node_args` go to every node (e.g. `--engine llamacpp`); `before_stop(procs)` runs
    while the nodes are still alive (e.g. to read their peak memory). With `pin`, node i
    runs on core i (mod the cores there are) alone, as if each had a machine of one core
    (llama.cpp then runs one thread: it uses the cores it may run on)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DWARFMESH_STATE=str(work_dir), PYTHONUNBUFFERED="1")
    if len(models) > 1:     # nodes sharing this machine's cores: llama.cpp's threads sleep
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    addrs = [f"127.0.0.1:{_free_port()}" for _ in models]
    procs: list[subprocess.Popen] = []
    try:
        for i, (model, addr) in enumerate(zip(models, addrs)):
            cmd = [sys.executable, "-m", "dwarfmesh", "node", "--model", str(model),
                   "--name", f"bench{i}", "--host", "127.0.0.1",
                   "--port", addr.rpartition(":")[2], "--no-mdns", *node_args]
            if i:
                cmd += ["--peer", addrs[0]]
            if pin:
                cores = sorted(os.sched_getaffinity(0))
                cmd = ["taskset", "-c", str(cores[i % len(cores)]), *cmd]
            with open(work_dir / f"bench{i}.log", "w") as out:
                procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True,
                                              preexec_fn=_die_with_parent))
        end = time.monotonic() + ready_deadline_s
        pending = set(addrs)
        while pending:
            for p, i in zip(procs, range(len(procs))):
                if p.poll() is not None:
                    tail = (work_dir / f"bench{i}.log").read_text()[-1500:]
                    raise RuntimeError(f"node bench{i} exited with {p.returncode}:\n{tail}")
            if time.monotonic() > end:
                raise RuntimeError(f"the mesh did not form within {ready_deadline_s:.0f}s")
            for a in list(pending):
                try:
                    if asyncio.run(_count_nodes(a)) >= len(models):
                        pending.discard(a)
                except MeshError:
                    pass
            time.sleep(POLL_S)
        yield addrs
        if before_stop is not None:
            before_stop(procs)
    finally:
        _stop(procs)


def _pct(xs: np.ndarray, q: float) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None


async def _generate(address: str, prompt: str, params: GenParams) -> dict:
    stamps: list[float] = []
    sizes: list[int] = []

    def on_text(piece: str) -> None:
        stamps.append(time.perf_counter())
        sizes.append(len(piece.encode("utf-8")))
    async with MeshClient(address) as c:
        t0 = time.perf_counter()
        res = await c.generate(prompt, params, on_text=on_text)
    out = {k: res.summary.get(k) for k in SUMMARY_KEYS}
    gaps = np.diff(stamps) * 1000.0
    decode_s = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    later_bytes = sum(sizes[1:])
    out["client"] = {
        "ttft_ms": (stamps[0] - t0) * 1000.0 if stamps else None,
        "inter_token_p50_ms": _pct(gaps, 50),
        "inter_token_p95_ms": _pct(gaps, 95),
        "text_pieces": len(stamps),
        "pieces_per_s": (len(stamps) - 1) / decode_s if decode_s > 0 else None,
        # one unit for every mode and tokenizer: time per byte of answer after the first piece
        "bytes": sum(sizes),
        "ms_per_byte": decode_s * 1000.0 / later_bytes if later_bytes > 0 else None,
    }
    out["token_ids"] = list(res.summary.get("token_ids", []))
    out["loadavg_1min"] = os.getloadavg()[0]      # other work on the machine skews timings
    return out


def _deadline(params: GenParams) -> float:
    return ANSWER_BASE_S + ANSWER_PER_TOKEN_S * params.max_tokens


def timed_generate(address: str, prompt: str, params: GenParams) -> dict:
    """A warm-up answer, then the measured one; the summary's figures plus client timings."""
    answer(address, prompt, dataclasses.replace(params, max_tokens=WARMUP_TOKENS))
    return answer(address, prompt, params)


def answer(address: str, prompt: str, params: GenParams) -> dict:
    """One answer: the summary's figures, client timings and the token ids."""
    try:
        return asyncio.run(asyncio.wait_for(_generate(address, prompt, params),
                                            _deadline(params)))
    except asyncio.TimeoutError:
        raise RuntimeError(f"no answer from the mesh at {address} within "
                           f"{_deadline(params):.0f}s (see the node logs)") from None
    except MeshError as e:
        raise RuntimeError(f"the mesh at {address} failed: {e}") from None


def measure_ensemble(models: dict[str, str], prompt: str, params: GenParams, *,
                     work_dir: Path) -> dict:
    """All `models` (name -> path), one node each, answering `prompt`.

    An answer that did not keep every member to the end is not an ensemble's: it is tried
    again on a fresh mesh, and after ENSEMBLE_TRIES the result carries an `error`.
    """
    for attempt in range(1, ENSEMBLE_TRIES + 1):
        logs = work_dir / f"ensemble-{attempt}"
        with running_mesh(list(models.values()), work_dir=logs) as addrs:
            out = timed_generate(addrs[0], prompt, params)
        out["attempts"] = attempt
        kept = len(out.get("members") or [])
        if kept == len(models):
            return out
        log.warning("the ensemble kept %d of %d members (see %s); trying again", kept,
                    len(models), logs)
    out["error"] = (f"only {kept} of {len(models)} members stayed in the session in each of "
                    f"{ENSEMBLE_TRIES} tries: nodes dropped each other (missed heartbeats "
                    f"while the CPU was starved?); node logs in {work_dir}/ensemble-*")
    return out


def measure_single(name: str, path: str, prompt: str, params: GenParams, *,
                   work_dir: Path) -> dict:
    """One model alone: a one-node mesh, the same engine, session and client code."""
    with running_mesh([path], work_dir=work_dir / f"single-{name}") as addrs:
        return timed_generate(addrs[0], prompt, params)


def compare(speed: dict) -> dict:
    """Ratios that hold on any machine: the mesh's overhead against the slowest forward
    (id-level fusion), or each text-level mode's cost per committed byte (`compare_text`)."""
    ens = speed.get("ensemble")
    if not ens:
        return {}
    if ens.get("error"):
        return {"error": ens["error"]}
    if ens.get("mode") != "fuse-ids":
        return compare_text(speed)
    t = ens["timing_ms"]
    overhead = t["overhead_p50"] + t["fusion_p50"]
    slow = t["slowest_forward_p50"]
    singles = [s["timing_ms"]["step_p50"] + s["timing_ms"]["fusion_p50"]
               for s in speed.get("single", {}).values()]
    single_over = [s["timing_ms"]["overhead_p50"] + s["timing_ms"]["fusion_p50"]
                   for s in speed.get("single", {}).values()]
    return {
        "mesh_overhead_ms_per_token": overhead,
        "mesh_overhead_share_of_slowest_forward": overhead / slow if slow > 0 else None,
        "round_trip_ms": t["overhead_p50"],
        "fusion_ms": t["fusion_p50"],
        "single_node_overhead_ms_per_token": max(single_over) if single_over else None,
        # what the network hop adds over the same loop with no remote member
        "mesh_overhead_over_single_node_ms":
            overhead - max(single_over) if single_over else None,
        "wire_bytes_per_node_per_token": ens["frame_bytes_per_member_per_token"],
        "ensemble_step_over_slowest_single_step":
            (t["step_p50"] + t["fusion_p50"]) / max(singles) if singles else None,
    }


TEXT_PHASES = ("propose", "score", "frame")


def compare_text(speed: dict) -> dict:
    """Text-level sessions (members with different tokenizers): cost per committed byte of
    each mode timed, its per-round breakdown, and how it compares with the other mode and
    with the slowest member alone (client-side ms per byte: the same unit for all)."""
    alone = [s["client"]["ms_per_byte"] for s in speed.get("single", {}).values()
             if s.get("client", {}).get("ms_per_byte")]
    out: dict = {"modes": {}}
    for mode, r in (speed.get("modes") or {}).items():
        if r.get("error"):
            out["modes"][mode] = {"error": r["error"]}
            continue
        t, c = r["timing_ms"], r["client"]
        out["modes"][mode] = {
            "session": r.get("mode"),
            "ms_per_committed_byte": r.get("ms_per_byte"),
            "client_ms_per_byte": c["ms_per_byte"],
            "bytes_per_round": (r["committed_bytes"] / r["steps"]) if r.get("steps") else None,
            "wire_bytes_per_byte": r.get("wire_bytes_per_byte"),
            "round_ms": {"step_p50": t.get("step_p50"), "step_p95": t.get("step_p95"),
                         **{p: t.get(f"{p}_p50") for p in TEXT_PHASES if f"{p}_p50" in t},
                         "slowest_forward_p50": t.get("slowest_forward_p50")},
            "over_slowest_member_alone": (c["ms_per_byte"] / max(alone)
                                          if alone and c["ms_per_byte"] else None),
        }
    modes = out["modes"]
    ok = {m: v for m, v in modes.items() if "error" not in v and v["client_ms_per_byte"]}
    if "rank" in ok and "fuse" in ok:
        out["rank_over_fuse_ms_per_byte"] = (ok["rank"]["client_ms_per_byte"]
                                             / ok["fuse"]["client_ms_per_byte"])
        out["rank_over_fuse_wire_bytes"] = (ok["rank"]["wire_bytes_per_byte"]
                                            / ok["fuse"]["wire_bytes_per_byte"])
    return out
