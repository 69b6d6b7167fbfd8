"""A member's side of a text-level session: rank or fuse across tokenizers.

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

A member that cannot go on (engine busy, diverged text, an error) sends `Leave`. As on
the id path, only the leader of the best (term, rank) claim is followed (`follow`), and a
copy of a request this member already answered (the leader asking again for a reply it
lost) is answered with the same reply.

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
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from jinja2 import TemplateError

from dwarfmesh.config import FAILOVER_GRACE_S
from dwarfmesh.fusion import text as textfuse
from dwarfmesh.mesh.membership import SessionPlan, outranks, successor
from dwarfmesh.sessions.deadlines import MEMBER_IDLE_S
from dwarfmesh.sessions.member import follow_leader
from dwarfmesh.sessions.text_leader import TextLeaderSession
from dwarfmesh.sessions.text_resume import TextResume
from dwarfmesh.wire.protocol import (
    Attach,
    Candidates,
    Commit,
    Deposed,
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
        self.fresh: Callable[[str], bool] = lambda _node: False   # set by TextSessions
        self.step = 0                       # the step this member answers next
        self.hash = textfuse.TEXT_HASH_START
        self.answer = ""
        self.closed = False
        self.term = msg.term
        self.claimed = True                  # `leader` has led us in `term` (see follow)
        self.last_heard = time.monotonic()   # from the leader (idle sessions are freed)
        self.last_reply: Any = None          # answered again when the leader asks again
        self._lock = asyncio.Lock()

    def follow(self, sender: str, term: int) -> bool:
        """Whether a message from `sender` in `term` is this session's leader's (see
        `member.follow_leader`)."""
        return follow_leader(self, sender, term)

    def again(self, kind: type, step: int) -> None:
        """The leader asked again for the reply to step `step`: send it, if it was made."""
        if (not self.closed and isinstance(self.last_reply, kind)
                and self.last_reply.step == step):
            self.send(self.leader, self.last_reply)

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
            if isinstance(self.last_reply, Scores) and self.last_reply.step == msg.step:
                return self.again(Scores, msg.step)
            if len(msg.texts) != len(msg.eos) or not msg.texts:
                return await self._leave("malformed candidates")
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            try:
                nll = await self.engine.score(self.session, list(msg.texts), list(msg.eos))
            except (RuntimeError, ValueError, KeyError) as exc:
                return await self._leave(f"cannot score: {exc}")
            self._reply(Scores(self.session, msg.step, self.me, self.hash, nll,
                               (loop.time() - t0) * 1000.0))

    async def commit(self, msg: Commit) -> None:
        async with self._lock:
            if not self.closed and msg.step == self.step - 1:
                return self.again(Proposal if self.mode == "rank" else TextFrame, self.step)
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
            self.resumed_by = msg.leader
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
        self._reply(msg)

    def _reply(self, msg: Any) -> None:
        if not self.closed:
            self.last_reply = msg
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
    """This node's text-level sessions: those it leads and those it is a member of.

    `sender` is always the peer a message came from (see roles.py: authority)."""

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
            excluded=plan.excluded, term=start.term, **node.session_timeouts()))

    async def _run(self, leader: TextLeaderSession) -> None:
        session = leader.session
        self.leading[session] = leader
        try:
            await leader.run()
        except Exception as exc:  # noqa: BLE001 - report any failure to the client, then log it
            log.exception("session %s failed", session)
            leader._to_members(End(session, f"error: {exc}", {}, leader.term), origin_too=True,
                               dropped_too=True)
        finally:
            if self.leading.get(session) is leader:
                del self.leading[session]
            member = self.members.get(session)
            if member is not None and member.taken_over:
                self._forget(member)
            if leader.deposed is None:
                self.node.roles.keep_finished(session, leader.sent)

    # --- what the rest of the node asks -------------------------------------------------

    def running(self, session: str) -> bool:
        member = self.members.get(session)
        return session in self.leading or (member is not None and not member.closed)

    def members_of(self, session: str) -> set[str]:
        member = self.members.get(session)
        return set(member.members) if member is not None else set()

    def term_of(self, session: str) -> int:
        leader, member = self.leading.get(session), self.members.get(session)
        return leader.term if leader is not None else member.term if member is not None else 0

    def share_of(self, leader: str) -> int:
        return sum(1 for m in self.members.values() if m.leader == leader and not m.closed)

    def leader_of(self, session: str) -> str:
        """Who leads `session` as far as this node knows ("" if it does not)."""
        if session in self.leading:
            return self.node.node_id
        member = self.members.get(session)
        return member.leader if member is not None else ""

    # --- messages -----------------------------------------------------------------------

    def reply(self, msg: Proposal | Scores | TextFrame, size: int, sender: str) -> None:
        leader = self.leading.get(msg.session)
        if leader is None:
            return
        if sender != msg.sender:
            self.node.refused("text reply sent for another node")
            return
        leader.on_reply(msg, size)

    async def handle(self, msg: TextOpen | Candidates | Commit, sender: str) -> None:
        node = self.node
        leader = self.leading.get(msg.session)
        if (isinstance(msg, Commit) and leader is not None and msg.step >= leader.steps
                and sender in {m.node_id for m in leader.members}):
            leader.adopt(msg)            # from a member ahead of this new leader (resume)
            return
        if isinstance(msg, TextOpen):
            await self._open(msg, sender)
            return
        member = self.members.get(msg.session)
        if isinstance(msg, Commit) and msg.session in node.roles.clients:
            # The origin streams committed text to its client.
            node.roles.to_client(Token(msg.session, msg.step, 0, msg.text_hash, msg.text,
                                       msg.final, msg.term), sender)
        # (A member that took over stays this leader's own local member: it is followed.)
        if member is None:
            if (msg.session not in node.roles.clients and not self.running(msg.session)
                    and sender != node.node_id):
                node.roles.stray(msg, sender)    # e.g. a deposed leader that woke up late
            return
        if not member.follow(sender, msg.term):
            return
        if isinstance(msg, Candidates):
            await member.candidates(msg)
        else:
            await member.commit(msg)
        if member.closed and self.members.get(msg.session) is member:
            self._forget(member)

    async def _open(self, msg: TextOpen, sender: str) -> None:
        node = self.node
        if sender != msg.leader:
            node.refused("TextOpen from another node than its leader")
            return
        current = self.members.get(msg.session)
        if current is not None and not current.closed:
            if (current.leader, current.term) == (msg.leader, msg.term):
                current.last_heard = time.monotonic()
                current.again(Proposal if current.mode == "rank" else TextFrame, 0)
                return
            if not outranks(msg.session, (msg.term, msg.leader),
                            (current.term, current.leader)):
                node.send_to(sender, Deposed(msg.session, current.leader, current.term))
                return
            current.closed = True                # superseded by a better claim
        roles = node.roles
        if sender != node.node_id and roles._share_of(sender) >= roles._max_share():
            node.refused("a leader past its share of this node's sessions")
            node.send_to(sender, Leave(msg.session, node.node_id,
                                       "busy: your share of this node's sessions is taken"))
            return
        member = TextMemberSession(msg, me=node.node_id, engine=node.engine,
                                   send=node.send_to)
        member.fresh = node.fresh
        self.members[msg.session] = member
        await member.open()

    async def end(self, msg: End, sender: str) -> None:
        member = self.members.get(msg.session)
        if member is not None and member.follow(sender, msg.term):
            self._forget(member)
            await member.end()

    def _forget(self, member: TextMemberSession) -> None:
        """A finished member: remember who led, for a client that re-attaches late."""
        if self.members.get(member.session) is member:
            del self.members[member.session]
        self.node.roles.remember_leader(member.session, member.leader, member.term)

    def leave(self, session: str, sender: str, reason: str) -> None:
        leader = self.leading.get(session)
        if leader is not None and sender in {m.node_id for m in leader.members}:
            log.warning("session %s: %s left: %s", session, sender, reason)
            leader.member_lost(sender)

    def deposed(self, msg: Deposed, sender: str) -> None:
        leader = self.leading.get(msg.session)
        if leader is not None:
            leader.on_deposed(msg, sender)

    def cancel(self, session: str, sender: str) -> None:
        leader = self.leading.get(session)
        if leader is not None and sender == leader.origin:
            leader.cancel()

    async def resume(self, msg: Resume, sender: str) -> None:
        member = self.members.get(msg.session)
        if member is not None and sender == msg.leader and member.follow(sender, msg.term):
            await member.resume(msg)
            if member.closed:
                self._forget(member)

    def attach(self, msg: Attach) -> bool:
        """A new origin wants the Commits from `msg.next_step` (the leader's side)."""
        leader = self.leading.get(msg.session)
        if leader is not None:
            leader.set_origin(msg.origin, msg.next_step)
        return leader is not None

    async def sweep(self) -> None:
        """Free member sessions whose leader has said nothing for `MEMBER_IDLE_S`."""
        now = time.monotonic()
        for member in list(self.members.values()):
            if member.taken_over or now - member.last_heard < MEMBER_IDLE_S:
                continue
            if member.leader == self.node.node_id and member.session in self.leading:
                continue     # this node's own member: its leader (here) is alive; a long
                #              first step (prefill) sends it nothing to hear
            self._forget(member)
            await member.leader_gone(f"nothing from it for {now - member.last_heard:.0f}s")
            self.node.send_to(member.leader, Leave(member.session, self.node.node_id, "idle"))

    # --- failover -----------------------------------------------------------------------

    def peer_gone(self, node_id: str) -> None:
        node = self.node
        for leader in self.leading.values():
            leader.member_lost(node_id)
        alive = {m.node_id for m in node.membership.alive()}
        for session, member in list(self.members.items()):
            if member.leader != node_id or member.closed or member.taken_over:
                continue
            nxt = successor(session, member.members, alive, node.node_id, member.origin)
            if nxt.action == "abstain":
                # We see less than half of the session: we are probably the ones cut off,
                # and taking over would make a second leader. Leave it to the majority.
                del self.members[session]
                node.spawn(member.leader_gone("most of the session is unreachable too"))
            elif nxt.action == "take-over":
                member.taken_over = True
                node.spawn(self._take_over(member, alive))
            else:
                log.info("session %s: leader %s gone; %s takes over", session, node_id,
                         nxt.leader)
                member.leader, member.claimed = nxt.leader, False
                node.spawn(self._await_resume(member))

    async def _take_over(self, member: TextMemberSession, alive: set[str]) -> None:
        node = self.node
        async with member._lock:          # no step in flight: its text is what was committed
            resume = member.resume_state()
            term = member.term + 1
            member.leader, member.term = node.node_id, term
        peers = {m.node_id: m for m in node.membership.alive()}
        members = [peers[i] for i in member.members if i in alive and i in peers]
        m = member.open_msg
        log.warning("session %s: leader gone; taking over at step %d (term %d) with %s",
                    member.session, member.step, term, ", ".join(x.name for x in members))
        client = node.roles.clients.get(member.session)
        if client is not None:
            client.leader, client.term, client.leader_lost_at = node.node_id, term, None
        leader = TextLeaderSession(
            session=member.session, origin=member.origin, params=member.params,
            kind="rank" if member.mode == "rank" else "fuse-text", members=members,
            me=node.me, engine=node.engine, send=node.send_to, prompt=m.prompt,
            messages=m.messages, keep=member.keep, resume=resume, term=term,
            roster=set(member.members),
            **node.session_timeouts())
        await self._run(leader)

    async def _await_resume(self, member: TextMemberSession) -> None:
        """Free a member whose new leader never says so (it died too, or saw otherwise)."""
        waited_for = member.leader
        await asyncio.sleep(2 * FAILOVER_GRACE_S)
        if member.leader == waited_for and not member.closed and member.resumed_by != waited_for:
            if self.members.get(member.session) is member:
                del self.members[member.session]
            await member.leader_gone(f"{waited_for} never resumed it")
