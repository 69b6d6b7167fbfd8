"""The wire protocol: strict encode/decode of the messages declared in `messages.py`.

A message travels as a ZeroMQ multipart message::

    [b"DWM1", tag (1 byte), msgpack(header), *raw array buffers]

The header is a msgpack *array* of the message's non-array fields in declared order
(no keys on the wire: a top-k frame stays under 512 bytes at k=64). Arrays travel as raw
little-endian buffers, one frame each, in declared order; their length is implied by the
buffer size. Nothing is ever pickled.

`decode` validates everything before any other code sees the data: protocol id, known tag,
field count and types, finite floats, array dtypes and sizes, top-k bounds, then what the
values mean for the receiving node (`bounds.check` with its `Limits`: ids inside its
vocabulary, a prompt inside its context, addresses, lengths). Anything wrong raises
`ProtocolError`; the transport drops and counts such messages, a node never dies of one.
This module does no I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import types
import typing
from typing import Any, Union

import msgpack
import numpy as np

from dwarfmesh.config import PROTOCOL_ID, PROTOCOL_VERSION
from dwarfmesh.wire import bounds
from dwarfmesh.wire.bounds import Limits
from dwarfmesh.wire.messages import *  # noqa: F403 - the protocol's public names are its messages
from dwarfmesh.wire.messages import (
    MESSAGES,
    DraftFrame,
    Frame,
    Generate,
    GenParams,
    Hello,
    ProtocolError,
    Start,
    Token,
    Tokens,
)

MAX_TEXT_CHARS = 1 << 20
MAX_LIST_ITEMS = 4096
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


def decode(parts: list[bytes], limits: Limits | None = None) -> Any:
    """Decode and validate multipart frames; raise ProtocolError on anything wrong.
    `limits`: the receiving node's (vocabulary, context); None checks only what does not
    depend on the receiver."""
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
    bounds.check(msg, limits)
    return msg


def _check_semantics(msg: Any) -> None:
    if isinstance(msg, Frame):
        if len(msg.ids) != len(msg.logprobs) or len(msg.ids) == 0:
            raise ProtocolError("Frame: ids and logprobs differ in length or are empty")
        if not np.all(np.isfinite(msg.logprobs)) or np.any(msg.logprobs > 1e-3):
            raise ProtocolError("Frame: logprobs must be finite and <= 0")
        if not 0.0 <= msg.rest_mass <= 1.0 or msg.step < 0:
            raise ProtocolError("Frame: rest_mass or step out of range")
        if isinstance(msg, DraftFrame):
            _check_draft_frame(msg)
    elif isinstance(msg, (Start, Generate)):
        msg.params.check()
        for turn in msg.messages:
            if not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
                raise ProtocolError("messages: each turn needs str role and content")
    elif isinstance(msg, Hello) and msg.vocab_size <= 0:
        raise ProtocolError("Hello: vocab_size must be positive")
    elif isinstance(msg, Token) and (msg.token_id < 0 or msg.step < 0):
        raise ProtocolError("Token: negative id or step")
    elif isinstance(msg, Tokens) and (msg.step < 0 or len(msg.token_ids) == 0
                                      or len(msg.texts) != len(msg.token_ids)):
        raise ProtocolError("Tokens: no tokens, a negative step, or texts and ids differ")


def _check_draft_frame(msg: DraftFrame) -> None:
    n, k = len(msg.more_rest), len(msg.ids)
    if len(msg.draft) != len(msg.draft_logp) or n > len(msg.draft):
        raise ProtocolError("DraftFrame: draft, its log p and its positions differ")
    if len(msg.more_ids) != n * k or len(msg.more_logprobs) != n * k:
        raise ProtocolError("DraftFrame: each drafted position needs k entries")
    for values in (msg.more_logprobs, msg.draft_logp):
        if not np.all(np.isfinite(values)) or np.any(values > 1e-3):
            raise ProtocolError("DraftFrame: log-probabilities must be finite and <= 0")
    if np.any(msg.more_rest < 0.0) or np.any(msg.more_rest > 1.0):
        raise ProtocolError("DraftFrame: rest mass out of range")


def check_version(hello: Hello) -> str | None:
    """Why a peer's Hello must be refused, or None when it is welcome."""
    if hello.version != PROTOCOL_VERSION:
        return (f"protocol version mismatch: peer {hello.name} speaks v{hello.version}, "
                f"this node speaks v{PROTOCOL_VERSION}; upgrade the older one")
    return None


def session_tag(session: str) -> str:
    """The public name of a session (in `leader_of`, Hello.leading): a session id lets
    whoever holds it attach to the answer, so only its client and the mesh see it."""
    return hashlib.blake2b(session.encode(), digest_size=6, person=b"dwm-session").hexdigest()


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
