"""A member's side of a text-level session (issue 6): rank or fuse across tokenizers.

A text member holds TEXT, not ids: the prompt rendered by its own chat template (or the
raw prompt) plus the committed answer. The engine keeps the matching ids and KV cache
(`Engine.text_open` / `text_extend`: re-encode, trim to the common prefix, prefill the
tail). Per message from the leader, in arrival order (one lock):

- `TextOpen`: render and prefill the prompt, then answer for step 0;
- `Candidates` (rank): score every candidate in one batched forward -> `Scores`;
- `Commit`: check the text hash, append the committed text, then answer for the next
  step: a `Proposal` (rank: a continuation up to a word or line boundary) or a
  `TextFrame` (fuse: the next piece's top-k as strings, with the exact log p of the text
  just committed, for online weights);
- `End`: free (or keep, for a conversation) the cache.

A member that cannot go on (engine busy, diverged text, an error) sends `Leave`.

Failover, as on the id path (`roles.py`): when the leader dies, every member ranks the
session's surviving members by the same rendezvous hash; the first takes over (a
`rank.TextLeaderSession` resumed from its committed text, which every member holds: they
all applied the same Commits), the others wait for its `Resume` and answer again for the
step they are at. When the dead leader's last Commit reached only some, a member ahead
hands the new leader the Commits it lacks (`rank_failover`: it adopts them) and one
behind catches up on those the new leader re-sends. A client whose node died
re-attaches to another node (`Attach`), and the leader replays the Commits it missed.

`TextSessions` is this node's table of text sessions, led (`rank.TextLeaderSession`) and
joined; `roles.py` and `node.py` route text messages to it.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
from jinja2 import TemplateError

from dwarfmesh import textfuse
from dwarfmesh.config import FAILOVER_GRACE_S
from dwarfmesh.membership import SessionPlan, rank_for_session
from dwarfmesh.protocol import (
    Attach,
    Candidates,
    Commit,
    End,
    GenParams,
    Leave,
    Proposal,
    Resume,
    Scores,
    Start,
    TextFrame,
    TextOpen,
    Token,
)
from dwarfmesh.rank import TextLeaderSession
from dwarfmesh.rank_failover import TextResume

log = logging.getLogger(__name__)

Send = Callable[[str, Any], int]


class TextMemberSession:
    def __init__(self, msg: TextOpen, *, me: str, engine: Any, send: Send) -> None:
        self.session, self.leader = msg.session, msg.leader
        self.params: GenParams = msg.params
        self.mode, self.keep = msg.mode, msg.keep
        self.origin, self.members = msg.origin, list(msg.members)
        self.open_msg = msg
        self.propose_tokens = msg.propose_tokens
        self.pieces: list[str] = []         # the committed answer, piece by piece (failover)
        self.hashes: list[int] = []         # text_hash after each piece
        self.taken_over = False
        self.resumed_by: str | None = None   # the leader whose Resume this member answered
        self.me, self.engine, self.send = me, engine, send
        self.step = 0                       # the step this member answers next
        self.hash = textfuse.TEXT_HASH_START
        self.answer = ""
        self.closed = False
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        async with self._lock:
            m = self.open_msg
            try:
                text, templated = self.engine.render_prompt(m.prompt, m.messages,
                                                            self.params.chat)
                out = await self.engine.text_open(self.session, text, templated)
            except (RuntimeError, ValueError, KeyError, TypeError, TemplateError) as exc:
                return await self._leave(f"cannot open: {exc}")
            nll = -out.logp / out.nbytes if out.nbytes else None
            await self._answer(m.propose_tokens, None, nll, out.forward_ms)

    async def candidates(self, msg: Candidates) -> None:
        async with self._lock:
            if self.closed or msg.step != self.step:
                return
            if len(msg.texts) != len(msg.eos) or not msg.texts:
                return await self._leave("malformed candidates")
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            try:
                nll = await self.engine.score(self.session, list(msg.texts), list(msg.eos))
            except (RuntimeError, ValueError, KeyError) as exc:
                return await self._leave(f"cannot score: {exc}")
            self.send(self.leader, Scores(self.session, msg.step, self.me, self.hash, nll,
                                          (loop.time() - t0) * 1000.0))

    async def commit(self, msg: Commit) -> None:
        async with self._lock:
            if self.closed or msg.step != self.step:
                return
            expected = textfuse.text_hash(self.hash, msg.text)
            if expected != msg.text_hash:
                return await self._leave(f"committed text diverged at step {msg.step}")
            self.hash, self.step = expected, self.step + 1
            self.answer += msg.text
            self.pieces.append(msg.text)
            self.hashes.append(expected)
            self.propose_tokens = msg.propose_tokens
            if msg.final:
                # Bring the cache up to date for the next turn of a conversation only.
                if self.keep:
                    await self._extend(msg.text)
                return await self._close(keep=self.keep)
            out = await self._extend(msg.text)
            if out is not None:
                await self._answer(msg.propose_tokens, out.logp, None, out.forward_ms)

    async def end(self) -> None:
        async with self._lock:
            await self._close(keep=self.keep)

    async def leader_gone(self, why: str) -> None:
        """No one takes over (see TextSessions.peer_gone): free the state."""
        async with self._lock:
            log.warning("session %s: leader %s is gone and %s; dropping this text session",
                        self.session, self.leader, why)
            await self._close(keep=False)

    async def resume(self, msg: Resume) -> None:
        """A new leader after a failover: answer it for the step this member is at. A
        member ahead of it (the dead leader's last Commit reached only some) first sends
        it the Commits it lacks, which it adopts; one behind was sent the new leader's
        Commits just before the Resume, so it has caught up by now."""
        async with self._lock:
            if self.closed:
                return
            self.leader = self.resumed_by = msg.leader
            if msg.step > self.step:
                return await self._leave(f"at step {self.step}, the new leader at {msg.step}")
            for step in range(msg.step, self.step):
                self.send(self.leader, Commit(self.session, step, self.pieces[step],
                                              self.hashes[step], False, self.propose_tokens))
            await self._answer(self.propose_tokens, None, None, 0.0)

    def resume_state(self) -> TextResume:
        """What a takeover needs: the committed answer, piece by piece."""
        return TextResume(list(self.pieces))

    # --- inside -------------------------------------------------------------------------

    async def _extend(self, piece: str) -> Any:
        try:
            return await self.engine.text_extend(self.session, piece)
        except (RuntimeError, ValueError, KeyError) as exc:
            await self._leave(f"cannot re-sync: {exc}")
            return None

    async def _answer(self, propose_tokens: int, prev_logp: float | None,
                      prompt_nll: float | None, spent_ms: float) -> None:
        """What the leader wants for `self.step`: a Proposal (rank) or a TextFrame (fuse)."""
        p = self.params
        try:
            if self.mode == "rank":
                # max_tokens counts each member's own tokens: the leader ends the answer
                # when one member's count reaches it, whoever leads.
                used = len(self.engine.tokenizer.encode(self.answer, add_special_tokens=False)
                           ) if self.answer else 0
                budget = min(propose_tokens, p.max_tokens - used)
                seed = [p.seed or 0, self.step, zlib.crc32(self.me.encode())]
                out = (await self.engine.propose(self.session, budget, p.temperature, seed)
                       if budget > 0 else None)
                msg: Any = Proposal(self.session, self.step, self.me, self.hash,
                                    out.text if out else "", out.eos if out else False, used,
                                    prompt_nll, spent_ms + (out.forward_ms if out else 0.0))
            else:
                top = await self.engine.text_topk(self.session, p.top_k)
                msg = TextFrame(self.session, self.step, self.me, self.hash, top.rest_mass,
                                top.eos_logp, prev_logp, prompt_nll, spent_ms + top.forward_ms,
                                top.texts, np.asarray(top.logprobs, dtype=np.float16))
        except (RuntimeError, ValueError, KeyError) as exc:
            return await self._leave(f"cannot compute step {self.step}: {exc}")
        if not self.closed:
            self.send(self.leader, msg)

    async def _leave(self, reason: str) -> None:
        log.warning("session %s: leaving: %s", self.session, reason)
        await self._close(keep=False)
        self.send(self.leader, Leave(self.session, self.me, reason))

    async def _close(self, keep: bool) -> None:
        if not self.closed:
            self.closed = True
            await self.engine.close(self.session, keep=keep)


class TextSessions:
    """This node's text-level sessions: those it leads and those it is a member of."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.leading: dict[str, TextLeaderSession] = {}
        self.members: dict[str, TextMemberSession] = {}

    async def lead(self, start: Start, plan: SessionPlan) -> None:
        node = self.node
        await self._run(TextLeaderSession(
            session=start.session, origin=start.origin, params=start.params, kind=plan.kind,
            members=plan.group, me=node.me, engine=node.engine, send=node.send_to,
            prompt=start.prompt, messages=start.messages, keep=start.keep,
            excluded=plan.excluded, **node.session_timeouts()))

    async def _run(self, leader: TextLeaderSession) -> None:
        session = leader.session
        self.leading[session] = leader
        try:
            await leader.run()
        except Exception as exc:  # noqa: BLE001 - report any failure to the client, then log it
            log.exception("session %s failed", session)
            leader._to_members(End(session, f"error: {exc}", {}), origin_too=True,
                               dropped_too=True)
        finally:
            self.leading.pop(session, None)
            self.node.roles.keep_finished(session, leader.sent)

    def reply(self, msg: Proposal | Scores | TextFrame, size: int) -> None:
        leader = self.leading.get(msg.session)
        if leader is not None:
            leader.on_reply(msg, size)

    async def handle(self, msg: TextOpen | Candidates | Commit) -> None:
        leader = self.leading.get(msg.session)
        if isinstance(msg, Commit) and leader is not None and msg.step >= leader.steps:
            leader.adopt(msg)            # from a member ahead of this new leader (resume)
            return
        if isinstance(msg, Commit):      # the origin streams committed text to its client
            self.node.roles.to_client(Token(msg.session, msg.step, 0, msg.text_hash, msg.text,
                                            msg.final))
        if isinstance(msg, TextOpen):
            member = TextMemberSession(msg, me=self.node.node_id, engine=self.node.engine,
                                       send=self.node.send_to)
            self.members[msg.session] = member
            await member.open()
            return
        member = self.members.get(msg.session)
        if member is None:
            return
        if isinstance(msg, Candidates):
            await member.candidates(msg)
        else:
            await member.commit(msg)
        if member.closed and self.members.get(msg.session) is member:
            self._forget(member)

    async def end(self, msg: End) -> None:
        member = self.members.get(msg.session)
        if member is not None:
            self._forget(member)
            await member.end()

    def _forget(self, member: TextMemberSession) -> None:
        """A finished member: remember who led, for a client that re-attaches late."""
        del self.members[member.session]
        self.node.roles.remember_leader(member.session, member.leader)

    def leave(self, session: str, sender: str, reason: str) -> None:
        leader = self.leading.get(session)
        if leader is not None:
            log.warning("session %s: %s left: %s", session, sender, reason)
            leader.member_lost(sender)

    def cancel(self, session: str) -> None:
        leader = self.leading.get(session)
        if leader is not None:
            leader.cancel()

    async def resume(self, msg: Resume) -> None:
        member = self.members.get(msg.session)
        if member is not None:
            await member.resume(msg)
            if member.closed and self.members.get(msg.session) is member:
                self._forget(member)

    def leader_of(self, session: str) -> str:
        """Who leads `session` as far as this node knows ("" if it does not)."""
        if session in self.leading:
            return self.node.node_id
        member = self.members.get(session)
        return member.leader if member is not None else ""

    def attach(self, msg: Attach) -> bool:
        """A new origin wants the Commits from `msg.next_step` (the leader's side)."""
        leader = self.leading.get(msg.session)
        if leader is not None:
            leader.set_origin(msg.origin, msg.next_step)
        return leader is not None

    def peer_gone(self, node_id: str) -> None:
        node = self.node
        for leader in self.leading.values():
            leader.member_lost(node_id)
        alive = {m.node_id for m in node.membership.alive()}
        for session, member in list(self.members.items()):
            if member.leader != node_id or member.closed or member.taken_over:
                continue
            ranked = [m.node_id for m in rank_for_session(session, _ids(member.members))
                      if m.node_id in alive]
            if not ranked or (len(member.members) > 2 and 2 * len(ranked) < len(member.members)):
                # We see less than half of the session: we are probably the ones cut off,
                # and taking over would make a second leader. Leave it to the majority.
                del self.members[session]
                node.spawn(member.leader_gone("most of the session is unreachable too"))
            elif ranked[0] == node.node_id:
                self._take_over(member, alive)
            else:
                log.info("session %s: leader %s gone; %s takes over", session, node_id,
                         ranked[0])
                member.leader = ranked[0]
                node.spawn(self._await_resume(member))

    def _take_over(self, member: TextMemberSession, alive: set[str]) -> None:
        node = self.node
        member.taken_over = True
        member.leader = node.node_id
        peers = {m.node_id: m for m in node.membership.alive()}
        members = [peers[i] for i in member.members if i in alive and i in peers]
        m = member.open_msg
        log.warning("session %s: leader gone; taking over at step %d with %s", member.session,
                    member.step, ", ".join(x.name for x in members))
        leader = TextLeaderSession(
            session=member.session, origin=member.origin, params=member.params,
            kind="rank" if member.mode == "rank" else "fuse-text", members=members,
            me=node.me, engine=node.engine, send=node.send_to, prompt=m.prompt,
            messages=m.messages, keep=member.keep, resume=member.resume_state(),
            **node.session_timeouts())
        node.spawn(self._run(leader))

    async def _await_resume(self, member: TextMemberSession) -> None:
        """Free a member whose new leader never says so (it died too, or saw otherwise)."""
        waited_for = member.leader
        await asyncio.sleep(2 * FAILOVER_GRACE_S)
        if member.leader == waited_for and not member.closed and member.resumed_by != waited_for:
            if self.members.get(member.session) is member:
                del self.members[member.session]
            await member.leader_gone(f"{waited_for} never resumed it")


def _ids(ids: list[str]) -> list[Any]:
    """rank_for_session wants objects with a node_id; give it just that."""
    return [SimpleNamespace(node_id=i) for i in ids]
