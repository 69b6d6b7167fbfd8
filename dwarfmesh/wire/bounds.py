"""Meaning-level bounds on decoded messages: what a well-formed message may still not say.

`protocol.decode` checks syntax (types, sizes, finite floats); this module checks what
the values mean, for the node that receives them: token ids inside its vocabulary, a
prompt inside its context, addresses that parse, names and lists of bounded length,
log-probabilities and NLLs on the right side of zero, and text-session candidates small
enough that scoring them cannot exhaust memory. A message that breaks a bound raises
`ProtocolError` and is dropped and counted like a malformed one.

The receiving node's own limits (`Limits`) are set once its model is loaded; before that
(and in clients) only the node-independent bounds apply. This module does no I/O and
knows nothing about sessions or who may send what (that is the node's business).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from dwarfmesh.config import MAX_DRAFT, MAX_NEW_TOKENS, MAX_PROMPT_TOKENS
from dwarfmesh.wire.messages import (
    Attach,
    Candidates,
    Commit,
    DraftFrame,
    Frame,
    Generate,
    Hello,
    Open,
    Proposal,
    ProtocolError,
    Resume,
    Scores,
    Start,
    TextFrame,
    TextOpen,
    Token,
    Tokens,
)
from dwarfmesh.wire.modes import TEXT_OPEN_MODES

# Log-probabilities computed in float32 and sent in float16 may round a hair past zero.
ROUNDING = 1e-3
# A text session's "log p of the committed piece" is log P(ids(text + piece)) -
# log P(ids(text)): re-encoding can merge across the cut and make it positive (seen: +9
# nats, Qwen's "\n\n"). It is bounded, not signed.
TEXT_LOGP_SLACK = 16.0
ID_CHARS = 64                  # node ids, node names, fingerprints
SESSION_CHARS = 128            # session and request ids
MODEL_CHARS = 256
REASON_CHARS = 512
TOKEN_TEXT_CHARS = 4096        # the text one Token adds
MAX_MEMBERS = 512              # node ids listed in one session's Open / TextOpen
MAX_LEADING = 256              # sessions (their tags) one Hello says its sender leads
MAX_GOSSIP = 64                # peer addresses in one Hello
MAX_VOCAB = 1 << 24
MAX_WEIGHT = 1e6
MAX_TURNS = 1024               # chat turns in one request
ROLE_CHARS = 32
MAX_PROPOSE_TOKENS = 64        # a rank proposal's token budget
PIECE_BYTES = 512              # UTF-8 bytes of one rank proposal or committed piece
# select: a proposal, candidate or commit is a whole answer (at most MAX_NEW_TOKENS of
# its writer's tokens; honest code runs at 3-5 bytes a token).
ANSWER_BYTES = 8 * MAX_NEW_TOKENS
# Everything one Candidates asks a member to score: a whole answer from each of a few
# members. The engine scores rows longer than one small batch one at a time, so this
# bounds work, not memory.
SCORE_BYTES = 4 * ANSWER_BYTES
TOPK_TEXT_BYTES = 256          # UTF-8 bytes of one string in a fuse-mode TextFrame
MAX_CANDIDATES = 32
# A prompt sent as text (Start, Generate, TextOpen) is tokenized by the receiver: at most
# this many characters (the HTTP API's limit too), and, where the receiver's context is
# known, at most TEXT_BYTES_PER_TOKEN UTF-8 bytes per token of it (honest text runs at
# 3-5 bytes a token; this bounds what a prompt of one-byte tokens can cost).
MAX_PROMPT_CHARS = 4 * MAX_PROMPT_TOKENS
TEXT_BYTES_PER_TOKEN = 8

_HOST = re.compile(r"[0-9A-Za-z._%:\[\]-]{1,253}")


@dataclass(frozen=True)
class Limits:
    """What the receiving node can take; None where it is not known (yet)."""

    vocab_size: int | None = None
    context: int | None = None         # most prompt ids its model takes


def parse_address(text: str, *, host_optional: bool = False) -> tuple[str, int]:
    """(host, port) of "host:port" (port 1-65535); raise ProtocolError otherwise. With
    host_optional, ":port" (meaning "the address you saw me at") is accepted too."""
    host, sep, port = text.rpartition(":")
    if (not sep or not port.isdigit() or len(port) > 5 or not 1 <= int(port) <= 65535
            or not (_HOST.fullmatch(host) or (host_optional and host == ""))):
        raise ProtocolError(f"bad address {text[:80]!r}")
    return host, int(port)


def check(msg: Any, limits: Limits | None = None) -> None:
    """Raise ProtocolError if `msg` breaks a bound (see the module docstring)."""
    limits = limits or Limits()
    _strings(msg)
    checker = _BY_TYPE.get(type(msg))
    if checker is not None:
        checker(msg, limits)


# --- per field ----------------------------------------------------------------------------

_FIELD_CHARS = {"session": SESSION_CHARS, "request": SESSION_CHARS, "conversation": SESSION_CHARS,
                "node_id": ID_CHARS, "sender": ID_CHARS, "leader": ID_CHARS, "origin": ID_CHARS,
                "name": ID_CHARS, "fingerprint": ID_CHARS, "model": MODEL_CHARS,
                "reason": REASON_CHARS, "incarnation": ID_CHARS}


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NAMES = ("session", "request", "conversation", "node_id", "sender", "leader", "origin",
          "name", "fingerprint", "model", "incarnation")


def _strings(msg: Any) -> None:
    for name, most in _FIELD_CHARS.items():
        value = getattr(msg, name, None)
        if isinstance(value, str) and len(value) > most:
            raise ProtocolError(f"{type(msg).__name__}.{name}: longer than {most} characters")
    for name in _NAMES:                     # they end up in logs: no forged log lines
        value = getattr(msg, name, None)
        if isinstance(value, str) and _CONTROL.search(value):
            raise ProtocolError(f"{type(msg).__name__}.{name}: control characters")
    for name in ("step", "next_step", "term"):
        if getattr(msg, name, 0) < 0:
            raise ProtocolError(f"{type(msg).__name__}.{name}: negative")
    if getattr(msg, "forward_ms", 0.0) < 0:
        raise ProtocolError(f"{type(msg).__name__}.forward_ms: negative")
    for turn in getattr(msg, "messages", ()) or ():
        if len(str(turn.get("role", ""))) > ROLE_CHARS:
            raise ProtocolError("messages: a role is too long")
    if len(getattr(msg, "messages", ()) or ()) > MAX_TURNS:
        raise ProtocolError(f"messages: more than {MAX_TURNS} turns")


def _ids(ids: list[str], most: int, where: str) -> None:
    if len(ids) > most or any(len(i) > SESSION_CHARS for i in ids):
        raise ProtocolError(f"{where}: more than {most} entries, or one too long")


def _logp(value: float | None, where: str) -> None:
    if value is not None and value > ROUNDING:
        raise ProtocolError(f"{where}: a log-probability above 0")


def _nll(value: float | None, where: str) -> None:
    if value is not None and value < -ROUNDING:
        raise ProtocolError(f"{where}: a negative NLL")


def _vocab(ids: np.ndarray, limits: Limits, where: str) -> None:
    if limits.vocab_size is not None and len(ids) and int(ids.max()) >= limits.vocab_size:
        raise ProtocolError(f"{where}: an id outside this node's vocabulary "
                            f"({limits.vocab_size})")


def _utf8(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


# --- per message --------------------------------------------------------------------------


def _hello(msg: Hello, _limits: Limits) -> None:
    parse_address(msg.address, host_optional=True)
    if len(msg.peers) > MAX_GOSSIP:
        raise ProtocolError(f"Hello: more than {MAX_GOSSIP} peer addresses")
    for addr in msg.peers:
        parse_address(addr, host_optional=True)
    _ids(msg.leading, MAX_LEADING, "Hello.leading")
    if not 0 < msg.vocab_size <= MAX_VOCAB:
        raise ProtocolError("Hello: vocab_size out of range")
    if not (math.isfinite(msg.weight) and 0 < msg.weight <= MAX_WEIGHT):
        raise ProtocolError("Hello: weight out of range")


def _open(msg: Open, limits: Limits) -> None:
    _ids(msg.members, MAX_MEMBERS, "Open.members")
    n = len(msg.prompt_ids)
    if n == 0:
        raise ProtocolError("Open: empty prompt")
    if limits.context is not None and n > limits.context:
        raise ProtocolError(f"Open: {n} prompt ids, this node's context is {limits.context}")
    _vocab(msg.prompt_ids, limits, "Open.prompt_ids")


def _frame(msg: Frame, limits: Limits) -> None:
    _vocab(msg.ids, limits, "Frame.ids")
    if msg.last_token < -1 or (limits.vocab_size is not None
                               and msg.last_token >= limits.vocab_size):
        raise ProtocolError("Frame.last_token out of range")
    _logp(msg.prev_logp, "Frame.prev_logp")
    _nll(msg.prompt_nll, "Frame.prompt_nll")


def _draft_frame(msg: DraftFrame, limits: Limits) -> None:
    _frame(msg, limits)
    for name in ("draft", "more_ids", "round_ids"):
        _vocab(getattr(msg, name), limits, f"DraftFrame.{name}")


def _tokens(msg: Tokens, limits: Limits) -> None:
    _vocab(msg.token_ids, limits, "Tokens.token_ids")
    _vocab(msg.draft, limits, "Tokens.draft")
    if not 0 <= msg.self_draft <= MAX_DRAFT or (msg.self_draft and len(msg.draft)):
        raise ProtocolError("Tokens.self_draft: 0 to MAX_DRAFT, and never with a draft")
    if any(len(t) > TOKEN_TEXT_CHARS for t in msg.texts):
        raise ProtocolError("Tokens: text too long")


def _token(msg: Token, limits: Limits) -> None:
    if limits.vocab_size is not None and msg.token_id >= limits.vocab_size:
        raise ProtocolError("Token: an id outside this node's vocabulary")
    if len(msg.text) > TOKEN_TEXT_CHARS:
        raise ProtocolError("Token: text too long")


def _text_open(msg: TextOpen, limits: Limits) -> None:
    _text_prompt(msg, limits)
    _ids(msg.members, MAX_MEMBERS, "TextOpen.members")
    budget = MAX_NEW_TOKENS if msg.mode == "select" else MAX_PROPOSE_TOKENS
    if msg.mode not in TEXT_OPEN_MODES or not 1 <= msg.propose_tokens <= budget:
        raise ProtocolError("TextOpen: mode or propose_tokens out of range")


def _proposal(msg: Proposal, _limits: Limits) -> None:
    # (a whole answer in select mode; the leader holds a rank proposal to PIECE_BYTES)
    if _utf8(msg.text) > ANSWER_BYTES or msg.answer_tokens < 0:
        raise ProtocolError("Proposal: text too long or answer_tokens negative")
    _nll(msg.prompt_nll, "Proposal.prompt_nll")


def _candidates(msg: Candidates, _limits: Limits) -> None:
    sizes = [_utf8(t) for t in msg.texts]
    if not sizes or len(sizes) > MAX_CANDIDATES or len(msg.eos) != len(sizes):
        raise ProtocolError(f"Candidates: 1 to {MAX_CANDIDATES}, with one eos flag each")
    if max(sizes) > ANSWER_BYTES or sum(sizes) > SCORE_BYTES:
        raise ProtocolError("Candidates: too many bytes to score")


def _scores(msg: Scores, _limits: Limits) -> None:
    if len(msg.nll) > MAX_CANDIDATES:
        raise ProtocolError("Scores: more scores than candidates can be")


def _text_frame(msg: TextFrame, _limits: Limits) -> None:
    if len(msg.texts) != len(msg.logprobs) or any(_utf8(t) > TOPK_TEXT_BYTES
                                                  for t in msg.texts):
        raise ProtocolError("TextFrame: texts and logprobs differ, or a text is too long")
    lp = np.asarray(msg.logprobs, dtype=np.float32)
    if not np.all(np.isfinite(lp)) or np.any(lp > ROUNDING):
        raise ProtocolError("TextFrame: logprobs must be finite and <= 0")
    if not 0.0 <= msg.rest_mass <= 1.0:
        raise ProtocolError("TextFrame: rest_mass out of range")
    _logp(msg.eos_logp, "TextFrame.eos_logp")
    if msg.prev_logp is not None and msg.prev_logp > TEXT_LOGP_SLACK:
        raise ProtocolError("TextFrame.prev_logp: more than a re-encoding can gain")
    _nll(msg.prompt_nll, "TextFrame.prompt_nll")


def _commit(msg: Commit, _limits: Limits) -> None:
    if _utf8(msg.text) > ANSWER_BYTES or not 0 <= msg.propose_tokens <= MAX_NEW_TOKENS:
        raise ProtocolError("Commit: text too long or propose_tokens out of range")


def _text_prompt(msg: Start | Generate | TextOpen, limits: Limits) -> None:
    texts = [msg.prompt, *(str(t.get("content", "")) for t in msg.messages)]
    if sum(len(t) for t in texts) > MAX_PROMPT_CHARS:
        raise ProtocolError(f"{type(msg).__name__}: prompt too long: more than "
                            f"{MAX_PROMPT_CHARS} characters")
    size = sum(_utf8(t) for t in texts)
    if limits.context is not None and size > TEXT_BYTES_PER_TOKEN * limits.context:
        raise ProtocolError(f"{type(msg).__name__}: prompt too long: {size} bytes, far past "
                            f"this node's context of {limits.context} tokens")


def _none(_msg: Any, _limits: Limits) -> None:
    pass


_BY_TYPE = {Hello: _hello, Open: _open, Frame: _frame, Token: _token,
            DraftFrame: _draft_frame, Tokens: _tokens, TextOpen: _text_open,
            Proposal: _proposal, Candidates: _candidates, Scores: _scores,
            TextFrame: _text_frame, Commit: _commit, Start: _text_prompt,
            Generate: _text_prompt, Resume: _none, Attach: _none}
