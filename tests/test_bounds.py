"""Meaning-level bounds (`bounds.py`), directly: well-formed messages that still say what
the receiving node cannot take are rejected on decode; honest ones pass."""

from __future__ import annotations

import numpy as np
import pytest

from dwarfmesh.wire import bounds
from dwarfmesh.wire import protocol as P

pytestmark = pytest.mark.timeout(30)
LIMITS = bounds.Limits(vocab_size=320, context=256)


def ok(msg, limits=LIMITS):
    return P.decode(P.encode(msg), limits)


def refused(msg, limits=LIMITS, match=None):
    with pytest.raises(P.ProtocolError, match=match):
        P.decode(P.encode(msg), limits)


def hello(**kw):
    fields = dict(node_id="n1", name="a", model="m", fingerprint="f", vocab_size=320,
                  version=1, address="10.0.0.2:5757", weight=1.0, leading=[], peers=[])
    return P.Hello(**{**fields, **kw})


def open_(ids):
    return P.Open("s", "l", "o", ["l"], P.GenParams(), False, np.asarray(ids, np.uint32))


@pytest.mark.parametrize("text, host_optional, good", [
    ("10.0.0.2:5757", False, True), ("host.lan:1", False, True), ("[::1]:80", False, True),
    ("fe80::1:5757", False, True), (":5757", True, True), (":5757", False, False),
    ("127.0.0.1:x", False, False), ("127.0.0.1:0", False, False),
    ("127.0.0.1:65536", False, False), ("127.0.0.1", False, False),
    ("a b:1", False, False), ("h" * 300 + ":1", False, False),
])
def test_addresses_parse_or_are_refused(text, host_optional, good):
    if good:
        bounds.parse_address(text, host_optional=host_optional)
    else:
        with pytest.raises(P.ProtocolError):
            bounds.parse_address(text, host_optional=host_optional)


def test_ids_and_prompts_are_checked_against_the_receiver():
    assert len(ok(open_([1, 319])).prompt_ids) == 2
    refused(open_([1, 2_000_000_000]), match="vocabulary")
    refused(open_([320]), match="vocabulary")
    assert len(ok(open_([1] * 256)).prompt_ids) == 256
    refused(open_([1] * 257), match="context")
    ok(open_([1] * 257), bounds.Limits())          # a client knows no model: no check
    refused(P.Token("s", 0, 320, 0, "", False))
    frame = P.Frame("s", 0, "n", 0, 0.1, None, 320, None, 1.0, np.array([1], np.uint32),
                    np.array([-1.0], np.float16))
    refused(frame, match="last_token")
    # a member asked to draft itself is given no draft, and drafts at most MAX_DRAFT
    ok(P.Tokens("s", 4, 0, ["a"], False, 0, np.array([17], np.uint32),
                np.zeros(0, np.uint32), 4))
    refused(P.Tokens("s", 4, 0, ["a"], False, 0, np.array([17], np.uint32),
                     np.array([18], np.uint32), 4), match="self_draft")
    refused(P.Tokens("s", 4, 0, ["a"], False, 0, np.array([17], np.uint32),
                     np.zeros(0, np.uint32), 17), match="self_draft")


def test_hellos_are_bounded():
    ok(hello(address=":5757", peers=[":1", "10.0.0.3:5757"]))
    refused(hello(peers=["127.0.0.1:x"]))
    refused(hello(peers=[f"10.0.0.{i % 250}:{i + 1}" for i in range(bounds.MAX_GOSSIP + 1)]))
    refused(hello(name="n" * 65))
    refused(hello(name="evil\n2026-12-01 INFO forged"))
    refused(hello(address="h" * 1000 + ":1"))
    refused(hello(weight=0.0))
    refused(hello(vocab_size=1 << 30))


def test_log_probabilities_and_nlls_have_their_signs():
    ids, lps = np.array([1], np.uint32), np.array([-1.0], np.float16)
    base = dict(session="s", step=1, sender="n", prefix_hash=0, rest_mass=0.1,
                prev_logp=-0.5, last_token=3, prompt_nll=None, forward_ms=1.0, ids=ids,
                logprobs=lps)
    ok(P.Frame(**base))
    ok(P.Frame(**{**base, "prev_logp": 1e-5, "prompt_nll": -1e-5}))     # float rounding
    refused(P.Frame(**{**base, "prev_logp": 3e38}))
    refused(P.Frame(**{**base, "prompt_nll": -3e38}))
    refused(P.Proposal("s", 0, "n", 0, " x", False, 0, -1.0, 1.0))
    text = dict(session="s", step=1, sender="n", text_hash=0, rest_mass=0.1, eos_logp=-2.0,
                prev_logp=9.0, prompt_nll=None, forward_ms=1.0, texts=["a"],
                logprobs=np.array([-1.0], np.float16))
    ok(P.TextFrame(**text))            # a re-encoded piece can gain (see TEXT_LOGP_SLACK)
    refused(P.TextFrame(**{**text, "prev_logp": 3e38}))


def test_candidates_are_bounded_in_count_and_bytes():
    ok(P.Candidates("s", 0, [" the quick", " brown"], [False, True]))
    refused(P.Candidates("s", 0, [" the" * 600] * 48, [False] * 48))    # was 3.2 GB
    refused(P.Candidates("s", 0, [" x"] * (bounds.MAX_CANDIDATES + 1),
                         [False] * (bounds.MAX_CANDIDATES + 1)))
    side = bounds.SCORE_BYTES // 4
    ok(P.Candidates("s", 0, ["a" * side] * 4, [False] * 4))
    refused(P.Candidates("s", 0, ["a" * side] * 5, [False] * 5), match="bytes")
    refused(P.Candidates("s", 0, ["a" * (bounds.ANSWER_BYTES + 1)], [False]), match="bytes")
    refused(P.Candidates("s", 0, ["a"], []))
    refused(P.Commit("s", 0, "x" * (bounds.ANSWER_BYTES + 1), 0, False, 12))


def test_generation_params_and_text_prompts_are_bounded():
    gen = P.Generate("r", "p", P.GenParams(max_tokens=8192), [], "")
    ok(gen)
    with pytest.raises(P.ProtocolError, match="max_tokens"):
        P.GenParams(max_tokens=8193).check()
    with pytest.raises(P.ProtocolError, match="stop"):
        P.GenParams(stop=["x" * 257]).check()
    with pytest.raises(P.ProtocolError, match="stop"):
        P.GenParams(stop=["x"] * 17).check()
    with pytest.raises(P.ProtocolError, match="drafter"):
        P.GenParams(drafter="everyone").check()
    refused(P.Generate("r", "p" * (bounds.MAX_PROMPT_CHARS + 1), P.GenParams(), [], ""),
            bounds.Limits())
    refused(P.Generate("r", "p" * (8 * 256 + 1), P.GenParams(), [], ""), match="context")
