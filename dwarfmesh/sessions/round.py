"""One round of a session: a leader's request to its members, and the wait for their replies.

Every kind of leader (token ids: `Frame`s; text: `Proposal`s, `Scores`, `TextFrame`s;
speculative: `DraftFrame`s) waits the same way, so the rules live here once:

- The round is complete when every current member has replied. Members can leave while
  it waits (dropped, dead, diverged); `members()` is read again each time, so a round
  never waits on someone no longer in the session.
- It never waits silently: the trigger goes out again every `every` seconds, to every
  member (one that already answered answers again, and hears that its leader is alive),
  and a bound never counts time this node itself was not running (`deadlines.own_stall`).
- Without a deadline, the members still silent at `limit` come back as `silent`: the
  leader drops them.
- With a deadline (`--step-deadline`), the round closes at the deadline with what has
  arrived; the members without a reply are `late`, not dropped (they catch up on the
  next message). With nothing by then, it takes the first reply that comes (asking
  again meanwhile) up to `limit`; members silent at `limit` are `silent`.
- `stop()` ends the wait at once (the leader was deposed).

Owns: the wait. Does not: decide whether a reply belongs to the round (its step, its
hash, its kind: that is the leader's), send anything itself (the leader's `Trigger`
does), or count anything in a session's summary.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from dwarfmesh.sessions.deadlines import own_stall

Trigger = Callable[[set[str] | None], None]   # send the round's request (None: the first
                                              # time; else to these members again)


@dataclass(frozen=True)
class Outcome:
    """How a round ended."""

    replies: dict[str, Any]     # node id -> its reply, for the members that gave one
    late: list[str]             # no reply by the deadline: still members, decided without
    silent: list[str]           # no reply by the bound: the leader drops them


class Round:
    """Replies to one request, and the wait for them (see the module's rules)."""

    def __init__(self, members: Callable[[], Iterable[str]], send: Trigger, *, me: str,
                 preset: dict[str, Any] | None = None) -> None:
        self.members, self.send, self.me = members, send, me
        self.replies: dict[str, Any] = dict(preset or {})
        self.counted: set[str] = set()     # members whose reply went elsewhere (the
                                           # id leader's frames one step ahead)
        loop = asyncio.get_running_loop()
        self._all = loop.create_future()
        self._first = loop.create_future()
        self.check()

    def open(self) -> None:
        """Send the request to every member."""
        self.send(None)

    def offer(self, sender: str, reply: Any) -> None:
        """A reply the leader accepted for this round."""
        self.replies[sender] = reply
        if not self._first.done():
            self._first.set_result(None)
        self.check()

    def count(self, sender: str) -> None:
        """`sender` answered, though not with a reply to keep here."""
        self.counted.add(sender)
        self.check()

    def check(self) -> None:
        """Complete once every current member has answered (call when members leave)."""
        if not self._all.done() and set(self.members()) <= set(self.replies) | self.counted:
            self._all.set_result(None)

    def stop(self) -> None:
        if not self._all.done():
            self._all.set_result(None)

    @property
    def complete(self) -> bool:
        return self._all.done()

    def _missing(self) -> list[str]:
        return [m for m in self.members() if m not in self.replies and m not in self.counted]

    async def close(self, limit: float, every: float,
                    deadline: float | None = None) -> Outcome:
        """Wait as the rules say; the outcome lists who answered, who is late, who is
        silent."""
        late: list[str] = []
        try:
            if deadline is None or deadline >= limit:
                await self._wait(self._all, limit, every)
            else:
                try:
                    await self._wait(self._all, deadline, every)
                except asyncio.TimeoutError:
                    if not self.replies:   # nothing yet: the first reply, or everyone
                        await self._wait(self._first, limit - deadline, every)
                    late = self._missing()
        except asyncio.TimeoutError:
            return Outcome(dict(self.replies), [], self._missing())
        return Outcome(dict(self.replies), late, [])

    async def _wait(self, until: asyncio.Future, limit: float, every: float) -> None:
        """Wait for `until` (or the whole round) up to `limit`, sending the request
        again every `every` seconds; raises TimeoutError at the bound."""
        loop = asyncio.get_running_loop()
        end = loop.time() + limit
        while not (until.done() or self._all.done()):
            wait = min(every, max(end - loop.time(), 0.0))
            due = loop.time() + wait
            await asyncio.wait({until, self._all}, timeout=wait,
                               return_when=asyncio.FIRST_COMPLETED)
            if until.done() or self._all.done():
                return
            end += own_stall(due, loop.time())     # this node's own stall is not theirs
            if loop.time() >= end:
                raise asyncio.TimeoutError
            self.send(set(self.members()) - {self.me})   # its own reply is local
