"""OpenAI request and response shapes for the mesh: pure functions, no I/O.

Owns: validating an OpenAI chat/completions request body into `GenParams` (`parse_request`),
the OpenAI-style error (`ApiError`, and which HTTP status a `MeshError` becomes), the
response and SSE chunk bodies with `usage` and the extra `dwarfmesh` field (who fused the
answer), holding back streamed text that may begin a stop string, and `ConversationIndex`,
which maps a re-sent chat history to the conversation whose KV caches hold it. The HTTP
server that uses these is `api.py`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from dwarfmesh.config import MAX_DRAFT, MAX_NEW_TOKENS, MAX_PROMPT_TOKENS
from dwarfmesh.ui.client import MeshError
from dwarfmesh.wire.modes import DRAFTERS, REQUEST_MODES
from dwarfmesh.wire.protocol import GenParams, ProtocolError

ENSEMBLE_ID = "dwarfmesh"          # the model id that means "the whole mesh"
DEFAULT_MAX_TOKENS = 512
MAX_PROMPT_CHARS = 4 * MAX_PROMPT_TOKENS   # ~4 characters a token: surely over the id limit
CONVERSATIONS_KEPT = 4096
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}

class ApiError(Exception):
    """An error answered as OpenAI-style JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else (
            "service_unavailable" if self.status == 503 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


def mesh_error(exc: MeshError) -> ApiError:
    text = str(exc)
    if "too long" in text or "context" in text:
        return ApiError(400, text, param="messages", code="context_length_exceeded")
    if "session failed" in text:
        return ApiError(500, text, code="generation_failed")
    return ApiError(503, f"the mesh is unreachable: {text}", code="mesh_unavailable")


# --- OpenAI request -> dwarfmesh request (pure) -------------------------------------------


@dataclass(frozen=True)
class GenRequest:
    kind: str                          # "chat" | "text"
    model: str
    params: GenParams
    stream: bool
    include_usage: bool
    prompt: str = ""
    messages: tuple[dict[str, str], ...] = ()


def _number(body: dict[str, Any], name: str, kind: type, default: Any, lo: float, hi: float):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not isinstance(value, int)) or not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be a {kind.__name__} between {lo} and {hi}, "
                            f"got {value!r}", param=name, code="invalid_value")
    return kind(value)


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (newer OpenAI clients)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise ApiError(400, f"{where}: only text content is supported", param=where)


def _speculate(value: Any) -> int:
    """dwarfmesh's own request key: "off" (default), "auto", or drafted tokens a round."""
    if value in ("off", None, 0):
        return 0
    if value == "auto":
        return -1
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_DRAFT:
        return value
    raise ApiError(400, f"'speculate' must be \"off\", \"auto\" or 1 to {MAX_DRAFT}",
                   param="speculate", code="invalid_value")


def _drafter(value: Any) -> str:
    """dwarfmesh's own request key: who drafts speculative rounds."""
    if value in DRAFTERS:
        return value
    raise ApiError(400, f"'drafter' must be one of {', '.join(DRAFTERS)}", param="drafter",
                   code="invalid_value")


def _mode(value: Any) -> str:
    """dwarfmesh's own request key: how the mesh answers (auto by default)."""
    if value in REQUEST_MODES:
        return value
    raise ApiError(400, f"'mode' must be one of {', '.join(REQUEST_MODES)}", param="mode",
                   code="invalid_value")


def parse_request(body: Any, kind: str) -> GenRequest:
    """Validate an OpenAI chat/completions request body; raise ApiError (400) if wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n", code="unsupported_value")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    seed = _number(body, "seed", int, None, -(1 << 63), (1 << 64) - 1)
    params = GenParams(
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", int, DEFAULT_MAX_TOKENS,
                           1, MAX_NEW_TOKENS),
        temperature=_number(body, "temperature", float, 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", float, 1.0, 1e-9, 1.0),
        seed=None if seed is None else seed % (1 << 63),
        stop=stop, speculate=_speculate(body.get("speculate", "off")),
        drafter=_drafter(body.get("drafter", "auto")), mode=_mode(body.get("mode", "auto")))
    try:
        params.check()                  # what the mesh itself will check on arrival
    except ProtocolError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from None
    model = body.get("model") or ENSEMBLE_ID
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
    stream = bool(body.get("stream", False))
    opts = body.get("stream_options") or {}
    usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' is required: a non-empty list of "
                                "{role, content}", param="messages", code="missing_messages")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] needs a string 'role'", param="messages")
            role = "system" if m["role"] == "developer" else m["role"]
            turns.append({"role": role, "content": _content(m.get("content"),
                                                            f"messages[{i}].content")})
        size = sum(len(t["content"]) for t in turns)
        req = GenRequest("chat", model, params, stream, usage, messages=tuple(turns))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' is required: a non-empty string", param="prompt")
        size = len(prompt)
        req = GenRequest("text", model, params, stream, usage, prompt=prompt)
    if size > MAX_PROMPT_CHARS:
        raise ApiError(400, f"the prompt is too long: {size} characters (at most "
                            f"{MAX_PROMPT_CHARS}, about {MAX_PROMPT_TOKENS} tokens)",
                       param="messages" if kind == "chat" else "prompt",
                       code="context_length_exceeded")
    return req


def stop_safe_len(text: str, stops: list[str]) -> int:
    """How much of `text` can be sent: all but a tail that may be the start of a stop string."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if stop.startswith(text[-k:]):
                held = k
                break
    return len(text) - held


def model_ids(nodes: list[dict[str, Any]]) -> list[str]:
    """The ensemble id, then each distinct model in the mesh."""
    return [ENSEMBLE_ID, *sorted({n["model"] for n in nodes})]


class ConversationIndex:
    """Which conversation id (whose KV caches the members keep) holds a chat history.

    A chat client re-sends the whole history each turn. When an answer is done, the
    history *including that answer* is remembered under its hash; the next turn's history
    up to and including its last assistant message hashes the same, so it gets the same
    conversation id and every member prefills only the new turn. A history not seen before
    (first turn, edited history, another API server) gets a fresh id: the answer is the
    same, only the prefill is longer. An id answering right now is never handed out twice
    (the mesh runs one answer per session); a second request gets a fresh id.
    """

    def __init__(self, capacity: int = CONVERSATIONS_KEPT) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, str] = OrderedDict()
        self._busy: set[str] = set()

    @staticmethod
    def history_key(messages: list[dict[str, str]] | tuple[dict[str, str], ...]) -> str:
        turns = [[m["role"], m["content"].strip()] for m in messages]
        raw = json.dumps(turns, ensure_ascii=False, separators=(",", ":")).encode()
        return hashlib.sha256(raw).hexdigest()[:32]

    def acquire(self, messages: tuple[dict[str, str], ...]) -> str:
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        conv = self._ids.get(self.history_key(messages[: last + 1])) if last >= 0 else None
        if conv is None or conv in self._busy:
            conv = "http-" + uuid.uuid4().hex[:16]
        self._busy.add(conv)
        return conv

    def release(self, conv: str, messages: tuple[dict[str, str], ...], reply: str | None) -> None:
        self._busy.discard(conv)
        if reply is None:
            return
        key = self.history_key((*messages, {"role": "assistant", "content": reply}))
        self._ids[key] = conv
        self._ids.move_to_end(key)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


# --- dwarfmesh answer -> OpenAI response (pure) --------------------------------------------


def mesh_info(summary: dict[str, Any], conversation: str = "") -> dict[str, Any]:
    keys = ("leader", "members", "models", "weights", "agreement", "disagreement_rate",
            "excluded", "prompt_tokens_reused", "ttft_ms", "tokens_per_s")
    info = {k: summary.get(k) for k in keys}
    for extra in ("mode", "voted", "benched", "select", "speculate"):
        if extra in summary:      # who voted, who was benched and why; select's verdict
            info[extra] = summary[extra]
    if conversation:
        info["conversation"] = conversation
    return info


def usage(summary: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = summary.get("prompt_tokens", 0), len(summary.get("token_ids", []))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": summary.get("prompt_tokens_reused", 0)}}


def completion_body(req: GenRequest, rid: str, created: int, text: str,
                    summary: dict[str, Any], conversation: str = "") -> dict[str, Any]:
    finish = FINISH.get(summary.get("finish_reason", ""), "stop")
    if req.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None,
                                  "message": {"role": "assistant", "content": text}}
    else:
        choice = {"index": 0, "finish_reason": finish, "logprobs": None, "text": text}
    return {"id": rid, "object": "chat.completion" if req.kind == "chat" else "text_completion",
            "created": created, "model": req.model, "system_fingerprint": None,
            "choices": [choice], "usage": usage(summary),
            ENSEMBLE_ID: mesh_info(summary, conversation)}


def chunk_body(req: GenRequest, rid: str, created: int, text: str | None,
               finish: str | None = None, first: bool = False) -> dict[str, Any]:
    if req.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish,
                                  "logprobs": None}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": req.model,
            "system_fingerprint": None, "choices": [choice]}
