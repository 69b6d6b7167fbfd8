"""Well-formed protocol messages for the codec tests: `SAMPLES`, messages of seventeen
types (Hello to Error, and a speculative round's Tokens and DraftFrame; not the
text-session ones nor Deposed) with fields set to values a real node sends, and
`frame(k=..., **fields)`, a Frame with a k-entry top-k (float16 log-probs) whose fields
can be overridden. Tests round-trip them, mutate their encodings, and seed fuzzers with
them.
"""

import dataclasses

import numpy as np

from dwarfmesh.wire import protocol as P


def frame(k=64, **kw):
    ids = np.arange(k, dtype=np.uint32) * 7
    lps = np.linspace(-0.1, -9.0, k).astype(np.float16)
    fields = dict(session="s1", step=3, sender="n1", prefix_hash=2**64 - 5, rest_mass=0.12,
                  prev_logp=-1.5, last_token=9, prompt_nll=None, forward_ms=12.5, ids=ids,
                  logprobs=lps)
    fields.update(kw)
    return P.Frame(**fields)


def draft_frame(k=16, n=3):
    """A DraftFrame: a k-entry frame, then n drafted positions."""
    base = frame(k=k)
    return P.DraftFrame(
        **{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
        draft=np.arange(n, dtype=np.uint32) + 40,
        draft_logp=np.linspace(-0.2, -2.0, n).astype(np.float32),
        more_rest=np.full(n, 0.1, dtype=np.float32),
        more_ids=np.tile(base.ids, n), more_logprobs=np.tile(base.logprobs, n),
        round_ids=np.array([9], dtype=np.uint32))


SAMPLES = [
    P.Hello("n1", "mac-1", "qwen2.5-coder-1.5b", "abcd", 151936, 1, "10.0.0.2:5757", 1.0, ["s"],
            ["10.0.0.3:5757"]),
    P.Refuse("n1", "version mismatch"),
    P.Start("s1", "n2", "def f(x):", P.GenParams(
        mode="stream", max_tokens=5, stop=["\n\n"], seed=3),
            [{"role": "user", "content": "hi"}], True),
    P.Open("s1", "n1", "n2", ["n1", "n2"], P.GenParams(mode="stream"), True,
           np.array([1, 2, 3], dtype=np.uint32)),
    P.Resume("s1", "n2", 7),
    P.Attach("s1", "n3", 5),
    frame(),
    P.Token("s1", 4, 17, 123456789, "lo", False),
    P.Tokens("s1", 4, 123456789, ["lo", "op"], False, 0, np.array([17, 18], dtype=np.uint32),
             np.array([19, 20, 21], dtype=np.uint32)),
    P.Tokens("s1", 4, 123456789, ["lo"], False, 2, np.array([17], dtype=np.uint32),
             np.zeros(0, dtype=np.uint32), 5),
    draft_frame(),
    P.End("s1", "eos", {"text": "hi", "steps": 2, "nested": {"a": [1, 2]}}),
    P.Leave("s1", "n3", "busy"),
    P.PeersRequest("r1"),
    P.PeersReply("r1", [{"name": "a", "leader_of": []}]),
    P.Generate("r1", "hello", P.GenParams(mode="stream"), [], ""),
    P.Cancel("r1"),
    P.Error("r1", "no members"),
]
