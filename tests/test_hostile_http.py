"""Hostile HTTP: what a web page in the user's browser, or a stranger reaching the API,
can do to a node's OpenAI-compatible API, against a real node process; and the guards'
allow-lists on an in-process server."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from httputil import raw, wait_http
from meshutil import free_port, peers_of, start_node, stop, wait_for_mesh
from stranger import closed_by_server, idle_connections, open_fds, rss_mb

from dwarfmesh.ui.api import ApiServer
from dwarfmesh.ui.http11 import BODY_BUDGET_BYTES, HEAD_TIMEOUT_S, MAX_BODY_BYTES

pytestmark = pytest.mark.usefixtures("own_model_cache")   # tiny GGUFs' tokenizers

CHAT = "/v1/chat/completions"
QUESTION = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def api_node(tiny_ggufs_shared, tmp_path_factory):
    """One node (tiny model) serving the API. Yields (http port, mesh address, process,
    the folder with its log)."""
    cache = tmp_path_factory.mktemp("hostile-http")
    port, http_port = free_port(), free_port()
    proc = start_node(tiny_ggufs_shared[0], "node0", port, cache,
                      extra=["--http-port", str(http_port)])
    try:
        wait_for_mesh(f"127.0.0.1:{port}", 1, procs=[proc])
        wait_http(http_port)
        yield http_port, f"127.0.0.1:{port}", proc, cache
    finally:
        stop([proc])


def send_raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes on a fresh connection; return what comes back until close or timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and b"Content-Length: " in out:
                    head, _, body = out.partition(b"\r\n\r\n")
                    n = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                    if len(body) >= n:
                        break
        except TimeoutError:
            pass
    return out


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


@pytest.mark.timeout(120)
def test_a_web_page_can_neither_read_nor_drive_the_api(api_node):
    port, *_ = api_node
    evil = {"Origin": "http://evil.example"}
    status, headers, _ = raw(port, "OPTIONS", CHAT,
                             headers={**evil, "Access-Control-Request-Method": "POST"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    # a "simple" cross-origin POST needs no preflight: it must be refused all the same
    status, headers, _ = raw(port, "POST", CHAT, json.dumps(QUESTION).encode(),
                             {**evil, "Content-Type": "text/plain"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    # DNS rebinding: evil.example resolving to 127.0.0.1
    status, _, body = raw(port, "POST", CHAT, json.dumps(QUESTION).encode(),
                          {"Host": "evil.example", "Content-Type": "application/json"})
    assert status == 403 and json.loads(body)["error"]["code"] == "bad_host"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        status, _, _ = raw(port, "GET", "/v1/models", headers={"Host": host})
        assert status == 200, host


@pytest.mark.timeout(60)
def test_allowed_origins_and_host_names_are_opt_in():
    async def go():
        server = ApiServer(f"127.0.0.1:{free_port()}", port=0,   # no node behind it: 503
                           cors_origins=["http://ok.example"], allow_hosts=["mybox.lan"])
        port = await server.start()
        try:
            return port, [await asyncio.to_thread(raw, port, *args) for args in (
                ("OPTIONS", CHAT, None, {"Origin": "http://ok.example"}),
                ("OPTIONS", CHAT, None, {"Origin": "http://other.example"}),
                ("GET", "/v1/models", None, {"Host": "mybox.lan:8000"}),
                ("GET", "/v1/models", None, {"Host": "other.lan"}))]
        finally:
            await server.close()

    _, (ok, other, named, unnamed) = asyncio.run(go())
    assert ok[0] == 204 and ok[1]["Access-Control-Allow-Origin"] == "http://ok.example"
    assert other[0] == 403 and "Access-Control-Allow-Origin" not in other[1]
    assert named[0] == 503 and unnamed[0] == 403


@pytest.mark.timeout(120)
def test_malformed_requests_are_4xx_never_500_or_a_hang(api_node):
    port, *_ = api_node
    head = b"POST " + CHAT.encode() + b" HTTP/1.1\r\nContent-Type: application/json\r\n"

    def post(body: bytes, length: bytes | None = None) -> int:
        n = str(len(body)).encode() if length is None else length
        return status_of(send_raw(port, head + b"Content-Length: " + n + b"\r\n\r\n" + body))

    def with_stop(stop) -> bytes:
        return json.dumps({**QUESTION, "stop": stop}).encode()

    t0 = time.monotonic()
    assert post(b"[" * 100_000) == 400                       # was a 500 (RecursionError)
    assert post(b"{}", "²".encode()) == 400                  # was an unhandled exception
    assert post(b"{}", b"1e3") == 400
    assert status_of(send_raw(port, head + b"Content-Length: %d\r\n\r\n" % (8 << 20))) == 413
    too_big = len(with_stop(["x" * 300_000] * 16))           # answered from the head alone
    assert status_of(send_raw(port, head + b"Content-Length: %d\r\n\r\n" % too_big)) == 413
    assert post(with_stop(["x" * 300] * 16)) == 400           # a stop string too long
    assert post(with_stop(["x"] * 17)) == 400                 # too many stop strings
    assert status_of(send_raw(port, head + b"Transfer-Encoding: chunked\r\n\r\n")) == 411
    assert time.monotonic() - t0 < 30
    status, _, _ = raw(port, "GET", "/v1/models")
    assert status == 200


@pytest.mark.timeout(180)
def test_held_bodies_and_idle_connections_are_bounded(api_node):
    port, _, proc, _ = api_node
    rss0, fds0 = rss_mb(proc.pid), open_fds(proc.pid)
    # 100 connections that each announce a large body and hold it, almost all sent
    size = MAX_BODY_BYTES
    held, statuses = [], []
    for _ in range(100):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size)
        try:
            s.sendall(b" " * (size - 1))
        except OSError:                  # refused (503) and closed while we were sending
            pass
        held.append(s)
    time.sleep(1)
    rss_held = rss_mb(proc.pid)
    for s in held:                       # still open: its body is being read
        s.setblocking(False)
        try:
            statuses.append(status_of(s.recv(4096)))      # refused: 503, then closed
        except BlockingIOError:
            statuses.append(0)
        except OSError:                  # closed with our bytes unread: a reset
            statuses.append(503)
        s.close()
    accepted = statuses.count(0)
    assert accepted <= BODY_BUDGET_BYTES // size and statuses.count(503) == 100 - accepted
    assert rss_held - rss0 < 2 * BODY_BUDGET_BYTES / 2**20 + 50, (rss0, rss_held)
    # 2,100 idle connections: over the cap they are answered 503 and closed at once, the
    # rest after the head timeout; then the API answers again
    socks = idle_connections(port, 2100)
    try:
        time.sleep(1)
        rss_idle = rss_mb(proc.pid)
        assert closed_by_server(socks) >= 2100 - 128
        time.sleep(HEAD_TIMEOUT_S + 2)
        assert closed_by_server(socks) == 2100
    finally:
        for s in socks:
            s.close()
    status, _, _ = raw(port, "GET", "/v1/models")
    assert status == 200
    rss1 = rss_mb(proc.pid)
    print(f"\nFIGURE node RSS MB: before {rss0:.0f}, 100 held bodies {rss_held:.0f}, "
          f"2100 idle {rss_idle:.0f}, after {rss1:.0f}; fds before {fds0}, "
          f"after {open_fds(proc.pid)}")
    assert rss1 - rss0 < 100 and open_fds(proc.pid) - fds0 < 50


@pytest.mark.timeout(180)
def test_a_non_streaming_client_that_leaves_cancels_its_answer(api_node):
    port, address, _, logs = api_node
    body = json.dumps({"prompt": "hello", "max_tokens": 8000}).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    end = time.monotonic() + 20
    while not any(n["leader_of"] for n in peers_of(address, timeout=5)):
        assert time.monotonic() < end, "the answer never started"
        time.sleep(0.1)
    s.close()
    end = time.monotonic() + 30
    while any(n["leader_of"] for n in peers_of(address, timeout=5)):
        assert time.monotonic() < end, "the answer went on after its HTTP client left"
        time.sleep(0.3)
    assert "went away before its answer; cancelling" in (logs / "node0.log").read_text()
