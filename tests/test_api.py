"""The OpenAI-compatible API: the official `openai` client against live node processes
(tiny random-weight models), raw HTTP for what a client library hides, and the pure
request/response mapping directly."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
from httputil import raw, wait_http
from meshutil import ROOT, free_port, node_env, peers_of, start_node, stop, wait_for_mesh

from dwarfmesh.ui.api import ApiServer
from dwarfmesh.ui.client import MeshClient, MeshError
from dwarfmesh.ui.openai_compat import (
    ApiError,
    ConversationIndex,
    mesh_info,
    parse_request,
    stop_safe_len,
    usage,
)
from dwarfmesh.wire.protocol import GenParams

pytestmark = pytest.mark.usefixtures("own_model_cache")   # tiny GGUFs' tokenizers

QUESTION = [{"role": "user", "content": "def quicksort(xs):"}]
# The answer token by token (the API's default, auto, writes whole answers and selects one
# where the mesh has two members: test_api_default_is_select)
STREAM = {"mode": "stream"}


# --- pure ---------------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "x"}]}, "messages"),
    ({"messages": QUESTION, "temperature": -1}, "temperature"),
    ({"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
    ({"messages": QUESTION, "top_p": "1"}, "top_p"),
    ({"messages": QUESTION, "stop": [1]}, "stop"),
    ({"messages": QUESTION, "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x" * 200_000}]}, "messages"),
    ({"messages": QUESTION, "speculate": 99}, "speculate"),
    ({"messages": QUESTION, "mode": "vote"}, "mode"),
    ({"messages": QUESTION, "speculate": "yes"}, "speculate"),
    ({"messages": QUESTION, "drafter": "everyone"}, "drafter"),
])
def test_bad_chat_requests_are_400_with_the_param_named(body, param):
    with pytest.raises(ApiError) as err:
        parse_request(body, "chat")
    assert err.value.status == 400
    assert err.value.body()["error"]["param"] == param
    assert err.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.timeout(10)
def test_requests_map_onto_gen_params():
    req = parse_request({"model": "m1", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        *QUESTION], "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3,
        "stop": "\n\n", "stream": True, "stream_options": {"include_usage": True}}, "chat")
    assert req.params == GenParams(max_tokens=7, temperature=0.5, top_p=0.9, seed=3,
                                   stop=["\n\n"])
    assert req.params.mode == "auto"
    assert parse_request({"prompt": "a", "mode": "stream"}, "text").params.mode == "stream"
    assert req.messages[0] == {"role": "system", "content": "be brief"}
    assert (req.model, req.stream, req.include_usage) == ("m1", True, True)
    text = parse_request({"prompt": ["abc"]}, "text")
    assert (text.prompt, text.model, text.params.max_tokens) == ("abc", "dwarfmesh", 512)
    assert text.params.speculate == 0
    assert mesh_info({"leader": "a", "speculate": {"rounds": 3}})["speculate"] == {"rounds": 3}
    assert "speculate" not in mesh_info({"leader": "a"})
    for value, gamma in (("auto", -1), (5, 5), ("off", 0)):
        assert parse_request({"prompt": "a", "speculate": value}, "text").params.speculate \
            == gamma
    assert text.params.drafter == "auto"
    assert parse_request({"prompt": "a", "speculate": 4, "drafter": "member"},
                         "text").params.drafter == "member"


@pytest.mark.timeout(10)
def test_stream_holds_back_what_may_start_a_stop_string():
    assert stop_safe_len("hello wor", ["world"]) == len("hello ")
    assert stop_safe_len("hello", ["xyz"]) == 5
    assert stop_safe_len("ab\n", ["\n\n", "b\nc"]) == 1
    assert stop_safe_len("", ["a"]) == 0


@pytest.mark.timeout(10)
def test_conversation_index_gives_turn_two_the_id_of_turn_one():
    index = ConversationIndex(capacity=2)
    turn1 = ({"role": "system", "content": "s"}, {"role": "user", "content": "hi"})
    first = index.acquire(turn1)
    assert index.acquire(turn1) != first          # the same history while the first answers
    index.release(first, turn1, "hello there ")
    turn2 = (*turn1, {"role": "assistant", "content": "hello there"},
             {"role": "user", "content": "and?"})
    assert index.acquire(turn2) == first          # the re-sent history hits turn one's cache
    index.release(first, turn2, None)             # failed: nothing new remembered
    edited = (*turn1, {"role": "assistant", "content": "edited"}, turn2[-1])
    assert index.acquire(edited) != first
    assert index.acquire(turn1) != first          # a first turn never reuses a conversation


@pytest.mark.timeout(10)
def test_usage_counts_prompt_and_completion_tokens():
    u = usage({"prompt_tokens": 10, "token_ids": [1, 2, 3], "prompt_tokens_reused": 4})
    assert u == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
                 "prompt_tokens_details": {"cached_tokens": 4}}


# --- live ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_mesh(tiny_ggufs_shared, tmp_path_factory):
    """Two nodes (tiny models m1, m2); node0 serves the HTTP API. Yields (base_url, addrs,
    the folder with the nodes' logs)."""
    cache = tmp_path_factory.mktemp("api")
    ports, http_port = [free_port(), free_port()], free_port()
    addrs = [f"127.0.0.1:{p}" for p in ports]
    procs = [start_node(tiny_ggufs_shared[0], "node0", ports[0], cache,
                        extra=["--http-port", str(http_port)]),
             start_node(tiny_ggufs_shared[1], "node1", ports[1], cache, peers=[addrs[0]])]
    try:
        for a in addrs:
            wait_for_mesh(a, 2, procs=procs)
        wait_http(http_port)
        yield f"http://127.0.0.1:{http_port}/v1", addrs, cache
    finally:
        stop(procs)


def client_for(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


def direct(address: str, params: GenParams, *, prompt: str = "", messages=None):
    async def go():
        async with MeshClient(address) as c:
            return await c.generate(prompt, params, messages=messages)
    return asyncio.run(go()).summary


BOTH = ["node0", "node1"]


def with_whole_mesh(run, attempts: int = 3):
    """run() -> (result, the members of each answer it got); run again while a member was
    left out of one. (A member starved of CPU can miss heartbeats and be dropped from an
    answer for a moment; answers fused by different members differ.)"""
    for _ in range(attempts):
        result, memberships = run()
        if all(sorted(m) == BOTH for m in memberships):
            return result
    pytest.fail(f"a member was left out of an answer {attempts} times in a row")


def stream_members(chunks) -> list[str]:
    return next(c.model_extra["dwarfmesh"]["members"] for c in reversed(chunks)
                if c.model_extra and "dwarfmesh" in c.model_extra)


def members(response) -> list[str]:
    return response.model_extra["dwarfmesh"]["members"]


def collect_stream(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join((c.choices[0].delta.content or "") if hasattr(c.choices[0], "delta")
                   else c.choices[0].text for c in chunks if c.choices)
    return text, chunks


@pytest.mark.timeout(120)
def test_models_lists_the_ensemble_and_each_model(api_mesh):
    base, *_ = api_mesh
    models = client_for(base).models.list()
    assert [m.id for m in models.data] == ["dwarfmesh", "m1", "m2"]
    assert client_for(base).models.retrieve("m2").id == "m2"


@pytest.mark.timeout(180)
def test_chat_streamed_and_not_give_the_mesh_greedy_answer(api_mesh):
    base, addrs, _ = api_mesh
    c = client_for(base)

    def run():
        whole = c.chat.completions.create(
            extra_body=STREAM, model="dwarfmesh", messages=QUESTION, max_tokens=24)
        text, chunks = collect_stream(c.chat.completions.create(extra_body=STREAM,
            model="dwarfmesh", messages=QUESTION, max_tokens=24, stream=True,
            stream_options={"include_usage": True}))
        mesh = direct(addrs[1], GenParams(mode="stream", max_tokens=24), messages=QUESTION)
        return (whole, text, chunks, mesh), [members(whole), stream_members(chunks),
                                             mesh["members"]]

    whole, text, chunks, mesh = with_whole_mesh(run)
    assert whole.choices[0].message.content == text == mesh["text"]
    assert whole.choices[0].message.role == "assistant"
    assert len(chunks) > 3                         # it really streamed, piece by piece
    assert whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens == mesh["prompt_tokens"]
    assert whole.usage.completion_tokens == len(mesh["token_ids"])
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    extra = whole.model_extra["dwarfmesh"]
    assert sorted(extra["members"]) == ["node0", "node1"] and extra["leader"] in extra["members"]
    assert set(extra["weights"]) == {"node0", "node1"}
    assert 0.0 <= extra["disagreement_rate"] <= 1.0
    expected = {"eos": "stop", "length": "length"}[mesh["finish_reason"]]
    assert whole.choices[0].finish_reason == expected
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == expected


@pytest.mark.timeout(180)
def test_api_default_is_select(api_mesh):
    """Without a mode the mesh runs auto: two members, so whole answers, one kept; the
    reply says who voted and whose answer won, and is the answer a client gets directly."""
    base, addrs, _ = api_mesh
    c = client_for(base)

    def run():
        whole = c.chat.completions.create(model="dwarfmesh", messages=QUESTION, max_tokens=24)
        text, chunks = collect_stream(c.chat.completions.create(
            model="dwarfmesh", messages=QUESTION, max_tokens=24, stream=True))
        mesh = direct(addrs[1], GenParams(max_tokens=24), messages=QUESTION)
        return (whole, text, mesh), [members(whole), stream_members(chunks), mesh["members"]]

    whole, text, mesh = with_whole_mesh(run)
    extra = whole.model_extra["dwarfmesh"]
    assert extra["mode"] == mesh["mode"] == "select"
    assert set(extra["voted"]) | set(extra["benched"]) == set(BOTH)
    assert extra["select"]["chosen_by"] and set(extra["select"]["chosen_by"]) <= set(BOTH)
    assert whole.choices[0].message.content == text == mesh["text"]


@pytest.mark.timeout(180)
def test_completions_and_stop_strings_agree_streamed_or_not(api_mesh):
    base, addrs, _ = api_mesh
    c = client_for(base)
    prompt = "The quick brown fox jumps over"

    def run():
        full = c.completions.create(
            extra_body=STREAM, model="dwarfmesh", prompt=prompt, max_tokens=30)
        mesh = direct(addrs[0], GenParams(mode="stream", max_tokens=30), prompt=prompt)
        text = full.choices[0].text
        assert len(text) >= 8, text
        stop = text[4:7]
        cut = c.completions.create(
            extra_body=STREAM, model="m1", prompt=prompt, max_tokens=30, stop=[stop])
        streamed, chunks = collect_stream(c.completions.create(extra_body=STREAM,
            model="dwarfmesh", prompt=prompt, max_tokens=30, stop=stop, stream=True))
        return (text, mesh, stop, cut, streamed), [members(full), mesh["members"],
                                                   members(cut), stream_members(chunks)]

    full, mesh, stop, cut, streamed = with_whole_mesh(run)
    assert full == mesh["text"]
    expected = full[: full.index(stop)]
    assert cut.choices[0].text == streamed == expected
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.timeout(180)
def test_second_chat_turn_reuses_the_members_kv_cache(api_mesh):
    base, *_ = api_mesh
    c = client_for(base)
    turn1 = [{"role": "user", "content": "def quicksort(xs): " * 6}]
    first = c.chat.completions.create(
        extra_body=STREAM, model="dwarfmesh", messages=turn1, max_tokens=10)
    turn2 = [*turn1, {"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "The quick brown fox"}]
    second = c.chat.completions.create(
        extra_body=STREAM, model="dwarfmesh", messages=turn2, max_tokens=10)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    reused = second.usage.prompt_tokens_details.cached_tokens
    assert reused >= first.usage.prompt_tokens
    assert second.model_extra["dwarfmesh"]["prompt_tokens_reused"] == reused
    assert second.model_extra["dwarfmesh"]["conversation"] == \
        first.model_extra["dwarfmesh"]["conversation"]


@pytest.mark.timeout(180)
def test_concurrent_requests_each_get_their_answer(api_mesh):
    base, *_ = api_mesh

    def run():
        results: list = [None] * 3

        def ask(i: int) -> None:
            results[i] = client_for(base).chat.completions.create(extra_body=STREAM,
                model="dwarfmesh", messages=QUESTION, max_tokens=16)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert all(results), "a concurrent request got no answer"
        return results, [members(r) for r in results]

    answers = with_whole_mesh(run)
    texts = [r.choices[0].message.content for r in answers]
    assert texts.count(texts[0]) == 3 and len({r.id for r in answers}) == 3


@pytest.mark.timeout(180)
def test_errors_are_openai_style_with_proper_status(api_mesh):
    base, *_ = api_mesh
    port = int(base.rsplit(":", 1)[1].split("/")[0])
    c = client_for(base)
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(extra_body=STREAM, model="gpt-4o", messages=QUESTION)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(extra_body=STREAM, model="dwarfmesh", messages=[])
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(extra_body=STREAM, model="dwarfmesh", prompt="x" * 200_000)
    assert err.value.body["code"] == "context_length_exceeded"
    status, _, body = raw(port, "POST", "/v1/chat/completions", b'{"messages": [',
                          {"Content-Type": "application/json"})
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    status, _, body = raw(port, "GET", "/v1/nothing")
    assert status == 404 and "error" in json.loads(body)
    status, _, _ = raw(port, "GET", "/v1/chat/completions")
    assert status == 405
    # no web origin is allowed by default (--cors-origin allows one; tests/test_hostile.py)
    status, headers, _ = raw(port, "OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    status, headers, _ = raw(port, "OPTIONS", "/v1/chat/completions")
    assert status == 204 and "Access-Control-Allow-Origin" not in headers


@pytest.mark.timeout(180)
def test_keep_alive_and_http10_streams(api_mesh):
    base, *_ = api_mesh
    port = int(base.rsplit(":", 1)[1].split("/")[0])
    body = json.dumps({"prompt": "def quicksort(xs):", "max_tokens": 6}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for _ in range(2):                         # two requests, one connection
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["usage"]["total_tokens"] > 0
            assert resp.getheader("Connection") == "keep-alive"
    finally:
        conn.close()
    stream = json.dumps({"prompt": "def quicksort(xs):", "max_tokens": 6, "stream": True})
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(stream), stream.encode()))
        data = b""
        while chunk := sock.recv(65536):          # HTTP/1.0: the stream ends at close
            data += chunk
    head, _, events = data.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"chunked" not in head.lower()
    assert events.startswith(b"data: {") and events.endswith(b"data: [DONE]\n\n")


@pytest.mark.timeout(180)
def test_a_client_that_goes_away_mid_stream_cancels_its_answer(api_mesh):
    base, addrs, logs = api_mesh
    port = int(base.rsplit(":", 1)[1].split("/")[0])
    # a prompt the mesh does not end early: the answer would run to 8000 tokens (~40 s)
    assert direct(addrs[0], GenParams(
        mode="stream", max_tokens=300), prompt="hello")["finish_reason"] == \
        "length"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({
        "prompt": "hello", "max_tokens": 8000, "stream": True, **STREAM}).encode(),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    assert resp.read(2000)                          # it is streaming
    conn.close()
    end = time.monotonic() + 30
    while time.monotonic() < end:                  # the session ends long before 8000 tokens
        try:
            if not any(n["leader_of"] for a in addrs for n in peers_of(a, timeout=5)):
                break
        except MeshError:                          # a busy node answers late: ask again
            pass
        time.sleep(0.3)
    else:
        raise AssertionError("the answer went on after its HTTP client left")
    log = (logs / "node0.log").read_text()
    assert "went away mid-stream; cancelling" in log, log[-3000:]


@pytest.mark.timeout(180)
def test_serve_command_proxies_a_live_mesh(api_mesh, tmp_path):
    _, addrs, _ = api_mesh
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dwarfmesh", "serve", "--connect", addrs[1],
                             "--http-port", str(port)], env=node_env(tmp_path), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_http(port)
        out = client_for(f"http://127.0.0.1:{port}/v1").chat.completions.create(extra_body=STREAM,
            model="m2", messages=QUESTION, max_tokens=5)
        assert out.usage.completion_tokens >= 1 and out.model == "m2"
    finally:
        stop([proc])
    assert proc.returncode == 0


@pytest.mark.timeout(60)
def test_an_unreachable_mesh_is_503_and_an_api_key_is_checked_first():
    body = json.dumps({"messages": QUESTION}).encode()

    async def go():
        server = ApiServer(f"127.0.0.1:{free_port()}", port=0, api_key="s3cret")  # no node
        port = await server.start()
        try:
            return [await asyncio.to_thread(raw, port, "POST", "/v1/chat/completions", body,
                                            {"Authorization": auth} if auth else {})
                    for auth in ("", "Bearer wrong", "Bearer s3cret")]
        finally:
            await server.close()

    (none, _, none_body), (wrong, _, _), (right, _, right_body) = asyncio.run(go())
    assert none == wrong == 401
    assert json.loads(none_body)["error"]["code"] == "invalid_api_key"
    assert right == 503
    assert json.loads(right_body)["error"]["code"] == "mesh_unavailable"
