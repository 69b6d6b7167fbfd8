"""What a leader measures about one session, and the summary it sends with `End`.

Pure bookkeeping, no I/O: per-step timings (the slowest member's forward, the whole step,
fusion), wire bytes, agreement between each member's own top token and the fused one,
late replies per member. `SessionStats.summary()` and `text_summary` (a text-level
session's) give the one `summary.SessionSummary`.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np

from dwarfmesh.fusion import text as textfuse
from dwarfmesh.sessions.summary import Mode, SessionSummary


class SessionStats:
    def __init__(self, names: dict[str, str]) -> None:
        self.names = dict(names)
        self.step_ms: list[float] = []
        self.slowest_forward_ms: list[float] = []
        self.fusion_ms: list[float] = []
        self.agree: Counter[str] = Counter()
        self.seen: Counter[str] = Counter()
        self.late: Counter[str] = Counter()   # steps fused without this member's frame
        self.stale_frames = 0
        self.disagree_steps = 0
        self.steps = 0
        self.wire_bytes = 0
        self.frame_bytes = 0
        self.prompt_reused = 0
        self.t_start = self.t_first = time.perf_counter()

    def mark_first_token(self, t_start: float) -> None:
        self.t_start, self.t_first = t_start, time.perf_counter()

    def fused(self, order: list[str], member_top: np.ndarray, token: int, dt: float) -> None:
        self.fusion_ms.append(dt * 1000.0)
        self.steps += 1
        for node_id, top in zip(order, member_top):
            self.seen[node_id] += 1
            self.agree[node_id] += int(top == token)
        self.disagree_steps += int(np.any(member_top != token))

    def stepped(self, dt: float, frames: dict[str, Any]) -> None:
        self.step_ms.append(dt * 1000.0)
        if frames:
            self.slowest_forward_ms.append(max(f.forward_ms for f in frames.values()))

    def timing(self) -> dict[str, float]:
        def pct(xs: list[float], q: float) -> float:
            return float(np.percentile(xs, q)) if xs else 0.0
        n = min(len(self.step_ms), len(self.slowest_forward_ms))
        over = np.array(self.step_ms[:n]) - np.array(self.slowest_forward_ms[:n])
        slow = float(np.median(self.slowest_forward_ms)) if self.slowest_forward_ms else 0.0
        return {
            "step_p50": pct(self.step_ms, 50),
            "step_p95": pct(self.step_ms, 95),
            "slowest_forward_p50": slow,
            "fusion_p50": pct(self.fusion_ms, 50),
            "overhead_p50": float(np.median(over)) if n else 0.0,
            "overhead_share": float(np.median(over)) / slow if n and slow > 0 else 0.0,
        }

    def summary(self, *, text: str, tokens: list[int], reason: str, leader: str,
                members: list[Any], excluded: list[tuple[Any, str]], prompt_tokens: int,
                weights: dict[str, float], dropped: list[str]) -> SessionSummary:
        decode_s = time.perf_counter() - self.t_first
        remote = max(len(members) - 1, 1)
        names = self.names
        nbytes = textfuse.utf8_len(text)
        rate = (self.steps - 1) / decode_s if self.steps > 1 and decode_s > 0 else 0.0
        return SessionSummary(
            mode=Mode.IDS, text=text, finish_reason=reason, token_ids=tokens, leader=leader,
            members=[m.name for m in members], models={m.name: m.model for m in members},
            excluded=[{"name": m.name, "reason": why} for m, why in excluded],
            dropped=dropped, prompt_tokens=prompt_tokens,
            prompt_tokens_reused=self.prompt_reused, steps=len(tokens),
            committed_bytes=nbytes, ttft_ms=(self.t_first - self.t_start) * 1000.0,
            tokens_per_s=rate, steps_per_s=rate,
            ms_per_byte=decode_s * 1000.0 / nbytes if nbytes > 0 else 0.0,
            wire_bytes=self.wire_bytes,
            disagreement_rate=self.disagree_steps / max(self.steps, 1),
            agreement={names[k]: self.agree[k] / self.seen[k] for k in self.seen},
            weights={names[k]: float(v) for k, v in weights.items()
                     if any(m.node_id == k for m in members)},
            late={names[k]: v for k, v in self.late.items()},
            stale_replies=self.stale_frames, timing_ms=self.timing(),
            extra={"frame_bytes_per_member_per_token":
                   self.frame_bytes / max(self.steps, 1) / remote})


def text_summary(leader: Any, reason: str) -> SessionSummary:
    """The End summary of a text-level session (`text_leader.TextLeaderSession`)."""
    everyone = leader.members + leader.dropped
    decode_s = leader.t_last - leader.t_first          # first commit to last commit
    nbytes = textfuse.utf8_len(leader.text)
    later_bytes = nbytes - leader.first_bytes

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q)) if xs else 0.0
    answer_ids = (leader.engine.tokenizer.encode(leader.text, add_special_tokens=False)
                  if leader.text else [])
    return SessionSummary(
        mode=leader.kind, text=leader.text, finish_reason=reason,
        token_ids=list(answer_ids),        # the leader's tokenization of the answer
        leader=leader.me.name, members=[m.name for m in leader.members],
        models={m.name: m.model for m in everyone},
        excluded=[{"name": m.name, "reason": why} for m, why in leader.excluded],
        dropped=[m.name for m in leader.dropped], prompt_tokens=leader.prompt_tokens,
        prompt_tokens_reused=0, steps=leader.steps, committed_bytes=nbytes,
        ttft_ms=(leader.t_first - leader.t_start) * 1000.0,
        tokens_per_s=len(answer_ids) / (time.perf_counter() - leader.t_start),
        steps_per_s=(leader.steps - 1) / decode_s if decode_s > 0 else 0.0,
        ms_per_byte=decode_s * 1000.0 / later_bytes if later_bytes > 0 else 0.0,
        wire_bytes=leader.wire_bytes,
        disagreement_rate=leader.disagree / max(leader.steps, 1),
        agreement={leader.names[k]: v / max(leader.steps, 1) for k, v in leader.agree.items()},
        weights={leader.names[k]: float(v) for k, v in leader.weights.items()},
        late={leader.names[k]: v for k, v in leader.behind.items()},
        stale_replies=leader.late,
        timing_ms={"step_p50": pct(leader.step_ms, 50),
                   "step_p95": pct(leader.step_ms, 95),
                   **{f"{k}_p50": pct(v[1:], 50) for k, v in leader.phase_ms.items() if v},
                   "slowest_forward_p50": pct(leader.slowest_ms[1:], 50)},
        extra={"trace": leader.trace})
