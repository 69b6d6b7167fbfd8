"""OpenAI-compatible HTTP API in front of the mesh: /v1/models, /v1/chat/completions,
/v1/completions, streamed (SSE) or not.

Owns: the server (asyncio streams; the HTTP/1.1 layer and its guards against browsers
and strangers are `http11.py`) and the life of one API request: ask the mesh who is
there, check the model, run the answer, stream or return it, and cancel it when its
client goes away (streamed or not). The OpenAI
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
import logging
import time
import uuid
from typing import Any

from dwarfmesh.ui.client import MeshClient, MeshError
from dwarfmesh.ui.http11 import (
    HttpGuard,
    HttpRequest,
    SseStream,
    client_gone,
    parse_json,
    read_request,
    response_head,
    send_json,
)
from dwarfmesh.ui.openai_compat import (
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
from dwarfmesh.wire.security import MeshKey

log = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = 8000
PEERS_TIMEOUT_S = 5.0              # no answer from the node this long: 503
DISCONNECT_POLL_S = 0.25           # how often a non-streaming request checks its client


# --- the server --------------------------------------------------------------------------


class ApiServer:
    """Serves the OpenAI API for the mesh reached at `mesh_address` (a node's HOST:PORT).

    `key`: the mesh key its clients present to the node (None: an open mesh). `api_key`:
    when set, every request must carry `Authorization: Bearer <api_key>` (else 401).
    `cors_origins`: web origins allowed to call it (none by default); `allow_hosts`: names
    a `Host` header may carry besides IP addresses, localhost and `host` (http11.HttpGuard).
    """

    def __init__(self, mesh_address: str, *, key: MeshKey | None = None,
                 host: str = "127.0.0.1", port: int = DEFAULT_HTTP_PORT,
                 api_key: str | None = None, cors_origins: list[str] | None = None,
                 allow_hosts: list[str] | None = None) -> None:
        self.mesh_address, self.host, self.port = mesh_address, host, port
        self.key, self.api_key = key, api_key
        self.guard = HttpGuard(bind_host=host, cors_origins=cors_origins,
                               allow_hosts=allow_hosts)
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
        peer = writer.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else ""
        if not self.guard.admit(ip):
            with contextlib.suppress(ConnectionError):
                await send_json(writer, 503, ApiError(503, "too many connections",
                                                      code="busy").body(), keep_alive=False)
            writer.close()
            return
        self._writers.add(writer)
        try:
            first = True
            while True:
                try:
                    req = await read_request(reader, writer, self.guard, first=first)
                except ApiError as exc:
                    await send_json(writer, exc.status, exc.body(), keep_alive=False)
                    return
                first = False
                if (req is None or not await self._respond(req, reader, writer)
                        or not req.keep_alive):
                    return
        except ConnectionError:
            pass
        finally:
            self.guard.release(ip)
            self._writers.discard(writer)
            writer.close()

    async def _respond(self, req: HttpRequest, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must close afterwards."""
        path = req.path.rstrip("/")
        path = path.removeprefix("/v1")
        try:
            self.guard.check(req)
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
            return await self._generate(parse_request(
                parse_json(req.body), "chat" if path == "/chat/completions" else "text"),
                req, reader, writer)
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
                        reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
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
                reply, keep = await self._complete(req, reader, writer, conv,
                                                   http.keep_alive)
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

    async def _complete(self, req: GenRequest, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, conv: str,
                        keep_alive: bool) -> tuple[str | None, bool]:
        """The whole answer in one response; the mesh stops if the client leaves first."""
        rid, created = _response_id(req), int(time.time())
        cancel = asyncio.Event()
        async with MeshClient(self.mesh_address, self.key) as client:
            task = asyncio.create_task(self._run(client, req, conv, cancel=cancel))
            try:
                while not task.done():
                    await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
                    if not task.done() and client_gone(reader, writer):
                        log.info("HTTP client went away before its answer; cancelling %s", rid)
                        cancel.set()
                        with contextlib.suppress(ApiError):
                            await task
                        return None, False
                result = task.result()
            finally:
                if not task.done():
                    cancel.set()
                    with contextlib.suppress(ApiError, asyncio.CancelledError):
                        await task
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
                key: MeshKey | None = None, api_key: str | None = None,
                cors_origins: list[str] | None = None,
                allow_hosts: list[str] | None = None) -> None:
    """Run the API until `stopped` is set (the `serve` command)."""
    server = ApiServer(mesh_address, key=key, host=host, port=port, api_key=api_key,
                       cors_origins=cors_origins, allow_hosts=allow_hosts)
    await server.start()
    try:
        await stopped.wait()
    finally:
        await server.close()
