"""A text-level session's leader after a failover (`text_leader.TextLeaderSession`).

- `TextResume`: where a new leader picks up, the committed answer piece by piece (every
  member holds it: they all applied the same Commits).
- `TextFailover`, mixed into the leader: re-send every Commit so far to the members, then
  `Resume` (a member that missed the dead leader's last Commit catches up; the others
  ignore them); `adopt` the Commits a member is ahead by (the dead leader's last reached
  only some, and the client may have streamed them); `set_origin` replays what a client
  that re-attached through another node missed.

Owns: the text leader's takeover half. Does not: decide who takes over (`text_table`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from dwarfmesh.fusion import text as textfuse
from dwarfmesh.wire.protocol import Commit, Resume

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextResume:
    """A member's committed answer, piece by piece: where a new leader picks up."""

    pieces: list[str]


class TextFailover:
    """The failover half of `text_leader.TextLeaderSession` (which holds the state it uses)."""

    def set_origin(self, origin: str, next_step: int) -> None:
        """A client re-attached through another node: replay what it missed, go on there."""
        self.origin = origin
        for msg in self.sent[next_step:]:
            self.send(origin, msg)

    def adopt(self, commit: Commit) -> None:
        """Right after a takeover, a member that got the dead leader's last Commit(s) when
        this node did not sends them here: take them as committed (the client may have
        them already), pass them on, and wait for the step after them."""
        if (not self._adopting or commit.step != self.steps
                or textfuse.text_hash(self._hash, commit.text) != commit.text_hash):
            return
        log.info("session %s: adopting step %d, committed by the old leader", self.session,
                 commit.step)
        commit = dataclasses.replace(commit, term=self.term)     # passed on as ours
        self.text, self._hash = self.text + commit.text, commit.text_hash
        self.steps, self.adopted = self.steps + 1, self.adopted + 1
        self.first_bytes = textfuse.utf8_len(self.text)
        self.sent.append(commit)
        self._to_members(commit, origin_too=True)
        self._want = (self._want[0], self.steps)
        self._round.replies.clear()
        for msg, size in [v for v in self._early.values() if v[0].step == self.steps]:
            self.on_reply(msg, size)

    def _restore(self, propose_tokens: int) -> int:
        """Take over the committed answer (`self.resume`); return the step to go on from."""
        for piece in self.resume.pieces:
            self.text, self._hash = self.text + piece, textfuse.text_hash(self._hash, piece)
            self.sent.append(Commit(self.session, self.steps, piece, self._hash, False,
                                    propose_tokens, self.term))
            self.steps += 1
        self.first_bytes = textfuse.utf8_len(self.text)       # ms_per_byte: ours only
        self._adopting = True
        return self.steps

    def _send_resume(self) -> Callable[[set[str] | None], None]:
        """After a takeover: every Commit so far to the members (one that missed the dead
        leader's last catches up; the others ignore them), then the Resume in this
        leader's term; one ahead sends the Commits this leader lacks (`adopt`). The
        silent ones are sent the Resume again."""
        resume = Resume(self.session, self.me.node_id, self.steps, self.term)

        def send(only: set[str] | None) -> None:
            if only is None:
                for commit in self.sent:
                    self._to_members(commit)
            self._to_members(resume, origin_too=only is None, only=only)
        return send
