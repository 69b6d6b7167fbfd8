"""Plain HTTP against a node's API on 127.0.0.1, below any client library: `raw(port,
method, path, body, headers)` makes one request on a fresh connection and returns (status,
headers, body); `wait_http(port)` waits until the API answers /health with 200.
"""

from __future__ import annotations

import http.client
import time


def wait_http(port: int, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if raw(port, "GET", "/health")[0] == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"no HTTP API on port {port} within {deadline_s}s")


def raw(port: int, method: str, path: str, body: bytes | None = None,
        headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()
