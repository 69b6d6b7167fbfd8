"""The wire protocol: one frozen dataclass per message, and strict encode/decode.

A message travels as a ZeroMQ multipart message::

    [b"DWM1", tag (1 byte), msgpack(header), *raw array buffers]

The header is a msgpack *array* of the message's non-array fields in declared order
(no keys on the wire: a top-k frame stays under 512 bytes at k=64). Arrays travel as raw
little-endian buffers, one frame each, in declared order; their length is implied by the
buffer size. Nothing is ever pickled.

`decode` validates everything before any other code sees the data: protocol id, known tag,
field count and types, finite floats, array dtypes and sizes, top-k bounds. Anything wrong
raises `ProtocolError`; the transport drops and counts such messages, a node never dies of
one. This module does no I/O.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import msgpack
import numpy as np

from dwarfmesh.config import MAX_PROMPT_TOKENS, MAX_TOP_K, PROTOCOL_ID, PROTOCOL_VERSION

MAX_TEXT_CHARS = 1 << 20
MAX_LIST_ITEMS = 4096


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

    def check(self) -> None:
        if not 1 <= self.max_tokens <= 1 << 20:
            raise ProtocolError(f"max_tokens out of range: {self.max_tokens}")
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


# --- node <-> node ------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """Introduction and heartbeat in one: sent to every peer every heartbeat interval.

    A Hello from a node this node does not know yet is answered with its own Hello (or a
    Refuse); any Hello refreshes the sender's liveness, so there is no separate heartbeat
    and no state where one side knows the other but not the reverse.
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


@dataclass(frozen=True)
class End:
    """Leader -> members and origin: the session is over; free its state."""

    TAG: ClassVar[int] = 8
    session: str
    reason: str                # eos | length | stop | error:... | cancelled
    summary: dict[str, Any]


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
    """

    TAG: ClassVar[int] = 10
    session: str
    leader: str
    step: int


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


MESSAGES: tuple[type, ...] = (
    Hello, Refuse, Start, Open, Frame, Token, End, Leave, Resume, Attach,
    PeersRequest, PeersReply, Generate, Cancel, Error,
)
_BY_TAG: dict[int, type] = {cls.TAG: cls for cls in MESSAGES}
assert len(_BY_TAG) == len(MESSAGES), "duplicate message tag"

# --- field checkers, built once from the type hints ---------------------------------------


def _checker(hint: Any, where: str):  # noqa: C901 - one small case per supported type
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        inner = _checker(args[0], where)
        return lambda v: None if v is None else inner(v)
    if hint is str:
        def check_str(v):
            if not isinstance(v, str) or len(v) > MAX_TEXT_CHARS:
                raise ProtocolError(f"{where}: expected str")
            return v
        return check_str
    if hint is bool:
        def check_bool(v):
            if not isinstance(v, bool):
                raise ProtocolError(f"{where}: expected bool")
            return v
        return check_bool
    if hint is int:
        def check_int(v):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ProtocolError(f"{where}: expected int")
            return v
        return check_int
    if hint is float:
        def check_float(v):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ProtocolError(f"{where}: expected a finite float")
            return float(v)
        return check_float
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        item = _checker(item_hint, where + "[]")
        def check_list(v):
            if not isinstance(v, list) or len(v) > MAX_LIST_ITEMS:
                raise ProtocolError(f"{where}: expected a list")
            return [item(x) for x in v]
        return check_list
    if origin is dict or hint is dict:
        def check_dict(v):
            if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
                raise ProtocolError(f"{where}: expected a dict with str keys")
            return v
        return check_dict
    if dataclasses.is_dataclass(hint):
        return lambda v: _from_list(hint, v, where)
    raise TypeError(f"unsupported field type {hint!r} at {where}")


def _plan(cls: type) -> tuple[list[tuple[str, Any]], list[tuple[str, np.dtype, int]]]:
    hints = typing.get_type_hints(cls)
    scalars, arrays = [], []
    for f in dataclasses.fields(cls):
        if "dtype" in f.metadata:
            arrays.append((f.name, f.metadata["dtype"], f.metadata["max_len"]))
        else:
            scalars.append((f.name, _checker(hints[f.name], f"{cls.__name__}.{f.name}")))
    return scalars, arrays


_PLANS = {cls: _plan(cls) for cls in (*MESSAGES, GenParams)}


def _to_list(obj: Any) -> list[Any]:
    scalars, _ = _PLANS[type(obj)]
    out = []
    for name, _check in scalars:
        value = getattr(obj, name)
        out.append(_to_list(value) if dataclasses.is_dataclass(value) else value)
    return out


def _from_list(cls: type, values: Any, where: str) -> Any:
    scalars, _ = _PLANS[cls]
    if not isinstance(values, list) or len(values) != len(scalars):
        raise ProtocolError(f"{where}: expected {len(scalars)} fields")
    obj = cls(**{name: check(v) for (name, check), v in zip(scalars, values)})
    if isinstance(obj, GenParams):
        obj.check()
    return obj


# --- encode / decode ----------------------------------------------------------------------


def encode(msg: Any) -> list[bytes]:
    """Encode a message into multipart frames (zero-copy for contiguous arrays)."""
    cls = type(msg)
    _, arrays = _PLANS[cls]
    parts = [PROTOCOL_ID, bytes((cls.TAG,)), msgpack.packb(_to_list(msg), use_single_float=True)]
    for name, dtype, _max_len in arrays:
        arr = np.ascontiguousarray(getattr(msg, name), dtype=dtype)
        parts.append(arr.tobytes())
    return parts


def decode(parts: list[bytes]) -> Any:
    """Decode and validate multipart frames; raise ProtocolError on anything wrong."""
    if len(parts) < 3:
        raise ProtocolError(f"too few frames: {len(parts)}")
    if bytes(parts[0]) != PROTOCOL_ID:
        raise ProtocolError(f"unknown protocol id {bytes(parts[0][:8])!r}")
    tag = bytes(parts[1])
    cls = _BY_TAG.get(tag[0]) if len(tag) == 1 else None
    if cls is None:
        raise ProtocolError(f"unknown message tag {tag[:4]!r}")
    scalars, arrays = _PLANS[cls]
    if len(parts) != 3 + len(arrays):
        raise ProtocolError(f"{cls.__name__}: expected {3 + len(arrays)} frames, got {len(parts)}")
    try:
        header = msgpack.unpackb(parts[2], raw=False, strict_map_key=True, use_list=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolError(f"{cls.__name__}: bad msgpack header: {exc}") from None
    if not isinstance(header, list) or len(header) != len(scalars):
        raise ProtocolError(f"{cls.__name__}: expected {len(scalars)} header fields")
    kwargs = {name: check(v) for (name, check), v in zip(scalars, header)}
    for (name, dtype, max_len), buf in zip(arrays, parts[3:]):
        buf = memoryview(buf)
        if buf.nbytes % dtype.itemsize or buf.nbytes // dtype.itemsize > max_len:
            raise ProtocolError(f"{cls.__name__}.{name}: bad array size {buf.nbytes}")
        kwargs[name] = np.frombuffer(buf, dtype=dtype)
    msg = cls(**kwargs)
    _check_semantics(msg)
    return msg


def _check_semantics(msg: Any) -> None:
    if isinstance(msg, Frame):
        if len(msg.ids) != len(msg.logprobs) or len(msg.ids) == 0:
            raise ProtocolError("Frame: ids and logprobs differ in length or are empty")
        if not np.all(np.isfinite(msg.logprobs)) or np.any(msg.logprobs > 1e-3):
            raise ProtocolError("Frame: logprobs must be finite and <= 0")
        if not 0.0 <= msg.rest_mass <= 1.0 or msg.step < 0:
            raise ProtocolError("Frame: rest_mass or step out of range")
    elif isinstance(msg, (Start, Generate)):
        msg.params.check()
        for turn in msg.messages:
            if not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
                raise ProtocolError("messages: each turn needs str role and content")
    elif isinstance(msg, Hello) and msg.vocab_size <= 0:
        raise ProtocolError("Hello: vocab_size must be positive")
    elif isinstance(msg, Token) and (msg.token_id < 0 or msg.step < 0):
        raise ProtocolError("Token: negative id or step")


def check_version(hello: Hello) -> str | None:
    """Why a peer's Hello must be refused, or None when it is welcome."""
    if hello.version != PROTOCOL_VERSION:
        return (f"protocol version mismatch: peer {hello.name} speaks v{hello.version}, "
                f"this node speaks v{PROTOCOL_VERSION}; upgrade the older one")
    return None


# --- the committed prefix hash ------------------------------------------------------------

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


def extend_hash(h: int, token_id: int) -> int:
    """Rolling FNV-1a-style hash of a token prefix, extended by one token."""
    return ((h ^ (token_id + 1)) * _FNV_PRIME) & _MASK64


def prefix_hash(ids: Any, h: int = _FNV_OFFSET) -> int:
    for t in ids:
        h = extend_hash(h, int(t))
    return h
