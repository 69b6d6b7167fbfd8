"""The kinds of session, under one name each, and their spellings at the edges.

Owns: `Mode` (what a session runs), `REQUEST_MODES` (what a client may ask for),
`DRAFTERS` (who may draft a speculative round) and
`TEXT_OPEN_MODES` (how `TextOpen` names a text session's mode on the wire). Does not
decide which mode a session gets (`mesh.membership.plan_session` does).
"""

from __future__ import annotations

from enum import Enum

REQUEST_MODES = ("auto", "fuse", "rank")   # GenParams.mode: auto picks by tokenizers
TEXT_OPEN_MODES = ("rank", "fuse")         # TextOpen.mode
DRAFTERS = ("auto", "lookup", "member")    # GenParams.drafter: who drafts a speculative round


class Mode(str, Enum):
    """What a session runs. One name per kind everywhere inside a node; the two other
    spellings are at the edges: what a client asks for (`GenParams.mode`: auto | fuse |
    rank, `membership.plan_session` turns it into a Mode) and `TextOpen.mode` on the wire
    (rank | fuse, `text_open` / `from_text_open`)."""

    IDS = "fuse-ids"          # one tokenizer: token-id frames fused every step
    FUSE_TEXT = "fuse-text"   # mixed tokenizers: string-aligned fusion of text frames
    RANK = "rank"             # proposals of text, ranked by every member's NLL per byte

    @property
    def is_text(self) -> bool:
        return self is not Mode.IDS

    @property
    def text_open(self) -> str:
        return "rank" if self is Mode.RANK else "fuse"

    @classmethod
    def from_text_open(cls, spelling: str) -> Mode:
        return cls.RANK if spelling == "rank" else cls.FUSE_TEXT
