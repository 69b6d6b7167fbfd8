"""Well-formed protocol messages for the codec tests: `SAMPLES`, messages of fifteen
types (Hello to Error; not the text-session ones nor Deposed) with fields set to values a
real node sends, and `frame(k=..., **fields)`, a Frame with a k-entry top-k (float16
log-probs) whose fields can be overridden. Tests round-trip them, mutate their encodings,
and seed fuzzers with them.
"""

import numpy as np

from dwarfmesh import protocol as P


def frame(k=64, **kw):
    ids = np.arange(k, dtype=np.uint32) * 7
    lps = np.linspace(-0.1, -9.0, k).astype(np.float16)
    fields = dict(session="s1", step=3, sender="n1", prefix_hash=2**64 - 5, rest_mass=0.12,
                  prev_logp=-1.5, last_token=9, prompt_nll=None, forward_ms=12.5, ids=ids,
                  logprobs=lps)
    fields.update(kw)
    return P.Frame(**fields)


SAMPLES = [
    P.Hello("n1", "mac-1", "qwen2.5-coder-1.5b", "abcd", 151936, 1, "10.0.0.2:5757", 1.0, ["s"],
            ["10.0.0.3:5757"]),
    P.Refuse("n1", "version mismatch"),
    P.Start("s1", "n2", "def f(x):", P.GenParams(max_tokens=5, stop=["\n\n"], seed=3),
            [{"role": "user", "content": "hi"}], True),
    P.Open("s1", "n1", "n2", ["n1", "n2"], P.GenParams(), True,
           np.array([1, 2, 3], dtype=np.uint32)),
    P.Resume("s1", "n2", 7),
    P.Attach("s1", "n3", 5),
    frame(),
    P.Token("s1", 4, 17, 123456789, "lo", False),
    P.End("s1", "eos", {"text": "hi", "steps": 2, "nested": {"a": [1, 2]}}),
    P.Leave("s1", "n3", "busy"),
    P.PeersRequest("r1"),
    P.PeersReply("r1", [{"name": "a", "leader_of": []}]),
    P.Generate("r1", "hello", P.GenParams(), [], ""),
    P.Cancel("r1"),
    P.Error("r1", "no members"),
]
