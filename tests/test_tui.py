"""`dwarfmesh chat`: the pure state and rendering functions directly, and the real program
driven in a tmux terminal against live node processes (tiny random-weight models)."""

from __future__ import annotations

import asyncio
import io
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from meshutil import ROOT, free_port, node_env, start_node, stop, wait_for_mesh
from rich.console import Console

from dwarfmesh.ui import tui_render as R
from dwarfmesh.ui.client import MeshClient
from dwarfmesh.wire.protocol import GenParams, session_tag

pytestmark = pytest.mark.usefixtures("own_model_cache")   # tiny GGUFs' tokenizers

SUMMARY = {"text": "fused answer", "token_ids": [5, 6, 7], "finish_reason": "eos",
           "leader": "node1", "members": ["node0", "node1"],
           "models": {"node0": "m1", "node1": "m2"}, "prompt_tokens": 20,
           "prompt_tokens_reused": 12, "ttft_ms": 42.0, "tokens_per_s": 55.5,
           "agreement": {"node0": 0.75, "node1": 0.5}, "weights": {"node0": 0.6, "node1": 0.4}}
NODES = [{"name": "node0", "model": "m1", "address": "127.0.0.1:1", "leader_of": []},
         {"name": "node1", "model": "m2", "address": "127.0.0.1:2",
          "leader_of": [session_tag("c1")]}]


def text_of(renderable, width: int = 120) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def answered(state: R.ChatState) -> R.ChatState:
    state = R.ask(state, "why?", now=10.0)
    state = R.piece(state, "fused ", now=10.5)
    state = R.piece(state, "answer", now=11.0)
    return R.finished(state, SUMMARY, now=11.0)


# --- pure ---------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_multi_line_input_and_commands():
    assert not R.input_complete(["first line\\"])
    assert R.input_complete(["first line\\", "second"])
    assert R.join_input(["first line\\", "second"]) == "first line\nsecond"
    block = ['"""', "def f():", "    return 1", '"""']
    assert not R.input_complete(block[:3]) and R.input_complete(block)
    assert R.join_input(block) == "def f():\n    return 1"
    assert R.join_input(['"""one line"""']) == "one line"
    assert R.parse_command("/temperature 0.7") == ("temperature", "0.7")
    assert R.parse_command(" /RESET ") == ("reset", "")
    assert R.parse_command("what is /etc?") is None and R.parse_command("//x") is None


@pytest.mark.timeout(10)
def test_an_answer_joins_the_history_and_reset_starts_over():
    state = answered(R.mesh_seen(R.connected(R.ChatState("c1"), "127.0.0.1:1", NODES), NODES))
    assert state.leader == "node1"
    assert state.history == ({"role": "user", "content": "why?"},
                             {"role": "assistant", "content": "fused answer"})
    assert R.messages_for(state, "and?")[-1] == {"role": "user", "content": "and?"}
    assert len(R.messages_for(state, "and?")) == 3
    failed = R.failed(R.ask(state, "lost?", 20.0), "no answer", 21.0)
    assert failed.history == state.history and not failed.online
    fresh = R.reset(state, "c2")
    assert (fresh.conversation, fresh.history, fresh.leader) == ("c2", (), "")
    with_system = R.ChatState("c3", system="be brief")
    assert R.messages_for(with_system, "q")[0] == {"role": "system", "content": "be brief"}


@pytest.mark.timeout(10)
def test_the_screen_shows_answer_members_leader_and_figures():
    state = R.mesh_seen(R.connected(R.ChatState("c1"), "127.0.0.1:1", NODES), NODES)
    state = R.ask(state, "why?", now=10.0)
    waiting = text_of(R.screen(R.tick(state, 11.5), 120, 30))
    assert "thinking… 1.5s" in waiting and "node1 ★" in waiting
    state = R.piece(R.piece(state, "half ", 10.2), "way", 10.7)
    assert R.live_figures(state.answer) == pytest.approx((200.0, 2.0))
    live = text_of(R.screen(state, 120, 30))
    assert "half way▌" in live and "200 ms" in live and "2.0" in live
    done = text_of(R.screen(R.finished(state, SUMMARY, 11.0), 120))
    for shown in ("fused answer", "42 ms", "55.5", "3 (eos)", "20, 12 reused", "75%", "50%",
                  "1 turn(s)"):
        assert shown in done, shown
    narrow = text_of(R.screen(R.finished(state, SUMMARY, 11.0), 60), width=60)
    assert narrow.index("fused answer") < narrow.index("node0")    # the panel goes below


@pytest.mark.timeout(10)
def test_rendering_is_safe_and_bounded():
    state = R.ask(R.ChatState("c1"), "q", 0.0)
    state = R.piece(state, "line\n" * 100 + "evil \x1b[2J end", 1.0)
    shown = text_of(R.answer_view(state.answer, 40, max_lines=5), width=40)
    assert "\x1b" not in shown and "\ufffd[2J end" in shown
    assert len(shown.strip("\n").splitlines()) <= 6          # five lines and the cursor line
    cancelled = R.finished(state, {**SUMMARY, "finish_reason": "cancelled"}, 2.0)
    assert "stopped" in text_of(R.answer_view(cancelled.answer, 40))
    offline = R.unreachable(R.ChatState("c1"), "no answer from x", attempt=3, retry_in=1.2)
    panel = text_of(R.mesh_panel(offline), width=60)
    assert "no answer from x" in panel and "attempt 3" in panel and "in 2s" in panel
    weights = text_of(R.weights_table(answered(R.ChatState("c1"))))
    assert "0.600" in weights and "75%" in weights
    assert "/temperature" in text_of(R.help_text())


# --- the real program in a terminal -------------------------------------------------------


class Tmux:
    """One tmux server of our own (its own socket), one window running a command."""

    def __init__(self, command: list[str], cwd: Path, env: dict, width=110, height=36):
        self.socket = f"dwarfmesh-test-{uuid.uuid4().hex[:8]}"
        env_args = [f"{k}={v}" for k, v in env.items() if k.startswith(("DWARFMESH", "PYTHON",
                                                                         "PATH", "HOME"))]
        shell = " ".join(_quote(a) for a in ["env", "-u", "COLUMNS", "-u", "LINES", *env_args,
                                             *command])
        self._tmux("new-session", "-d", "-x", str(width), "-y", str(height), "-s", "chat",
                   "-c", str(cwd), f"{shell}; echo EXITED=$?; sleep 600")

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        self._tmux("send-keys", "-t", "chat", *(["-l"] if literal else []), *keys)

    def type(self, line: str) -> None:
        self.keys(line, literal=True)
        self.keys("Enter")

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-J", "-t", "chat", "-S", "-200").rstrip()

    def wait_for(self, pattern: str, timeout: float = 60.0, after: int = 0) -> str:
        """The screen once `pattern` (a regex) shows up after position `after`."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            screen = self.screen()
            if re.search(pattern, screen[after:]):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} never showed; the screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def pick(address: str, history: list, candidates: list[str], max_tokens: int, want: set):
    """The first candidate question whose greedy answer (after `history`) ends in `want`."""
    async def go():
        async with MeshClient(address) as c:
            seen = []
            for q in candidates:
                r = await c.generate("", GenParams(mode="stream", max_tokens=max_tokens), messages=[
                    *history, {"role": "user", "content": q}])
                whole = len(r.summary["members"]) == 2      # not a CPU-starved moment
                if r.summary["finish_reason"] in want and r.text.strip() and whole:
                    return q, r.text
                seen.append((q, r.summary["finish_reason"], r.text[:20]))
        raise AssertionError(f"no candidate question ends in {want}: {seen}")
    return asyncio.run(go())


def answer_column(screen: str, question: str, width: int) -> str:
    """What the chat printed as the answer to `question` (left of the panel), no spaces."""
    after = screen[screen.rindex(question) + len(question):]
    body = after[: after.index("you ›")]
    return "".join(line[:width].replace("│", "").replace("╭", "").strip()
                   for line in body.splitlines()).replace(" ", "")


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_chat_in_a_terminal(tiny_ggufs_shared, tmp_path):
    max_tokens, port = 600, free_port()
    env = {**node_env(tmp_path), "DWARFMESH_CACHE": str(tmp_path / "cache")}
    term = Tmux([sys.executable, "-m", "dwarfmesh", "chat", "--connect", f"127.0.0.1:{port}",
                 "--max-tokens", str(max_tokens), "--mode", "stream"], ROOT, env)
    procs = []
    try:
        # No node yet: the chat says so and keeps trying.
        term.wait_for(rf"no answer from 127\.0\.0\.1:{port}", timeout=30)
        term.wait_for(r"attempt 2")
        procs.append(start_node(tiny_ggufs_shared[0], "node0", port, tmp_path))
        procs.append(start_node(tiny_ggufs_shared[1], "node1", free_port(), tmp_path,
                                peers=[f"127.0.0.1:{port}"]))
        wait_for_mesh(f"127.0.0.1:{port}", 2, procs=procs)
        term.wait_for(r"● mesh 127\.0\.0\.1[\s\S]*you ›", timeout=30)

        # A long answer streams; Ctrl-C stops it, the part so far is kept, the chat goes on.
        address = f"127.0.0.1:{port}"
        q1, _ = pick(address, [], ["hello", "def", "jumps over the lazy dog", "0123456789"],
                     max_tokens, {"length"})
        mark = len(term.screen())
        term.type(q1)
        streaming = term.wait_for(r"▌", timeout=30, after=mark)
        assert "first token" in streaming and "node1" in streaming
        term.keys("C-c")
        screen = term.wait_for(r"\(cancelled\)[\s\S]*you ›$", after=mark)
        assert "[stopped: the part so far is kept]" in screen and "EXITED" not in screen
        assert "1 turn(s)" in screen[mark:]

        # A question over two lines (a trailing backslash continues it) is the second turn
        # of the conversation: the members reuse their KV caches.
        mark = len(screen)
        term.type("The quick brown fox\\")
        term.wait_for(r"… *$", after=mark)                # the continuation prompt
        term.type("return xs")
        screen = term.wait_for(r"2 turn\(s\)[\s\S]*you ›$", after=mark)
        reused = int(re.findall(r"prompt +\d+, (\d+) reused", screen)[-1])
        assert reused > 0

        # Commands: /members, /temperature, /weights, /reset.
        term.type("/members")
        term.wait_for(r"leader of this conversation", after=mark)
        term.type("/temperature 0.5")
        term.wait_for(r"temperature is now 0\.5", after=mark)
        term.type("/temperature 0")
        term.type("/weights")
        term.wait_for(r"last answer: weights \(online\)", after=mark)
        term.type("/reset")
        term.wait_for(r"new conversation", after=mark)

        # A fresh conversation: the answer on screen is the mesh's greedy answer, as the
        # client API gives it.
        q3, a3 = pick(address, [], ["The quick brown fox", "Ensembles of language models",
                                    "def quicksort(xs):\nfuse"], max_tokens, {"eos"})
        mark = len(term.screen())
        *head, last = q3.split("\n")
        for line in head:
            term.type(line + "\\")
        term.type(last)
        screen = term.wait_for(r"1 turn\(s\)[\s\S]*you ›$", after=mark)
        width = 110 - R.PANEL_WIDTH - 2
        fused_by_both = re.search(r"agreement[\s\S]*node0 [\s\S]*node1 ", screen[mark:])
        if fused_by_both:      # (a member starved of CPU may miss an answer: text differs)
            assert answer_column(screen, q3.split("\n")[-1], width) == \
                R.terminal_safe(a3).replace(" ", "").replace("\n", "")
        assert re.search(r"\d+ \(eos\)", screen[mark:]) and re.search(r"node\d ★", screen[mark:])
        assert re.search(r"node0( ★)? +m1", screen[mark:])
        assert re.search(r"node1( ★)? +m2", screen[mark:])
        assert re.search(r"prompt +\d+, 0 reused", screen[mark:])

        # Ctrl-C at the prompt does not leave; Ctrl-D does, cleanly.
        term.keys("C-c")
        term.wait_for(r"Ctrl-D or /quit leaves", after=mark)
        term.keys("C-d")
        term.wait_for(r"EXITED=0", timeout=20)
    finally:
        term.close()
        stop(procs)


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_ctrl_c_while_the_mesh_is_unreachable_gives_up(tmp_path):
    port = free_port()                                   # nothing listens there
    term = Tmux([sys.executable, "-m", "dwarfmesh", "chat", "--connect", f"127.0.0.1:{port}"],
                ROOT, {**node_env(tmp_path), "DWARFMESH_CACHE": str(tmp_path)})
    try:
        term.wait_for(r"looking for the mesh at", timeout=30)
        term.keys("C-c")                                 # mid-attempt: no 3 s wait
        term.wait_for(r"EXITED=130", timeout=5)
    finally:
        term.close()
