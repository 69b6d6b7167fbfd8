"""Every message of the dwarfmesh wire protocol: one frozen dataclass each, grouped by
who sends it. `protocol.py` encodes and validates them; this module only declares them.

A field with array metadata travels as a raw little-endian buffer after the header; every
other field is an entry of the msgpack header array, in declared order. Tags are stable:
never reuse one for a different message.

Owns: the messages' fields (and `GenParams.check`'s ranges). Does not: encode,
decode or bound them for a receiver (`protocol`, `bounds`), or act on any.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from dwarfmesh.config import MAX_DRAFT, MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, MAX_TOP_K
from dwarfmesh.wire.modes import DRAFTERS, REQUEST_MODES

MAX_STOPS = 16                  # stop strings per request ...
MAX_STOP_CHARS = 256            # ... each at most this long (every one is searched per token)


class ProtocolError(ValueError):
    """A message that does not follow the protocol; it is dropped and counted."""


def _array(dtype: str, max_len: int) -> Any:
    return field(metadata={"dtype": np.dtype(dtype), "max_len": max_len})


# --- generation parameters (nested in requests) -------------------------------------------


@dataclass(frozen=True)
class GenParams:
    """How one answer is generated. Validated on arrival like any header."""

    max_tokens: int = 128
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 64                   # entries per member frame
    fuse: str = "linear"              # linear | loglinear
    weights: str = "online"           # online | equal | perplexity | static
    stop: list[str] = field(default_factory=list)
    chat: bool = False                # apply each member's chat template to the prompt
    mode: str = "auto"                # auto | fuse | rank (see membership.plan_session)
    speculate: int = 0                # id sessions: 0 off, N drafted tokens a round, -1 auto
    drafter: str = "auto"             # who drafts: auto | lookup | member (see speculate.py)

    def check(self) -> None:
        if not 1 <= self.max_tokens <= MAX_NEW_TOKENS:
            raise ProtocolError(f"max_tokens out of range: {self.max_tokens} (1 to "
                                f"{MAX_NEW_TOKENS})")
        if not 0.0 <= self.temperature <= 100.0:
            raise ProtocolError(f"temperature out of range: {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ProtocolError(f"top_p out of range: {self.top_p}")
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise ProtocolError(f"top_k out of range: {self.top_k}")
        if self.fuse not in ("linear", "loglinear"):
            raise ProtocolError(f"unknown fuse {self.fuse!r}")
        if self.weights not in ("online", "equal", "perplexity", "static"):
            raise ProtocolError(f"unknown weights {self.weights!r}")
        if self.mode not in REQUEST_MODES:
            raise ProtocolError(f"unknown mode {self.mode!r}")
        if not -1 <= self.speculate <= MAX_DRAFT:
            raise ProtocolError(f"speculate out of range: {self.speculate} (-1 = auto, 0 = "
                                f"off, or 1 to {MAX_DRAFT} drafted tokens)")
        if self.drafter not in DRAFTERS:
            raise ProtocolError(f"unknown drafter {self.drafter!r} (one of "
                                f"{', '.join(DRAFTERS)})")
        if len(self.stop) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ProtocolError(f"at most {MAX_STOPS} stop strings of at most "
                                f"{MAX_STOP_CHARS} characters each")


# --- node <-> node ------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """Introduction and heartbeat in one: sent to every peer every heartbeat interval.

    A Hello is answered with the receiver's own Hello (or a Refuse; at most twice a second
    per peer), which reaches the sender on the connection it dialled: proof that the peer
    listens where the sender sends, without which it is in no session. Any Hello
    refreshes the sender's liveness, so there is no separate heartbeat and no state where
    one side knows the other but not the reverse.
    """

    TAG: ClassVar[int] = 1
    node_id: str
    name: str
    model: str
    fingerprint: str           # tokenizer fingerprint: equal => same vocabulary, fuse by id
    vocab_size: int
    version: int
    address: str               # host:port of this node's ROUTER (":port" = use my source IP)
    weight: float              # static weight (--weight)
    leading: list[str]         # sessions this node leads right now
    peers: list[str]           # addresses of the peers this node sees alive (gossip)
    incarnation: str = ""      # random per process start: a restarted node (same id) is new
    engine: str = ""            # what runs its model: "mlx" | "llamacpp" (display only)


@dataclass(frozen=True)
class Refuse:
    TAG: ClassVar[int] = 2
    node_id: str
    reason: str


@dataclass(frozen=True)
class Start:
    """Entry node -> elected leader: run this request as session `session`."""

    TAG: ClassVar[int] = 4
    session: str
    origin: str                # node id that talks to the client; gets every Token
    prompt: str
    params: GenParams
    messages: list[dict[str, Any]]   # chat turns (role, content); used instead of prompt
    keep: bool                 # a conversation: members keep the KV cache for the next turn
    term: int = 0              # > 0: the origin re-elected after the first leader died


@dataclass(frozen=True)
class Open:
    """Leader -> member: prefill these ids and send the first frame.

    It carries everything a member needs to take over as leader if this one dies: the
    origin to stream to, the session's members (for the rendezvous rank), the params.
    """

    TAG: ClassVar[int] = 5
    session: str
    leader: str
    origin: str
    members: list[str]
    params: GenParams
    keep: bool                 # keep the KV cache after End (multi-turn); else free it
    prompt_ids: np.ndarray = _array("<u4", MAX_PROMPT_TOKENS)
    term: int = 0              # the leader's term (Start.term)


@dataclass(frozen=True)
class Frame:
    """Member -> leader: top-k of the next token's log-probabilities at `step`."""

    TAG: ClassVar[int] = 6
    session: str
    step: int
    sender: str
    prefix_hash: int           # rolling hash of the committed ids this frame was computed on
    rest_mass: float           # probability mass outside the top-k
    prev_logp: float | None    # exact log p of the token committed at step-1 (None at step 0)
    last_token: int            # id of the token committed at step-1 (-1 at step 0)
    prompt_nll: float | None   # mean NLL per prompt token (step 0 only)
    forward_ms: float          # the member's own compute time for this frame
    ids: np.ndarray = _array("<u4", MAX_TOP_K)
    logprobs: np.ndarray = _array("<f2", MAX_TOP_K)


@dataclass(frozen=True)
class Token:
    """Leader -> members and origin: the token committed at `step`."""

    TAG: ClassVar[int] = 7
    session: str
    step: int
    token_id: int
    prefix_hash: int           # hash of the committed ids including this token
    text: str                  # the text this token adds (leader's detokenizer)
    final: bool                # no frame is wanted after this token; an End follows
    term: int = 0              # the sender's leadership term (fencing; see Resume)


@dataclass(frozen=True)
class DraftFrame(Frame):
    """Member -> leader in a speculative session: the frame at `step` (the fields it
    shares with `Frame`), then the frame after each token of `draft`, as if the draft
    had been committed one token a round. The draft is echoed (a leader uses the extra
    positions only when they are its own round's), with the exact log p of each drafted
    token. `round_ids` are the tokens this member appended with the message it answers:
    a leader taking over adopts a round that reached only some members from them."""

    TAG: ClassVar[int] = 14
    draft: np.ndarray = _array("<u4", MAX_DRAFT)
    draft_logp: np.ndarray = _array("<f4", MAX_DRAFT)        # log p(draft[i] | prefix)
    more_rest: np.ndarray = _array("<f4", MAX_DRAFT)         # rest mass after draft[i]
    more_ids: np.ndarray = _array("<u4", MAX_DRAFT * MAX_TOP_K)          # k ids each
    more_logprobs: np.ndarray = _array("<f2", MAX_DRAFT * MAX_TOP_K)
    round_ids: np.ndarray = _array("<u4", MAX_DRAFT + 1)


@dataclass(frozen=True)
class Tokens:
    """Leader -> members in a speculative session: the tokens one round committed from
    `step` on (the accepted draft, then the fused choice) and the next draft, which a
    member appends in the same forward and answers with a `DraftFrame`. One message a
    round, so a member holds all of a round or none of it. The origin gets the same
    tokens as `Token`s (a member that is also the origin reads them from this).

    With `self_draft` = n (and no `draft`) the member drafting for a round is asked to
    draft n tokens itself, greedily from its own distribution, and to answer with them
    as its `DraftFrame`'s draft; the leader then sends the others the same tokens with
    that draft."""

    TAG: ClassVar[int] = 13
    session: str
    step: int                  # step of the first token
    prefix_hash: int           # hash of the committed ids including the last token
    texts: list[str]           # the text each token adds (leader's detokenizer)
    final: bool                # the last token ends the answer; no frame is wanted
    term: int
    token_ids: np.ndarray = _array("<u4", MAX_DRAFT + 1)
    draft: np.ndarray = _array("<u4", MAX_DRAFT)
    self_draft: int = 0        # draft this many tokens yourself (the member drafter)


@dataclass(frozen=True)
class End:
    """Leader -> members and origin: the session is over; free its state."""

    TAG: ClassVar[int] = 8
    session: str
    reason: str                # eos | length | stop | error:... | cancelled
    summary: dict[str, Any]
    term: int = 0              # the sender's leadership term


@dataclass(frozen=True)
class Leave:
    """Member -> leader: I cannot go on with this session (busy, diverged, failed)."""

    TAG: ClassVar[int] = 9
    session: str
    sender: str
    reason: str


@dataclass(frozen=True)
class Resume:
    """New leader -> members and origin: I lead `session` now, from `step` committed tokens.

    Members answer with their latest frame (which may be one step ahead, if they got a
    token the dead leader sent to only some); the origin streams from the new leader.

    `term` fences leadership: the first leader of a session has term 0, and a takeover
    claims the term after the one it took over from. Members and the origin follow the
    leader with the highest (term, rendezvous rank) they have seen and answer any other
    would-be leader with `Deposed`, so a paused or cut-off leader can never fork a session.
    """

    TAG: ClassVar[int] = 10
    session: str
    leader: str
    step: int
    term: int = 0


@dataclass(frozen=True)
class Deposed:
    """Member or origin -> a would-be leader: `session` is led by `leader` in `term` now,
    not by you. The receiver stops leading it (without an End: the session goes on)."""

    TAG: ClassVar[int] = 12
    session: str
    leader: str
    term: int


@dataclass(frozen=True)
class Attach:
    """Client -> node, or node -> leader: stream `session` to me from token `next_step`.

    A client whose node died attaches to another node; that node becomes the origin.
    """

    TAG: ClassVar[int] = 11
    session: str
    origin: str                # node id of the new origin ("" from a client)
    next_step: int


# --- client <-> node ----------------------------------------------------------------------


@dataclass(frozen=True)
class PeersRequest:
    TAG: ClassVar[int] = 20
    request: str


@dataclass(frozen=True)
class PeersReply:
    TAG: ClassVar[int] = 21
    request: str
    nodes: list[dict[str, Any]]


@dataclass(frozen=True)
class Generate:
    """Client -> any node: generate an answer; Tokens stream back, then an End."""

    TAG: ClassVar[int] = 22
    request: str
    prompt: str
    params: GenParams
    messages: list[dict[str, Any]]   # chat turns; when given, prompt is ignored
    conversation: str          # "" = one-shot; else reuse this conversation's KV caches


@dataclass(frozen=True)
class Cancel:
    TAG: ClassVar[int] = 23
    request: str


@dataclass(frozen=True)
class Error:
    TAG: ClassVar[int] = 24
    request: str
    message: str


# --- text-level sessions (members with different tokenizers; sessions/text_*.py) ---
# The committed state is TEXT: each member renders the prompt with its own template and
# re-encodes prompt + committed text with its own tokenizer. `text_hash` is
# textfuse.text_hash of the committed answer text a message was computed on.


@dataclass(frozen=True)
class TextOpen:
    """Leader -> member: open a text-level session; render the prompt, prefill, then
    answer with a Proposal (mode "rank") or a TextFrame (mode "fuse") for step 0."""

    TAG: ClassVar[int] = 30
    session: str
    leader: str
    origin: str
    members: list[str]
    params: GenParams
    keep: bool                 # keep the KV cache after End (multi-turn)
    mode: str                  # rank | fuse
    prompt: str
    messages: list[dict[str, Any]]   # chat turns; used instead of prompt
    propose_tokens: int        # rank: at most this many of the member's tokens per proposal
                               # (and never past params.max_tokens of its own tokens)
    term: int = 0              # the leader's term (Start.term)


@dataclass(frozen=True)
class Proposal:
    """Member -> leader (rank): my continuation of the committed text for round `step`."""

    TAG: ClassVar[int] = 31
    session: str
    step: int
    sender: str
    text_hash: int
    text: str                  # ends at a word or line boundary (textfuse.proposal_cut)
    eos: bool                  # the answer ends after `text`
    answer_tokens: int         # the committed answer's length in MY tokens (max_tokens)
    prompt_nll: float | None   # NLL per UTF-8 byte of the rendered prompt (step 0 only)
    forward_ms: float


@dataclass(frozen=True)
class Candidates:
    """Leader -> members (rank): score each of these continuations of the committed text."""

    TAG: ClassVar[int] = 32
    session: str
    step: int
    texts: list[str]
    eos: list[bool]
    term: int = 0              # the sender's leadership term


@dataclass(frozen=True)
class Scores:
    """Member -> leader (rank): my total NLL (nats) of each candidate, in order."""

    TAG: ClassVar[int] = 33
    session: str
    step: int
    sender: str
    text_hash: int
    nll: list[float]
    forward_ms: float


@dataclass(frozen=True)
class TextFrame:
    """Member -> leader (fuse): the next piece's top-k as strings (textfuse.align_texts)."""

    TAG: ClassVar[int] = 34
    session: str
    step: int
    sender: str
    text_hash: int
    rest_mass: float           # mass outside `texts` and EOS
    eos_logp: float            # exact log p(end of text)
    prev_logp: float | None    # exact log p of the text committed at step-1
    prompt_nll: float | None   # NLL per UTF-8 byte of the rendered prompt (step 0 only)
    forward_ms: float
    texts: list[str]
    logprobs: np.ndarray = _array("<f2", MAX_TOP_K)


@dataclass(frozen=True)
class Commit:
    """Leader -> members and origin: the text committed at `step` (the origin streams it
    to the client as a Token). Members re-sync their token sequence to it."""

    TAG: ClassVar[int] = 35
    session: str
    step: int
    text: str
    text_hash: int             # of the committed answer including `text`
    final: bool                # nothing is wanted after this; an End follows
    propose_tokens: int        # rank: budget of the next proposal
    term: int = 0              # the sender's leadership term


TEXT_MESSAGES: tuple[type, ...] = (TextOpen, Proposal, Candidates, Scores, TextFrame, Commit)

MESSAGES: tuple[type, ...] = (
    Hello, Refuse, Start, Open, Frame, Token, End, DraftFrame, Tokens, Leave, Resume,
    Deposed, Attach, PeersRequest, PeersReply, Generate, Cancel, Error, *TEXT_MESSAGES,
)
