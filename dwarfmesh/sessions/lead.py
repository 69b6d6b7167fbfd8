"""What every leader of a session is, whatever its mode: its session, its members and
roster, its term, and how it is deposed or cancelled.

`leader.LeaderSession` (token ids) and `text_leader.TextLeaderSession` (text) are both a
`Lead`: they differ in what a round asks and how its replies become a commit, not in who
they answer to. A leader steps down when a member or the origin tells it (`Deposed`)
that a leader with a better claim (a later term, or a better rendezvous rank in the same
term) leads the session now; a member's own word about itself is no vote.

Owns: the state above and `on_deposed`, `cancel`, `member_lost`'s bookkeeping, the
current `round.Round`. Does not: run a loop, or send anything but through `send`.
"""

from __future__ import annotations

import logging
from typing import Any

from dwarfmesh.mesh.membership import Member, outranks
from dwarfmesh.sessions.ports import Send
from dwarfmesh.sessions.round import Round
from dwarfmesh.wire.protocol import Deposed, GenParams

log = logging.getLogger(__name__)



class Lead:
    """The state and the deposition rule every session leader shares."""

    OWN_REPLY_LOCAL = True    # its own reply is computed in its loop: never waited for

    def __init__(self, *, session: str, origin: str, params: GenParams, members: list[Member],
                 me: Member, engine: Any, send: Send, prompt: str = "",
                 messages: list[dict[str, Any]] | None = None, keep: bool = False,
                 excluded: list[tuple[Member, str]] | None = None,
                 step_timeout_s: float | None = None, step_deadline_s: float | None = None,
                 term: int = 0, roster: set[str] | None = None) -> None:
        self.session, self.origin, self.params = session, origin, params
        self.prompt, self.messages, self.keep = prompt, messages or [], keep
        self.members: list[Member] = list(members)
        self.dropped: list[Member] = []          # left during the answer
        # Who may depose this leader (and the origin), and whom a Deposed may name: the
        # whole session, also the members a takeover left behind (the old leader).
        self.roster = {m.node_id for m in members} | set(roster or ())
        self.names = {m.node_id: m.name for m in members}
        self.me, self.engine, self.send = me, engine, send
        self.excluded = excluded or []
        self.step_timeout_s, self.step_deadline_s = step_timeout_s, step_deadline_s
        self.term = term
        self.deposed: Deposed | None = None      # a leader of a later term took over
        self.sent: list[Any] = []                # every piece (and the End) for the origin
        self._round: Round | None = None         # the replies being waited for
        self._caught_up: dict[str, float] = {}   # when a member behind was last re-sent
        self._slowest_s = 0.0                    # slowest forward seen (reply bounds)
        self._cancelled = False

    def _ids(self) -> set[str]:
        return {m.node_id for m in self.members}

    def member_lost(self, node_id: str) -> None:
        """Stop waiting for `node_id` (gone, silent, diverged, or it left)."""
        gone = [m for m in self.members if m.node_id == node_id]
        if gone and not (self.OWN_REPLY_LOCAL and node_id == self.me.node_id):
            self.members.remove(gone[0])
            self.dropped.append(gone[0])
            log.warning("session %s: member %s left; %d remain", self.session, gone[0].name,
                        len(self.members))
            self._maybe_done()

    def _maybe_done(self) -> None:
        if self._round is not None:
            self._round.check()

    def cancel(self) -> None:
        self._cancelled = True

    def on_deposed(self, msg: Deposed, sender: str) -> bool:
        """A member or the origin follows a leader of a later term: stop leading (the
        answer goes on there). Returns whether this leader stepped down."""
        if sender not in self.roster | {self.origin} or msg.leader not in self.roster:
            return False
        if self.deposed is None and sender != self.origin and (
                msg.leader == sender or not outranks(
                    self.session, (msg.term, msg.leader), (self.term, self.me.node_id))):
            # It follows another leader, whose lease holds; or it is that claimer itself,
            # whose own word is no vote (a cut-off member that took over says so too:
            # when its claim is real, the origin and the members following it say so).
            self.member_lost(sender)
            return False
        if self.deposed is None:          # a better claim, or the client's node says so
            log.warning("session %s: deposed: %s leads term %d now", self.session, msg.leader,
                        msg.term)
            self.deposed = msg
            if self._round is not None:
                self._round.stop()
            return True
        return False
