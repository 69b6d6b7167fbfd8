"""The one shape of an answer's summary, whatever kind of session (`Mode`) wrote it.

Every session's leader ends with `End(summary)`; `generate --json`, the API's `dwarfmesh`
field, the TUI and the bench read it. Whatever the mode, it has the same keys with the
same meaning (`SessionSummary`), so a reader asks `summary["mode"]` what ran instead of
guessing it from which keys are there. What only one mode measures goes in `extra`
(merged at the top level: `frame_bytes_per_member_per_token` for ids, `trace` for text,
`speculate`, `term`).

Owns: the summary's keys. Does not measure anything (`stats` does).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dwarfmesh.wire.modes import Mode


@dataclass(frozen=True)
class SessionSummary:
    """One answer, as its leader saw it. Rates are per committed step unless named."""

    mode: Mode
    text: str
    finish_reason: str
    token_ids: list[int]            # ids: the committed ids; text: the leader's tokenization
    leader: str
    members: list[str]              # still in the session at the end
    models: dict[str, str]          # name -> model, for everyone who took part
    excluded: list[dict[str, str]]  # left out at the start, and why
    dropped: list[str]              # dropped during the answer (silent, dead, diverged)
    prompt_tokens: int
    prompt_tokens_reused: int
    steps: int                      # rounds committed (ids: one token each)
    committed_bytes: int
    ttft_ms: float
    tokens_per_s: float
    steps_per_s: float
    ms_per_byte: float
    wire_bytes: int
    disagreement_rate: float        # steps where some member's own choice differed
    agreement: dict[str, float]     # per member: share of steps it chose what was committed
    weights: dict[str, float]
    late: dict[str, int]            # per member: steps decided without its reply (a deadline)
    stale_replies: int              # replies that came after their step was decided
    timing_ms: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "extra"}
        out["mode"] = self.mode.value
        n_tokens = max(len(self.token_ids), 1)
        out["wire_bytes_per_token"] = self.wire_bytes / n_tokens
        out["wire_bytes_per_byte"] = self.wire_bytes / max(self.committed_bytes, 1)
        out.update(self.extra)
        return out
