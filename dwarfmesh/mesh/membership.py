"""Who is in the mesh, and who leads which session: pure state, no I/O, no clock of its own.

`Membership` is a small reducer: the transport feeds it events (a Hello arrived, a
heartbeat arrived, time passed) with an explicit `now`, and asks who is alive. The
election is a pure function of (session id, live members): rendezvous hashing, so every
node that sees the same membership computes the same leader without talking to anyone,
and sessions spread evenly over the mesh.

Same-vocabulary sessions fuse token ids, so only members whose tokenizer fingerprint
matches can join one; `fusion_group` picks that group and says why others are left out.
`plan_session` decides a session's path: whole answers selected by every member's
likelihood (auto's choice with two members or more), id fusion, or (mixed tokenizers) a
text-level rank or fuse session over every live member.

Owns: pure state and pure decisions about peers and sessions' leaders. Does not: send
anything, run a session, or read a clock (times come in as arguments).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from dwarfmesh.config import HEARTBEAT_INTERVAL_S, LIVENESS
from dwarfmesh.wire.modes import Mode

if TYPE_CHECKING:
    from dwarfmesh.wire.messages import GenParams


@dataclass(frozen=True)
class Member:
    node_id: str
    name: str
    model: str
    fingerprint: str
    vocab_size: int
    address: str
    weight: float = 1.0
    leading: tuple[str, ...] = ()
    last_seen: float = 0.0
    incarnation: str = ""          # changes when the node restarts (same id, new process)
    engine: str = ""            # "mlx" | "llamacpp": shown by `dwarfmesh peers`
    verified: bool = False      # answered a Hello at the address this node sends it to


@dataclass
class Membership:
    """The live peers as seen by one node (itself included, never expired)."""

    me: Member
    peers: dict[str, Member] = field(default_factory=dict)
    liveness_s: float = HEARTBEAT_INTERVAL_S * LIVENESS

    def peer_up(self, member: Member, now: float) -> bool:
        """Record a (re)introduced peer; True if it is new. It stays verified while it
        keeps its incarnation and address."""
        old = self.peers.get(member.node_id)
        verified = member.verified or (old is not None and old.verified
                                       and (old.incarnation, old.address)
                                       == (member.incarnation, member.address))
        self.peers[member.node_id] = replace(member, last_seen=now, verified=verified)
        return old is None

    def verify(self, node_id: str) -> bool:
        """The peer answered at its address: it may be planned into sessions. True if it
        was not verified before."""
        m = self.peers.get(node_id)
        if m is None or m.verified:
            return False
        self.peers[node_id] = replace(m, verified=True)
        return True

    def heard_from(self, node_id: str, now: float, leading: list[str] | None = None) -> None:
        m = self.peers.get(node_id)
        if m is not None:
            lead = tuple(leading) if leading is not None else m.leading
            self.peers[node_id] = replace(m, last_seen=now, leading=lead)

    def excuse(self, seconds: float) -> None:
        """This node was not running for `seconds` (stopped, suspended, starved): that
        time does not count as any peer's silence (what they sent meanwhile is still
        waiting in its sockets)."""
        for node_id, m in self.peers.items():
            self.peers[node_id] = replace(m, last_seen=m.last_seen + seconds)

    def peer_down(self, node_id: str) -> Member | None:
        return self.peers.pop(node_id, None)

    def expire(self, now: float) -> list[Member]:
        """Drop peers silent for longer than the liveness window; return them."""
        dead = [m for m in self.peers.values() if now - m.last_seen > self.liveness_s]
        for m in dead:
            del self.peers[m.node_id]
        return dead

    def alive(self) -> list[Member]:
        """Every live member, this node included, in node-id order."""
        return sorted([self.me, *self.peers.values()], key=lambda m: m.node_id)

    def reachable(self) -> list[Member]:
        """The live members this node has reached, itself included, in node-id order:
        the ones a session may be planned with, listed and gossiped. A Hello proves only
        that someone can send; a peer counts once it answered this node's Hello at the
        address this node sends to (anyone can claim a node id, a model and an address
        it does not listen on)."""
        return [m for m in self.alive() if m is self.me or m.verified]


def rendezvous_score(session: str, node_id: str) -> int:
    digest = hashlib.blake2b(f"{session}\x00{node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank_for_session(session: str, members: list[Member]) -> list[Member]:
    """Members in leadership order for `session`: the first leads, the next takes over."""
    return sorted(members, key=lambda m: (rendezvous_score(session, m.node_id), m.node_id),
                  reverse=True)


def outranks(session: str, claim: tuple[int, str], current: tuple[int, str]) -> bool:
    """Whether a leadership claim (term, node id) beats the current one for `session`.

    A later term wins (a takeover claims the term after the one it took over from); in
    one term, the higher rendezvous rank (two survivors that each saw themselves first).
    A total order, so every node that sees both claims follows the same leader."""
    def key(c: tuple[int, str]) -> tuple[int, int, str]:
        return c[0], rendezvous_score(session, c[1]), c[1]
    return key(claim) > key(current)


@dataclass(frozen=True)
class Succession:
    """What a member does when its session's leader is gone (`successor`)."""

    action: str          # take-over | wait | abstain
    leader: str          # the next leader ("" when abstaining)


def successor(session: str, members: list[str], alive: set[str], me: str,
              origin: str | None = None) -> Succession:
    """Who leads `session` after its leader died, as seen by member `me` (pure).

    The first surviving member by rendezvous rank takes over; the others wait for its
    Resume. A member that sees less than half of a session of three or more abstains,
    unless it still sees the session's origin (the client's side of a cut is the one that
    matters, and the last survivors of a mesh must go on): otherwise it is probably the
    one cut off, with no client to answer."""
    ranked = [m.node_id for m in rank_for_session(session, [_Id(i) for i in members])
              if m.node_id in alive]
    minority = len(members) > 2 and 2 * len(ranked) < len(members)
    if not ranked or (minority and (origin is None or origin not in alive)):
        return Succession("abstain", "")
    return Succession("take-over" if ranked[0] == me else "wait", ranked[0])


@dataclass(frozen=True)
class _Id:
    node_id: str


def elect_leader(session: str, members: list[Member]) -> Member:
    if not members:
        raise ValueError("no members to elect a leader from")
    return rank_for_session(session, members)[0]


def fusion_group(members: list[Member]) -> tuple[list[Member], list[tuple[Member, str]]]:
    """The largest set of members sharing one tokenizer, and the others with the reason.

    Ties between equally large groups go to the smallest fingerprint, so every node
    picks the same group.
    """
    if not members:
        return [], []
    counts = Counter(m.fingerprint for m in members)
    best = min(counts, key=lambda fp: (-counts[fp], fp))
    group = [m for m in members if m.fingerprint == best]
    ref = group[0]
    left_out = [
        (m, f"{m.name} ({m.model}) has a different tokenizer than {ref.model} "
            f"(fingerprint {m.fingerprint[:8]} vs {best[:8]}); "
            "id-level fusion needs one vocabulary")
        for m in members if m.fingerprint != best
    ]
    return group, left_out


STREAM_MIXED_MODE = Mode.RANK   # what stream mode runs when members' tokenizers differ


@dataclass(frozen=True)
class SessionPlan:
    kind: Mode
    group: list[Member]
    excluded: list[tuple[Member, str]]
    why: str


def plan_session(params: GenParams, alive: list[Member]) -> SessionPlan:
    """Which path a session takes, with whom, and why (pure).

    auto: one member runs alone (ids, streamed); two or more write whole answers and the
    most likely is kept (select: on HumanEval it is the mode that beats the best member,
    see docs/worth.md), unless the request speculates, which only the id path does.
    stream: ids fusion with one tokenizer, rank across tokenizers."""
    tokenizers = len({m.fingerprint for m in alive})
    if params.mode == "select" or (params.mode == "auto" and len(alive) > 1
                                   and not params.speculate):
        why = "select requested" if params.mode == "select" else \
            f"auto: {len(alive)} members write whole answers, the most likely is kept"
        return SessionPlan(Mode.SELECT, list(alive), [], why)
    if params.mode == "rank":
        return SessionPlan(Mode.RANK, list(alive), [], "rank mode requested")
    if tokenizers <= 1:
        group, excluded = fusion_group(alive)
        return SessionPlan(Mode.IDS, group, excluded, "one tokenizer: fusing token ids")
    kind = Mode.FUSE_TEXT if params.mode == "fuse" else STREAM_MIXED_MODE
    return SessionPlan(kind, list(alive), [],
                       f"{tokenizers} tokenizers among {len(alive)} members: {kind.value} by text")
