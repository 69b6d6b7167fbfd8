"""Protocol: every message round-trips; malformed frames are rejected, never crash."""

import math

import msgpack
import numpy as np
import pytest
from samples import SAMPLES, frame

from dwarfmesh.config import MAX_TOP_K, PROTOCOL_ID
from dwarfmesh.wire import protocol as P

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    out = P.decode(P.encode(msg))
    assert type(out) is type(msg)
    for name in msg.__dataclass_fields__:
        a, b = getattr(msg, name), getattr(out, name)
        if isinstance(a, np.ndarray):
            assert np.array_equal(a, b) and b.dtype == a.dtype.newbyteorder("<")
        elif isinstance(a, float):
            assert math.isclose(a, b, rel_tol=1e-6)
        else:
            assert a == b


def test_frame_fits_512_bytes_at_k64():
    size = sum(len(p) for p in P.encode(frame(k=64)))
    assert size <= 512, size


def parts_of(msg):
    return [bytes(p) for p in P.encode(msg)]


def test_truncated_frames_are_rejected():
    parts = parts_of(frame())
    for cut in range(len(parts)):
        with pytest.raises(P.ProtocolError):
            P.decode(parts[:cut])
    bad = parts[:]
    bad[3] = bad[3][:-3]            # ids buffer not a whole number of uint32
    with pytest.raises(P.ProtocolError):
        P.decode(bad)
    bad = parts[:]
    bad[2] = bad[2][: len(bad[2]) // 2]   # truncated msgpack header
    with pytest.raises(P.ProtocolError):
        P.decode(bad)


def test_oversized_topk_is_rejected():
    k = MAX_TOP_K + 1
    parts = parts_of(frame(k=MAX_TOP_K))
    parts[3] = np.arange(k, dtype=np.uint32).tobytes()
    parts[4] = np.zeros(k, dtype=np.float16).tobytes()
    with pytest.raises(P.ProtocolError, match="bad array size"):
        P.decode(parts)


def test_wrong_version_and_unknown_tag_and_protocol_id():
    parts = parts_of(P.Cancel("r"))
    with pytest.raises(P.ProtocolError, match="protocol id"):
        P.decode([b"DWM9", *parts[1:]])
    with pytest.raises(P.ProtocolError, match="unknown message tag"):
        P.decode([PROTOCOL_ID, b"\xee", *parts[2:]])
    hello = P.decode(parts_of(P.Hello("n", "x", "m", "f", 10, 99, ":1", 1.0, [], [])))
    assert "version mismatch" in P.check_version(hello)


def test_wrong_types_are_rejected():
    parts = parts_of(frame())
    header = msgpack.unpackb(parts[2])
    for i, bad_value in [(0, 5), (1, "three"), (4, "x"), (8, None), (1, True)]:
        h = list(header)
        h[i] = bad_value
        with pytest.raises(P.ProtocolError):
            P.decode([parts[0], parts[1], msgpack.packb(h), parts[3], parts[4]])
    with pytest.raises(P.ProtocolError):
        P.decode([parts[0], parts[1], msgpack.packb({"a": 1}), parts[3], parts[4]])
    gen = parts_of(P.Generate("r", "p", P.GenParams(), [], ""))
    h = msgpack.unpackb(gen[2])
    h[2][0] = -5                    # max_tokens
    with pytest.raises(P.ProtocolError, match="max_tokens"):
        P.decode([gen[0], gen[1], msgpack.packb(h)])


def test_nan_and_inf_are_rejected():
    parts = parts_of(frame())
    lps = np.frombuffer(parts[4], dtype=np.float16).copy()
    lps[5] = np.nan
    with pytest.raises(P.ProtocolError, match="finite"):
        P.decode([*parts[:4], lps.tobytes()])
    header = msgpack.unpackb(parts[2])
    for i in (4, 5, 8):             # rest_mass, prev_logp, forward_ms
        h = list(header)
        h[i] = float("nan") if i != 8 else float("inf")
        with pytest.raises(P.ProtocolError):
            P.decode([parts[0], parts[1], msgpack.packb(h), parts[3], parts[4]])
    lps = np.frombuffer(parts[4], dtype=np.float16).copy()
    lps[0] = 3.0                    # a log-probability above zero
    with pytest.raises(P.ProtocolError):
        P.decode([*parts[:4], lps.tobytes()])


def test_random_garbage_never_raises_anything_but_protocol_error():
    rng = np.random.default_rng(0)
    good = parts_of(frame())
    for _ in range(3000):
        parts = [bytearray(p) for p in good]
        i = int(rng.integers(len(parts)))
        if len(parts[i]):
            j = int(rng.integers(len(parts[i])))
            parts[i][j] = int(rng.integers(256))
        try:
            P.decode([bytes(p) for p in parts])
        except P.ProtocolError:
            pass


def test_prefix_hash_is_order_sensitive():
    assert P.prefix_hash([1, 2, 3]) != P.prefix_hash([3, 2, 1])
    assert P.prefix_hash([1, 2, 3]) == P.extend_hash(P.prefix_hash([1, 2]), 3)
