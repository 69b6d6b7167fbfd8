"""What `dwarfmesh chat` shows, as pure functions of the chat state: no I/O, no clock.

Owns: `ChatState` and `Answer` (immutable), the reducers that move them on (a piece of
text arrived, the answer ended, the mesh went away, a new conversation), the renderables
(the answer beside a mesh panel; /members, /weights, /help), and parsing what the user
typed (multi-line input, slash commands). Time comes in as arguments. `tui.py` owns the
terminal, the clock and the mesh client.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field, replace
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dwarfmesh.wire.protocol import GenParams, session_tag

PANEL_WIDTH = 38
SIDE_BY_SIDE_MIN = 90          # narrower terminals get the mesh panel under the answer
BAR_CELLS = 10
COMMANDS = {
    "help": "this list",
    "members": "the nodes of the mesh, their models, who leads this conversation",
    "weights": "each member's weight and agreement in the last answer; "
               "/weights MODE sets online|equal|perplexity|static",
    "temperature": "/temperature X: 0 = greedy, higher = more varied",
    "reset": "start a new conversation (the members forget this one)",
    "quit": "leave (Ctrl-D works too)",
}
HELP_INPUT = ('A line ending in \\ continues on the next line; """ opens a block that the '
              'next """ closes. Ctrl-C stops an answer (the part so far is kept).')
_MEASURE = Console(file=io.StringIO(), width=200)   # only measures text, never prints
# Control characters a model may emit (ESC would reach the terminal as a command) are shown
# as a visible stand-in; newline and tab are kept.
_CONTROLS = {c: "\N{REPLACEMENT CHARACTER}" for c in (*range(0x09), *range(0x0B, 0x20),
                                                      *range(0x7F, 0xA0))}


@dataclass(frozen=True)
class Answer:
    question: str
    started: float
    text: str = ""
    pieces: int = 0
    first_at: float | None = None
    last_at: float | None = None
    now: float = 0.0
    summary: dict[str, Any] | None = None
    error: str = ""
    cancelling: bool = False

    @property
    def done(self) -> bool:
        return self.summary is not None or bool(self.error)


@dataclass(frozen=True)
class ChatState:
    conversation: str
    params: GenParams = field(default_factory=GenParams)
    address: str = ""
    online: bool = False
    status: str = "looking for the mesh"
    nodes: tuple[dict[str, Any], ...] = ()
    leader: str = ""
    system: str = ""
    history: tuple[dict[str, str], ...] = ()
    answer: Answer | None = None
    last: dict[str, Any] | None = None         # summary of the last finished answer


# --- reducers ----------------------------------------------------------------------------


def connected(state: ChatState, address: str, nodes: list[dict[str, Any]]) -> ChatState:
    return replace(state, address=address, online=True, nodes=tuple(nodes),
                   status=f"{len(nodes)} node(s) via {address}")


def connecting(state: ChatState, where: str, attempt: int) -> ChatState:
    return replace(state, online=False, status=f"looking for the mesh {where}… "
                                               f"(attempt {attempt})")


def unreachable(state: ChatState, why: str, attempt: int, retry_in: float) -> ChatState:
    return replace(state, online=False,
                   status=f"{why} (attempt {attempt}; next in {math.ceil(retry_in)}s, Ctrl-C "
                          "gives up)")


def mesh_seen(state: ChatState, nodes: list[dict[str, Any]]) -> ChatState:
    """Fresh peers: the members, and which of them leads this conversation."""
    tag = session_tag(state.conversation)
    leader = next((n["name"] for n in nodes if tag in n.get("leader_of", [])), state.leader)
    return replace(state, nodes=tuple(nodes), leader=leader)


def ask(state: ChatState, question: str, now: float) -> ChatState:
    return replace(state, answer=Answer(question, started=now, now=now))


def messages_for(state: ChatState, question: str) -> list[dict[str, str]]:
    system = [{"role": "system", "content": state.system}] if state.system else []
    return [*system, *state.history, {"role": "user", "content": question}]


def piece(state: ChatState, text: str, now: float) -> ChatState:
    a = state.answer
    assert a is not None
    return replace(state, answer=replace(
        a, text=a.text + text, pieces=a.pieces + 1, now=now, last_at=now,
        first_at=a.first_at if a.first_at is not None else now))


def tick(state: ChatState, now: float) -> ChatState:
    return state if state.answer is None else replace(state, answer=replace(state.answer, now=now))


def cancelling(state: ChatState) -> ChatState:
    assert state.answer is not None
    return replace(state, answer=replace(state.answer, cancelling=True))


def finished(state: ChatState, summary: dict[str, Any], now: float) -> ChatState:
    """The answer is over (complete or cancelled): it joins the conversation history."""
    a = state.answer
    assert a is not None
    text = summary.get("text", a.text)
    turns = ({"role": "user", "content": a.question}, {"role": "assistant", "content": text})
    return replace(state, answer=replace(a, text=text, summary=summary, now=now),
                   history=state.history + turns, last=summary,
                   leader=summary.get("leader") or state.leader)


def failed(state: ChatState, why: str, now: float) -> ChatState:
    """No answer: the question does not join the history, and the mesh must be found again."""
    a = state.answer
    assert a is not None
    return replace(state, answer=replace(a, error=why, now=now), online=False,
                   status=f"lost the mesh: {why}")


def reset(state: ChatState, conversation: str) -> ChatState:
    return replace(state, conversation=conversation, history=(), answer=None, leader="")


# --- input -------------------------------------------------------------------------------


def input_complete(lines: list[str]) -> bool:
    """Whether the typed lines make a whole entry (see HELP_INPUT)."""
    if lines and lines[0].lstrip().startswith('"""'):
        return '"""' in "\n".join(lines).lstrip()[3:]
    return not lines or not lines[-1].endswith("\\")


def join_input(lines: list[str]) -> str:
    text = "\n".join(lines)
    if text.lstrip().startswith('"""'):
        body = text.lstrip()[3:]
        return body[: body.index('"""')].strip("\n")
    return "\n".join(line.removesuffix("\\") for line in lines)


def parse_command(text: str) -> tuple[str, str] | None:
    """("name", "argument") for "/name argument", or None when it is a question."""
    text = text.strip()
    if not text.startswith("/") or text.startswith("//"):
        return None
    name, _, arg = text[1:].partition(" ")
    return name.lower(), arg.strip()


# --- rendering ---------------------------------------------------------------------------


def terminal_safe(text: str) -> str:
    return text.translate(_CONTROLS)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} ms"


def _bar(share: float) -> Text:
    full = round(max(0.0, min(1.0, share)) * BAR_CELLS)
    return Text("█" * full, "green") + Text("░" * (BAR_CELLS - full), "grey50")


def live_figures(a: Answer | None) -> tuple[float | None, float | None]:
    """(time to first token ms, tokens/s) as the client sees them while text streams."""
    if a is None or a.first_at is None:
        return None, None
    ttft = (a.first_at - a.started) * 1000.0
    span = (a.last_at or a.first_at) - a.first_at
    return ttft, (a.pieces - 1) / span if a.pieces > 1 and span > 0 else None


def mesh_panel(state: ChatState) -> Panel:
    rows = Table.grid(padding=(0, 1))
    rows.add_column(no_wrap=True, overflow="ellipsis", min_width=12, max_width=14)
    rows.add_column(no_wrap=True, overflow="ellipsis")
    dot = Text("● ", "green") if state.online else Text("○ ", "red")
    head = Text.assemble(dot, ("mesh ", "bold"), (state.address or "?", "cyan"),
                         no_wrap=True, overflow="ellipsis")
    if state.nodes:
        rows.add_row(Text("members", "bold"), Text("★ leads this chat", "grey50"))
    for n in state.nodes:
        lead = Text(" ★", "yellow") if n["name"] == state.leader else Text("")
        rows.add_row(Text(n["name"]) + lead, Text(n["model"], "magenta"))
    a = state.answer
    s = a.summary if a is not None and a.summary else None
    ttft, rate = live_figures(a)
    if s is not None:
        ttft, rate = s.get("ttft_ms", ttft), s.get("tokens_per_s", rate)
    rows.add_row("", "")
    rows.add_row("first token", _ms(ttft))
    rows.add_row("tokens/s", "–" if rate is None else f"{rate:.1f}")
    if s is not None:
        rows.add_row("tokens", f"{len(s.get('token_ids', []))} ({s.get('finish_reason', '?')})")
        rows.add_row("prompt", f"{s.get('prompt_tokens', 0)}, "
                               f"{s.get('prompt_tokens_reused', 0)} reused")
    last = s or state.last
    if last and last.get("agreement"):
        rows.add_row(Text("agreement", "bold"), Text("own top = fused", "grey50"))
        for name, share in sorted(last["agreement"].items()):
            rows.add_row(name, _bar(share) + Text(f" {share:4.0%}"))
    rows.add_row("", "")
    p = state.params
    rows.add_row("temperature", f"{p.temperature:g} · max {p.max_tokens}")
    rows.add_row("conversation", f"{len(state.history) // 2} turn(s) · /help")
    body = Group(head, rows) if state.online else Group(head, Text(state.status, "red"), rows)
    return Panel(body, title="dwarfmesh", title_align="left", width=PANEL_WIDTH,
                 border_style="blue")


def answer_view(a: Answer, width: int, max_lines: int | None = None) -> Text:
    """The answer text (its last max_lines lines when given) and a status line."""
    body = Text(terminal_safe(a.text), overflow="fold")
    if max_lines is not None:
        lines = body.wrap(_MEASURE, max(width, 10))
        if len(lines) > max_lines:
            body = Text("\n").join(lines[-max_lines:])
    if a.error:
        status = Text(f"\n✗ {a.error}", "red")
    elif a.summary is not None:
        reason = a.summary.get("finish_reason", "")
        status = Text("\n[stopped: the part so far is kept]" if reason == "cancelled" else "",
                      "yellow")
    elif a.cancelling:
        status = Text(" ▌ stopping…", "yellow")
    elif a.first_at is None:
        status = Text(f"thinking… {a.now - a.started:.1f}s (prefill on every member)", "grey50")
    else:
        status = Text("▌", "grey50")
    return body + status


def screen(state: ChatState, width: int, height: int | None = None) -> RenderableType:
    """The answer beside (or above) the mesh panel; height=None shows the whole answer."""
    side = width >= SIDE_BY_SIDE_MIN
    panel = mesh_panel(state)
    if state.answer is None:
        return panel
    text_width = width - PANEL_WIDTH - 2 if side else width
    panel_lines = 0 if side else 14 + len(state.nodes)
    max_lines = None if height is None else max(height - 3 - panel_lines, 3)
    view = answer_view(state.answer, text_width, max_lines)
    if not side:
        return Group(view, panel)
    grid = Table.grid(expand=True, padding=(0, 1))
    grid.add_column(ratio=1, overflow="fold")
    grid.add_column(width=PANEL_WIDTH)
    grid.add_row(view, panel)
    return grid


def members_table(state: ChatState) -> Table:
    table = Table(title=f"mesh via {state.address}: {len(state.nodes)} node(s)",
                  title_justify="left")
    for col in ("name", "model", "address", "tokenizer", "role"):
        table.add_column(col)
    for n in state.nodes:
        role = "leader of this conversation" if n["name"] == state.leader else "member"
        table.add_row(n["name"] + (" *" if n.get("self") else ""), n["model"],
                      n.get("address", ""), str(n.get("fingerprint", ""))[:8], role)
    return table


def weights_table(state: ChatState) -> RenderableType:
    s = state.last
    if not s:
        return Text(f"weights: {state.params.weights} (no answer yet to show them)")
    table = Table(title=f"last answer: weights ({state.params.weights}) and agreement",
                  title_justify="left")
    for col in ("member", "model", "weight", "own top = fused", "vote"):
        table.add_column(col)
    models = s.get("models", {})
    benched = s.get("benched") or {}
    chosen = (s.get("select") or {}).get("chosen_by") or []
    for name in s.get("members", []):
        w = s.get("weights", {}).get(name)
        agree = s.get("agreement", {}).get(name)
        vote = (f"benched: {benched[name]}" if name in benched
                else "its answer kept" if name in chosen else "voted")
        table.add_row(name, models.get(name, ""), "–" if w is None else f"{w:.3f}",
                      "–" if agree is None else f"{agree:.0%}", vote)
    return table


def help_text() -> Text:
    out = Text("commands\n", "bold")
    for name, what in COMMANDS.items():
        out += Text(f"  /{name:<12}", "cyan") + Text(what + "\n")
    return out + Text(HELP_INPUT, "grey50")
