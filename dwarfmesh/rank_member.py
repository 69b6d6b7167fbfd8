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

A member that cannot go on (engine busy, diverged text, an error) sends `Leave`. Text
sessions have no leader takeover: when the leader dies the member frees its state.

`TextSessions` is this node's table of text sessions, led (`rank.TextLeaderSession`) and
joined; `roles.py` and `node.py` route text messages to it.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from jinja2 import TemplateError

from dwarfmesh import textfuse
from dwarfmesh.membership import SessionPlan
from dwarfmesh.protocol import (
    Candidates,
    Commit,
    End,
    GenParams,
    Leave,
    Proposal,
    Scores,
    Start,
    TextFrame,
    TextOpen,
    Token,
)
from dwarfmesh.rank import TextLeaderSession

log = logging.getLogger(__name__)

Send = Callable[[str, Any], int]


class TextMemberSession:
    def __init__(self, msg: TextOpen, *, me: str, engine: Any, send: Send) -> None:
        self.session, self.leader = msg.session, msg.leader
        self.params: GenParams = msg.params
        self.mode, self.keep = msg.mode, msg.keep
        self.open_msg = msg
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

    async def leader_gone(self) -> None:
        """No takeover for text sessions: free the state."""
        async with self._lock:
            log.warning("session %s: leader %s is gone; dropping this text session",
                        self.session, self.leader)
            await self._close(keep=False)

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
        leader = TextLeaderSession(
            session=start.session, origin=start.origin, params=start.params, kind=plan.kind,
            members=plan.group, me=node.me, engine=node.engine, send=node.send_to,
            prompt=start.prompt, messages=start.messages, keep=start.keep,
            excluded=plan.excluded, **node.session_timeouts())
        self.leading[start.session] = leader
        try:
            await leader.run()
        except Exception as exc:  # noqa: BLE001 - report any failure to the client, then log it
            log.exception("session %s failed", start.session)
            leader._to_members(End(start.session, f"error: {exc}", {}), origin_too=True,
                               dropped_too=True)
        finally:
            self.leading.pop(start.session, None)

    def reply(self, msg: Proposal | Scores | TextFrame, size: int) -> None:
        leader = self.leading.get(msg.session)
        if leader is not None:
            leader.on_reply(msg, size)

    async def handle(self, msg: TextOpen | Candidates | Commit) -> None:
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
            del self.members[msg.session]

    async def end(self, msg: End) -> None:
        member = self.members.pop(msg.session, None)
        if member is not None:
            await member.end()

    def leave(self, session: str, sender: str, reason: str) -> None:
        leader = self.leading.get(session)
        if leader is not None:
            log.warning("session %s: %s left: %s", session, sender, reason)
            leader.member_lost(sender)

    def cancel(self, session: str) -> None:
        leader = self.leading.get(session)
        if leader is not None:
            leader.cancel()

    def peer_gone(self, node_id: str) -> None:
        for leader in self.leading.values():
            leader.member_lost(node_id)
        for session, member in list(self.members.items()):
            if member.leader == node_id:
                del self.members[session]
                self.node.spawn(member.leader_gone())
