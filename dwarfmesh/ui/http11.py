"""The HTTP/1.1 layer of the API server: reading requests, writing responses, and the
guards that keep a browser tab or a stranger from driving or exhausting it.

Owns: parsing a request (Content-Length bodies only, keep-alive), response heads, JSON
and chunked SSE responses, and `HttpGuard`, which decides per request and connection:

- **CORS**: a request with an `Origin` (what a browser adds to every cross-origin
  request) is refused with 403 unless that origin is one the user allowed
  (`--cors-origin`, repeatable; `*` allows every origin), and only an allowed one gets
  `Access-Control-Allow-Origin`. A web page the user visits can neither read the API nor
  drive it. Other clients (curl, SDKs) send no `Origin`.
- **Host**: a request whose `Host` names neither an IP address, `localhost`, nor a name
  the user allowed (the bind host, `--http-allow-host`) is refused with 403: that is how
  DNS rebinding reaches a local server (evil.example resolving to 127.0.0.1).
- **Sizes and time**: headers up to 64 KiB, a body up to `MAX_BODY_BYTES` and within a
  shared budget of body bytes being read at once, a request head within
  `HEAD_TIMEOUT_S`, a body within `BODY_TIMEOUT_S`; at most `MAX_CONNECTIONS`
  connections, `MAX_PER_IP` from one address. Anything else is a 4xx (or 503 when full),
  never a 500 or a hang.

It knows nothing about OpenAI shapes or the mesh (`api.py`, `openai_compat.py`).
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from dwarfmesh.ui.openai_compat import ApiError

MAX_BODY_BYTES = 2 << 20           # a whole chat history fits (prompts are <= 131,072 chars)
BODY_BUDGET_BYTES = 32 << 20       # body bytes being read at once, all connections together
MAX_CONNECTIONS = 128
MAX_PER_IP = 32
HEAD_TIMEOUT_S = 10.0              # a request head must arrive this fast (slow-loris)
KEEPALIVE_S = 75.0                 # an idle keep-alive connection is closed after this
BODY_TIMEOUT_S = 30.0
MAX_JSON_DEPTH = 32                # OpenAI bodies nest 4 deep; json.loads recurses
CORS_HEADERS = {"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Content-Type",
                "Access-Control-Max-Age": "86400", "Vary": "Origin"}
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
           403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           411: "Length Required", 413: "Payload Too Large",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable", 505: "HTTP Version Not Supported"}

# The CORS headers of the request being answered (each connection is its own task).
_cors: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("cors",
                                                                              default=None)


@dataclass
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    version: str = "HTTP/1.1"

    @property
    def keep_alive(self) -> bool:
        asked = self.headers.get("connection", "").lower()
        return asked == "keep-alive" if self.version == "HTTP/1.0" else asked != "close"


class HttpGuard:
    """Per-server policy: allowed origins and hosts, connection counts, the body budget."""

    def __init__(self, *, bind_host: str, cors_origins: list[str] | None = None,
                 allow_hosts: list[str] | None = None) -> None:
        self.cors_origins = set(cors_origins or [])
        self.hosts = {h.lower().strip("[]") for h in (allow_hosts or []) + [bind_host, "localhost"]
                      if h}
        self.open: Counter[str] = Counter()          # connections per client IP
        self.body_bytes = 0
        self.refused: Counter[str] = Counter()

    def admit(self, ip: str) -> bool:
        """Count a new connection; False (and not counted) when the server is full."""
        if sum(self.open.values()) >= MAX_CONNECTIONS or self.open[ip] >= MAX_PER_IP:
            self.refused["connections"] += 1
            return False
        self.open[ip] += 1
        return True

    def release(self, ip: str) -> None:
        self.open[ip] -= 1
        if self.open[ip] <= 0:
            del self.open[ip]

    def check(self, req: HttpRequest) -> None:
        """Set this request's CORS headers; raise ApiError(403) for a foreign Host."""
        origin = req.headers.get("origin", "")
        allowed = origin and ("*" in self.cors_origins or origin in self.cors_origins)
        _cors.set({"Access-Control-Allow-Origin": origin, **CORS_HEADERS} if allowed else {})
        host = req.headers.get("host")
        if host is not None and not self._host_ok(host):
            self.refused["host"] += 1
            raise ApiError(403, f"Host {host[:80]!r} is not one this server answers to (start "
                                "it with --http-allow-host NAME to add one)", code="bad_host")
        # A browser sends Origin with every cross-origin request, preflighted or not (a
        # text/plain POST is not): refusing them all keeps a page from driving the API
        # even where it could not read the answer. Other clients send no Origin.
        if origin and not allowed:
            self.refused["origin"] += 1
            raise ApiError(403, "cross-origin requests are not allowed (start the server "
                                "with --cors-origin ORIGIN to allow one)", code="bad_origin")

    def _host_ok(self, host: str) -> bool:
        name = host.strip().lower()
        if name.startswith("["):                       # [v6]:port
            name = name[1:name.find("]")] if "]" in name else name
        elif name.count(":") == 1:
            name = name.rsplit(":", 1)[0]
        try:
            ipaddress.ip_address(name)
            return True        # an IP literal is never a rebound name
        except ValueError:
            return name in self.hosts


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       guard: HttpGuard, *, first: bool) -> HttpRequest | None:
    """The next request on a connection; None when the peer closed it or went idle."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"),
                                      HEAD_TIMEOUT_S if first else KEEPALIVE_S)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
        return None
    except asyncio.LimitOverrunError:
        raise ApiError(431, "request headers too large") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ApiError(505 if len(parts) == 3 else 400, f"bad request line {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise ApiError(411, "send the body with a Content-Length, not chunked")
    length = headers.get("content-length", "0")
    if not (length.isascii() and length.isdigit()) or len(length) > 12:
        raise ApiError(400, "bad Content-Length")
    size = int(length)
    if size > MAX_BODY_BYTES:
        raise ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    if guard.body_bytes + size > BODY_BUDGET_BYTES:
        raise ApiError(503, "too many request bodies in flight; try again", code="busy")
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    guard.body_bytes += size
    try:
        body = await asyncio.wait_for(reader.readexactly(size), BODY_TIMEOUT_S)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
        return None
    finally:
        guard.body_bytes -= size
    return HttpRequest(parts[0].upper(), parts[1].split("?")[0], headers, body, parts[2])


def parse_json(body: bytes) -> Any:
    """The body as JSON, or ApiError(400): not JSON, or nested past MAX_JSON_DEPTH."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise ApiError(400, "the body nests too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise ApiError(400, f"the body nests deeper than {MAX_JSON_DEPTH}", code="invalid_json")
    return value


def _depth(value: Any) -> int:
    """Nesting depth, without recursion (the value may nest hundreds deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_JSON_DEPTH:
                stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def response_head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
             *(f"{k}: {v}" for k, v in {**(_cors.get() or {}), **headers}.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def send_json(writer: asyncio.StreamWriter, status: int, obj: Any,
                    keep_alive: bool = True) -> None:
    data = json.dumps(obj, ensure_ascii=False).encode()
    writer.write(response_head(status, {
        "Content-Type": "application/json", "Content-Length": str(len(data)),
        "Connection": "keep-alive" if keep_alive else "close"}) + data)
    await writer.drain()


class SseStream:
    """Server-sent events: one HTTP chunk each on HTTP/1.1; on HTTP/1.0 (no chunked
    encoding there) the stream ends when the connection closes."""

    def __init__(self, writer: asyncio.StreamWriter, chunked: bool) -> None:
        self.writer, self.chunked = writer, chunked
        writer.write(response_head(200, {
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            **({"Transfer-Encoding": "chunked"} if chunked else {"Connection": "close"})}))

    async def send(self, obj: Any) -> None:
        data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(
            obj, ensure_ascii=False).encode()) + b"\n\n"
        self.writer.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        await self.writer.drain()

    async def end(self) -> None:
        await self.send(b"[DONE]")
        if self.chunked:
            self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()


def client_gone(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether the client closed its side (FIN) or the connection dropped (RST)."""
    return reader.at_eof() or writer.is_closing()
