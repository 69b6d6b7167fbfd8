"""Fuzzing the frame decoder: hundreds of thousands of mutated frames, zero crashes.

Every input must either decode into a valid message or raise ProtocolError; nothing else
(no IndexError, no UnicodeDecodeError, no numpy error) may escape `protocol.decode`.
"""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from samples import SAMPLES

from dwarfmesh.wire import protocol as P

MUTATED_FRAMES = 200_000


def _mutate(rng: np.random.Generator, parts: list[bytes]) -> list[bytes]:
    parts = [bytearray(p) for p in parts]
    kind = int(rng.integers(6))
    i = int(rng.integers(len(parts)))
    if kind == 0 and parts[i]:                       # flip bytes
        for _ in range(int(rng.integers(1, 4))):
            parts[i][int(rng.integers(len(parts[i])))] = int(rng.integers(256))
    elif kind == 1:                                  # truncate a frame
        parts[i] = parts[i][: int(rng.integers(len(parts[i]) + 1))]
    elif kind == 2:                                  # extend a frame with junk
        parts[i] += rng.bytes(int(rng.integers(1, 64)))
    elif kind == 3:                                  # drop or duplicate a frame
        if rng.random() < 0.5 and len(parts) > 1:
            del parts[i]
        else:
            parts.insert(i, parts[i])
    elif kind == 4:                                  # replace the header with random msgpack
        values = [None, True, -1, 2**63 - 1, 1.5, float("nan"), "x" * 3, b"\x00", [], {}]
        value = values[int(rng.integers(len(values)))]
        parts[2] = bytearray(msgpack.packb([value] * int(rng.integers(0, 14))))
    else:                                            # random bytes everywhere
        parts = [bytearray(rng.bytes(int(rng.integers(0, 40)))) for _ in parts]
    return [bytes(p) for p in parts]


@pytest.mark.timeout(300)
def test_six_figure_mutated_frames_never_crash_the_decoder():
    rng = np.random.default_rng(20261123)
    seeds = [[bytes(p) for p in P.encode(m)] for m in SAMPLES]
    outcomes = {"ok": 0, "rejected": 0}
    t0 = time.monotonic()
    for n in range(MUTATED_FRAMES):
        parts = _mutate(rng, seeds[n % len(seeds)])
        try:
            msg = P.decode(parts)
        except P.ProtocolError:
            outcomes["rejected"] += 1
            continue
        outcomes["ok"] += 1
        assert type(msg) in P.MESSAGES
        P.decode(P.encode(msg))                      # whatever decodes, re-encodes
    assert outcomes["rejected"] > MUTATED_FRAMES // 2
    assert time.monotonic() - t0 < 280


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=4), inner,
                                                               max_size=4),
    max_leaves=20)


# Half the tags are real messages' (their decoders are what garbage must not get past), the
# rest any byte: an unknown tag is refused before anything else is read.
tags = st.one_of(st.sampled_from(sorted(cls.TAG for cls in P.MESSAGES)), st.integers(0, 255))


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)
@given(tag=tags, header=st.lists(json_values, max_size=14),
       arrays=st.lists(st.binary(max_size=300), max_size=3))
def test_structured_garbage_is_rejected_cleanly(tag, header, arrays):
    try:
        packed = msgpack.packb(header)
    except (OverflowError, ValueError):
        return
    try:
        P.decode([b"DWM1", bytes((tag,)), packed, *arrays])
    except P.ProtocolError:
        pass
