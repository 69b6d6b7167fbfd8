"""One summary shape for every mode: an id session's End and a text session's have the
same keys with the same types, and say which mode ran (`mode`), so readers (the CLI, the
API, the bench) never guess it from which keys are there.

Real nodes in one process (`inproc.Net`) on real engines (tiny GGUFs); rank mode runs on
one tokenizer when asked, so one mesh gives both kinds of session.
"""

from __future__ import annotations

import asyncio

import pytest
from inproc import Net, engines_on_one_thread, stop

import dwarfmesh  # noqa: F401  (OpenBLAS preload before mlx)
from dwarfmesh.sessions.summary import SessionSummary
from dwarfmesh.ui.cli import _pace
from dwarfmesh.wire import protocol as P
from dwarfmesh.wire.modes import Mode
from dwarfmesh.wire.protocol import GenParams

pytestmark = pytest.mark.usefixtures("own_model_cache")   # tiny GGUFs' tokenizers


@pytest.fixture()
def engines(tiny_ggufs_shared, tmp_path, monkeypatch):
    monkeypatch.setenv("DWARFMESH_STATE", str(tmp_path))
    model = str(tiny_ggufs_shared[0])
    out = engines_on_one_thread([model] * 2, names=["tiny"] * 2)
    yield out
    stop(out)


def _answer(engines, mode: str) -> dict:
    net = Net(engines)

    async def go() -> P.End:
        net.generate("node0", P.Generate(f"s-{mode}", "def quicksort(xs):", GenParams(
            max_tokens=12, mode=mode), [], ""))
        return await asyncio.wait_for(net.end(60), 60)
    end = asyncio.run(go())
    assert isinstance(end, P.End), end
    return end.summary


@pytest.mark.timeout(120)
def test_id_and_text_sessions_end_with_the_same_summary_keys(engines):
    ids, text = _answer(engines, "stream"), _answer(engines, "rank")
    sel = _answer(engines, "select")
    assert ids["mode"] == Mode.IDS.value and text["mode"] == Mode.RANK.value
    assert sel["mode"] == Mode.SELECT.value and sel["voted"] and "select" in sel
    common = {f for f in SessionSummary.__dataclass_fields__ if f != "extra"} | {
        "wire_bytes_per_token", "wire_bytes_per_byte"}
    assert common <= set(ids) and common <= set(text) and common <= set(sel)
    for key in common:
        assert type(ids[key]) is type(text[key]) or {type(ids[key]), type(text[key])} <= {
            int, float}, key
    # what only one mode measures is named, not guessed
    assert "frame_bytes_per_member_per_token" in ids and "trace" in text
    assert ids["committed_bytes"] == len(ids["text"].encode())
    assert text["committed_bytes"] == len(text["text"].encode())
    assert ids["late"] == {} == text["late"] and ids["dropped"] == [] == text["dropped"]
    # the CLI's one-line report reads the mode
    assert "tokens" in _pace(ids) and "tok/s" in _pace(ids)
    assert "rounds" in _pace(text) and "bytes" in _pace(text)
