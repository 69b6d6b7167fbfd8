"""The kinds of session, under one name each, and their spellings at the edges.

Owns: `Mode` (what a session runs), `REQUEST_MODES` (what a client may ask for),
`DRAFTERS` (who may draft a speculative round) and
`TEXT_OPEN_MODES` (how `TextOpen` names a text session's mode on the wire). Does not
decide which mode a session gets (`mesh.membership.plan_session` does).
"""

from __future__ import annotations

from enum import Enum

# GenParams.mode: auto lets the worth policy pick (select over whole answers with two
# members or more); stream is the step-by-step ensemble that streams as it goes (ids
# fusion with one tokenizer, rank across tokenizers); fuse, rank and select ask for one.
REQUEST_MODES = ("auto", "stream", "fuse", "rank", "select")
TEXT_OPEN_MODES = ("rank", "fuse", "select")   # TextOpen.mode
DRAFTERS = ("auto", "lookup", "member")    # GenParams.drafter: who drafts a speculative round


class Mode(str, Enum):
    """What a session runs. One name per kind everywhere inside a node; the two other
    spellings are at the edges: what a client asks for (`GenParams.mode`, one of
    REQUEST_MODES; `membership.plan_session` turns it into a Mode) and `TextOpen.mode` on
    the wire (rank | fuse | select, `text_open` / `from_text_open`)."""

    IDS = "fuse-ids"          # one tokenizer: token-id frames fused every step
    FUSE_TEXT = "fuse-text"   # mixed tokenizers: string-aligned fusion of text frames
    RANK = "rank"             # proposals of text, ranked by every member's NLL per byte
    SELECT = "select"         # whole answers written in parallel, the most likely kept

    @property
    def is_text(self) -> bool:
        return self is not Mode.IDS

    @property
    def proposes(self) -> bool:
        """Members answer with Proposals of text (rank, select), not TextFrames."""
        return self in (Mode.RANK, Mode.SELECT)

    @property
    def text_open(self) -> str:
        return {Mode.RANK: "rank", Mode.SELECT: "select"}.get(self, "fuse")

    @classmethod
    def from_text_open(cls, spelling: str) -> Mode:
        return {"rank": cls.RANK, "select": cls.SELECT}.get(spelling, cls.FUSE_TEXT)
