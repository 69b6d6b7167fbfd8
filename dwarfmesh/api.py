"""OpenAI-compatible HTTP API in front of the mesh: /v1/models, /v1/chat/completions,
/v1/completions, streamed (SSE) or not.

Owns: a small HTTP/1.1 server on asyncio streams (Content-Length request bodies,
keep-alive, chunked SSE responses, CORS preflight) and the life of one API request: ask
the mesh who is there, check the model, run the answer, stream or return it. The OpenAI
shapes themselves (request validation, bodies, errors, conversation ids) are pure
functions in `openai_compat.py`. It talks to the mesh only through `client.MeshClient`
(one per request: a client is one DEALER, one request at a time), so it runs inside a node
(`node --http-port`) or standalone (`serve`). It knows nothing of models or tokenizers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from dwarfmesh.client import MeshClient, MeshError
from dwarfmesh.openai_compat import (
    ENSEMBLE_ID,
    FINISH,
    ApiError,
    ConversationIndex,
    GenRequest,
    chunk_body,
    completion_body,
    mesh_error,
    mesh_info,
    model_ids,
    parse_request,
    stop_safe_len,
    usage,
)
from dwarfmesh.security import MeshKey

log = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = 8000
MAX_BODY_BYTES = 8 << 20
KEEPALIVE_S = 75.0                 # an idle keep-alive connection is closed after this
BODY_TIMEOUT_S = 30.0
PEERS_TIMEOUT_S = 5.0              # no answer from the node this long: 503
CORS = {"Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": "Authorization, Content-Type",
        "Access-Control-Max-Age": "86400"}
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
           404: "Not Found",
           405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable", 505: "HTTP Version Not Supported"}


# --- HTTP/1.1 ----------------------------------------------------------------------------


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


async def read_request(reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> HttpRequest | None:
    """The next request on a connection; None when the peer closed it or went idle."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), KEEPALIVE_S)
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
    if not length.isdigit():
        raise ApiError(400, "bad Content-Length")
    if int(length) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    try:
        body = await asyncio.wait_for(reader.readexactly(int(length)), BODY_TIMEOUT_S)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError):
        return None
    return HttpRequest(parts[0].upper(), parts[1].split("?")[0], headers, body, parts[2])


def response_head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
             *(f"{k}: {v}" for k, v in {**CORS, **headers}.items())]
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


# --- the server --------------------------------------------------------------------------


class ApiServer:
    """Serves the OpenAI API for the mesh reached at `mesh_address` (a node's HOST:PORT).

    `key`: the mesh key its clients present to the node (None: an open mesh). `api_key`:
    when set, every request must carry `Authorization: Bearer <api_key>` (else 401).
    """

    def __init__(self, mesh_address: str, *, key: MeshKey | None = None,
                 host: str = "127.0.0.1", port: int = DEFAULT_HTTP_PORT,
                 api_key: str | None = None) -> None:
        self.mesh_address, self.host, self.port = mesh_address, host, port
        self.key, self.api_key = key, api_key
        self.conversations = ConversationIndex()
        self.started = int(time.time())
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        """Bind (port 0 picks a free one) and return the bound port."""
        self._server = await asyncio.start_server(self._connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("OpenAI-compatible API on http://%s:%d/v1 (mesh via %s)",
                 self.host, self.port, self.mesh_address)
        if not self.api_key and not _loopback(self.host):
            log.warning("the HTTP API on %s is open to anyone who can reach it, whatever the "
                        "mesh key; set --api-key (or $DWARFMESH_API_KEY) to require one",
                        self.host)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    req = await read_request(reader, writer)
                except ApiError as exc:
                    await send_json(writer, exc.status, exc.body(), keep_alive=False)
                    return
                if req is None or not await self._respond(req, writer) or not req.keep_alive:
                    return
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _respond(self, req: HttpRequest, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must close afterwards."""
        path = req.path.rstrip("/")
        path = path.removeprefix("/v1")
        try:
            if req.method == "OPTIONS":
                writer.write(response_head(204, {"Content-Length": "0"}))
                await writer.drain()
                return True
            routes = {"/models": "GET", "/chat/completions": "POST", "/completions": "POST",
                      "/health": "GET"}
            if path.startswith("/models/"):
                routes[path] = "GET"
            if self.api_key and not hmac.compare_digest(
                    req.headers.get("authorization", "").encode(),
                    f"Bearer {self.api_key}".encode()):
                raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY",
                               code="invalid_api_key")
            if path not in routes:
                raise ApiError(404, f"no such endpoint: {req.method} {req.path}",
                               code="unknown_url")
            if req.method != routes[path]:
                raise ApiError(405, f"{req.path} takes {routes[path]}", code="method_not_allowed")
            if req.method == "GET":
                await send_json(writer, 200, await self._models(path), req.keep_alive)
                return True
            try:
                body = json.loads(req.body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ApiError(400, f"the body is not valid JSON: {exc}",
                               code="invalid_json") from None
            return await self._generate(parse_request(
                body, "chat" if path == "/chat/completions" else "text"), req, writer)
        except ApiError as exc:
            await send_json(writer, exc.status, exc.body(), req.keep_alive)
            return True
        except ConnectionError:
            raise
        except Exception:
            log.exception("HTTP %s %s failed", req.method, req.path)
            await send_json(writer, 500, ApiError(500, "internal error").body(), False)
            return False

    async def _peers(self) -> list[dict[str, Any]]:
        async with MeshClient(self.mesh_address, self.key) as client:
            try:
                return await client.peers(timeout=PEERS_TIMEOUT_S)
            except MeshError as exc:
                raise mesh_error(exc) from None

    async def _models(self, path: str) -> dict[str, Any]:
        nodes = await self._peers()
        if path == "/health":
            return {"status": "ok", "nodes": len(nodes)}
        data = []
        for mid in model_ids(nodes):
            names = [n["name"] for n in nodes if mid in (ENSEMBLE_ID, n["model"])]
            data.append({"id": mid, "object": "model", "created": self.started,
                         "owned_by": ENSEMBLE_ID, ENSEMBLE_ID: {"nodes": names}})
        if path.startswith("/models/"):
            found = [m for m in data if m["id"] == path[len("/models/"):]]
            if not found:
                raise ApiError(404, f"the model {path[8:]!r} does not exist", param="model",
                               code="model_not_found")
            return found[0]
        return {"object": "list", "data": data}

    async def _generate(self, req: GenRequest, http: HttpRequest,
                        writer: asyncio.StreamWriter) -> bool:
        ids = model_ids(await self._peers())
        if req.model not in ids:
            raise ApiError(404, f"the model {req.model!r} does not exist; this mesh serves "
                                f"{', '.join(ids)}", param="model", code="model_not_found")
        conv = self.conversations.acquire(req.messages) if req.kind == "chat" else ""
        reply: str | None = None
        try:
            if req.stream:
                reply, keep = await self._stream(req, writer, conv,
                                                 chunked=http.version != "HTTP/1.0")
            else:
                reply, keep = await self._complete(req, writer, conv, http.keep_alive)
        finally:
            if conv:
                self.conversations.release(conv, req.messages, reply)
        return keep

    async def _run(self, client: MeshClient, req: GenRequest, conv: str, on_text=None,
                   cancel: asyncio.Event | None = None):
        try:
            return await client.generate(req.prompt, req.params, on_text, cancel,
                                         messages=list(req.messages), conversation=conv)
        except MeshError as exc:
            raise mesh_error(exc) from None

    async def _complete(self, req: GenRequest, writer: asyncio.StreamWriter, conv: str,
                        keep_alive: bool) -> tuple[str, bool]:
        rid, created = _response_id(req), int(time.time())
        async with MeshClient(self.mesh_address, self.key) as client:
            result = await self._run(client, req, conv)
        await send_json(writer, 200, completion_body(req, rid, created, result.text,
                                                     result.summary, conv), keep_alive)
        return result.text, keep_alive

    async def _stream(self, req: GenRequest, writer: asyncio.StreamWriter, conv: str,
                      chunked: bool) -> tuple[str | None, bool]:
        """SSE: an event per piece of text, held back while it may be the start of a stop
        string (the mesh cuts a stop string out of the answer, so it is never sent)."""
        rid, created = _response_id(req), int(time.time())
        sse = SseStream(writer, chunked)
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        cancel = asyncio.Event()
        text, sent = "", 0
        client = MeshClient(self.mesh_address, self.key)

        async def produce():
            try:
                return await self._run(client, req, conv, queue.put_nowait, cancel)
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(produce())
        try:
            await sse.send(chunk_body(req, rid, created, "", first=True))
            while (piece := await queue.get()) is not None:
                text += piece
                safe = stop_safe_len(text, req.params.stop)
                if safe > sent:
                    await sse.send(chunk_body(req, rid, created, text[sent:safe]))
                    sent = safe
            try:
                result = await task
            except ApiError as exc:
                await sse.send(exc.body())
                await sse.end()
                return None, chunked
            final, summary = result.text, result.summary
            if not final.startswith(text[:sent]):
                log.warning("streamed text is not a prefix of the answer; ending the stream")
            rest = final[sent:] if final.startswith(text[:sent]) else ""
            last = chunk_body(req, rid, created, rest, FINISH.get(summary.get("finish_reason",
                                                                              ""), "stop"))
            last[ENSEMBLE_ID] = mesh_info(summary, conv)
            await sse.send(last)
            if req.include_usage:
                await sse.send({**chunk_body(req, rid, created, None), "choices": [],
                                          "usage": usage(summary)})
            await sse.end()
            return final, chunked
        except ConnectionError:
            log.info("HTTP client went away mid-stream; cancelling %s", rid)
            cancel.set()
            with contextlib.suppress(ApiError):
                await task
            return None, False
        finally:
            if not task.done():
                cancel.set()
                with contextlib.suppress(ApiError, asyncio.CancelledError):
                    await task
            client.close()


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _response_id(req: GenRequest) -> str:
    return ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


async def serve(mesh_address: str, host: str, port: int, stopped: asyncio.Event, *,
                key: MeshKey | None = None, api_key: str | None = None) -> None:
    """Run the API until `stopped` is set (the `serve` command)."""
    server = ApiServer(mesh_address, key=key, host=host, port=port, api_key=api_key)
    await server.start()
    try:
        await stopped.wait()
    finally:
        await server.close()
