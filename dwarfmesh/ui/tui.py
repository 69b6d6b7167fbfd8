"""`dwarfmesh chat`: the terminal chat, the I/O shell around `tui_render`.

Owns the terminal (readline input with history; a rich `Live` view refreshed explicitly
from the event loop, never by a thread), the clock, and the `MeshClient`s. What is shown
is computed by the pure functions of `tui_render`.

One asyncio loop lives for the whole chat. Between answers `input()` runs on the main
thread, so readline works and Ctrl-C at the prompt is a plain KeyboardInterrupt (the line is
dropped); while the loop runs, SIGINT is a loop signal handler: it stops the answer (the
cancel Event of `MeshClient.generate`) or gives up a reconnection, never the program.
Ctrl-D or /quit leaves. A mesh that cannot be reached is retried with a visible status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any, TypeVar

from rich.console import Console
from rich.live import Live
from rich.text import Text

from dwarfmesh.config import HEARTBEAT_INTERVAL_S, cache_dir
from dwarfmesh.ui import tui_render as R
from dwarfmesh.ui.client import MeshClient, MeshError, find_node
from dwarfmesh.wire.protocol import GenParams, ProtocolError, session_tag
from dwarfmesh.wire.security import MeshKey

log = logging.getLogger(__name__)

RETRY_S = 2.0              # wait between attempts to reach the mesh
CONNECT_TIMEOUT_S = 3.0    # a node that does not list its peers within this is unreachable
REFRESH_S = 0.05           # at most 20 redraws a second while text streams
TICK_S = 0.25              # redraw at least this often (elapsed time, countdowns)
PROMPT, MORE = "you › ", "  … "
HISTORY_LINES = 1000
LEADER_POLLS = 6           # ask who leads the answer at most this often (half a heartbeat apart)

T = TypeVar("T")


def new_conversation() -> str:
    return "chat-" + uuid.uuid4().hex[:12]


class ChatApp:
    def __init__(self, args: argparse.Namespace, console: Console,
                 key: MeshKey | None = None) -> None:
        self.args, self.console, self.key = args, console, key
        self.loop = asyncio.new_event_loop()
        self._interrupt = asyncio.Event()
        params = GenParams(max_tokens=args.max_tokens, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed, top_k=args.top_k, fuse=args.fuse,
                           weights=args.weights, speculate=args.speculate,
                           drafter=args.drafter, mode=args.mode)
        self.state = R.ChatState(new_conversation(), params, address=args.connect or "",
                                 system=args.system)

    # --- the main loop (synchronous: input() between answers) ---------------------------

    def run(self) -> int:
        history = _load_history()
        try:
            self.console.print(Text.assemble(("dwarfmesh chat", "bold"), "  /help for commands,"
                                             " Ctrl-C stops an answer, Ctrl-D leaves"))
            if not self._call(self._connect()):
                return 130
            self.console.print(R.mesh_panel(self.state))
            while True:
                text = self._read()
                if text is None:
                    return 0
                if not text.strip():
                    continue
                command = R.parse_command(text)
                if command is None:
                    self._call(self._answer(text))
                elif not self._command(*command):
                    return 0
        finally:
            _save_history(history)
            self.loop.close()

    def _call(self, coro: Awaitable[T]) -> T:
        """Run a coroutine on the chat's loop; Ctrl-C meanwhile sets `_interrupt`."""
        self._interrupt.clear()
        self.loop.add_signal_handler(signal.SIGINT, self._interrupt.set)
        try:
            with _no_echo():
                return self.loop.run_until_complete(coro)
        finally:
            self.loop.remove_signal_handler(signal.SIGINT)

    def _read(self) -> str | None:
        lines: list[str] = []
        while True:
            try:
                lines.append(input(MORE if lines else PROMPT))
            except EOFError:
                self.console.print()
                return None
            except KeyboardInterrupt:
                self.console.print("\n[grey50](Ctrl-D or /quit leaves)[/]")
                lines = []
                continue
            if R.input_complete(lines):
                return R.join_input(lines)

    def _command(self, name: str, arg: str) -> bool:
        """Run a slash command; False means leave."""
        say = self.console.print
        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            say(R.help_text())
        elif name == "members":
            if self._call(self._connect(once=True)):
                say(R.members_table(self.state))
        elif name == "weights" and not arg:
            say(R.weights_table(self.state))
        elif name in ("weights", "temperature"):
            self._set_param(name, arg)
        elif name == "reset":
            self.state = R.reset(self.state, new_conversation())
            say(f"[green]new conversation[/] ({self.state.conversation}): the mesh starts "
                "from an empty history")
        else:
            say(f"[red]unknown command /{name}[/]; /help lists them")
        return True

    def _set_param(self, name: str, arg: str) -> None:
        if not arg:
            self.console.print(f"{name} is {getattr(self.state.params, name)}; "
                               f"/{name} VALUE changes it")
            return
        try:
            value: Any = float(arg) if name == "temperature" else arg
            params = replace(self.state.params, **{name: value})
            params.check()
        except (ValueError, ProtocolError) as exc:
            self.console.print(f"[red]/{name}: {exc}[/]")
            return
        self.state = replace(self.state, params=params)
        self.console.print(f"{name} is now {value}")

    # --- the mesh (asynchronous) --------------------------------------------------------

    async def _connect(self, once: bool = False) -> bool:
        """Find and ask the mesh until it answers; show why not and when the next try is.

        False when the user gave up with Ctrl-C (or, with once=True, after one failure).
        """
        attempt = 0
        with Live(console=self.console, auto_refresh=False, transient=True,
                  redirect_stdout=False, redirect_stderr=False) as live:
            while True:
                attempt += 1
                where = f"at {self.args.connect}" if self.args.connect else "by mDNS"
                self.state = R.connecting(self.state, where, attempt)
                live.update(R.mesh_panel(self.state), refresh=True)
                reach = asyncio.ensure_future(self._reach())
                gave_up = asyncio.ensure_future(self._interrupt.wait())
                await asyncio.wait({reach, gave_up}, return_when=asyncio.FIRST_COMPLETED)
                gave_up.cancel()
                if not reach.done():             # Ctrl-C while asking: stop asking
                    reach.cancel()
                    await asyncio.gather(reach, gave_up, return_exceptions=True)
                    return False
                why = reach.result()
                if why is None:
                    return True
                if once:
                    self.state = R.unreachable(self.state, why, attempt, 0)
                    self.console.print(f"[red]the mesh is unreachable: {why}[/]")
                    return False
                end = time.monotonic() + RETRY_S
                while (left := end - time.monotonic()) > 0:
                    self.state = R.unreachable(self.state, why, attempt, left)
                    live.update(R.mesh_panel(self.state), refresh=True)
                    if await self._wait_interrupt(min(TICK_S, left)):
                        return False

    async def _reach(self) -> str | None:
        """One attempt to find and ask the mesh: None when it answered, else why not."""
        try:
            address = self.args.connect or await find_node()
            async with MeshClient(address, self.key) as client:
                nodes = await client.peers(timeout=CONNECT_TIMEOUT_S)
        except MeshError as exc:
            return str(exc)
        self.state = R.mesh_seen(R.connected(self.state, address, nodes), nodes)
        return None

    async def _wait_interrupt(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._interrupt.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def _answer(self, question: str) -> None:
        if not self.state.online and not await self._connect():
            return
        messages = R.messages_for(self.state, question)
        self.state = R.ask(self.state, question, time.monotonic())
        width, height = self.console.size
        with Live(R.screen(self.state, width, height), console=self.console,
                  auto_refresh=False, transient=True, vertical_overflow="crop",
                  redirect_stdout=False, redirect_stderr=False) as live:

            def draw() -> None:
                live.update(R.screen(self.state, width, height), refresh=True)

            async with MeshClient(self.state.address, self.key) as client:
                try:
                    # Fresh members for the panel; a node that died is noticed in seconds.
                    nodes = await client.peers(timeout=CONNECT_TIMEOUT_S)
                    self.state = R.mesh_seen(self.state, nodes)
                    draw()
                    summary = await self._stream(client, messages, draw)
                    self.state = R.finished(self.state, summary, time.monotonic())
                except MeshError as exc:
                    self.state = R.failed(self.state, str(exc), time.monotonic())
        self.console.print(R.screen(self.state, width))

    async def _stream(self, client: MeshClient, messages: list[dict[str, str]],
                      draw: Callable[[], None]) -> dict[str, Any]:
        """Run the answer, redrawing as text comes (at most every REFRESH_S) and every
        TICK_S without it; return its summary."""
        drawn = 0.0
        leader: asyncio.Task | None = None

        def on_text(text: str) -> None:
            nonlocal drawn, leader
            now = time.monotonic()
            self.state = R.piece(self.state, text, now)
            if leader is None:           # the leader is elected by now: ask who it is
                leader = asyncio.ensure_future(self._find_leader())
            if now - drawn >= REFRESH_S:
                drawn = now
                draw()

        answer = asyncio.ensure_future(client.generate(
            "", self.state.params, on_text, self._interrupt, messages=messages,
            conversation=self.state.conversation))
        try:
            while not answer.done():
                await asyncio.wait({answer}, timeout=TICK_S)
                now = time.monotonic()
                self.state = R.tick(self.state, now)
                if self._interrupt.is_set() and not self.state.answer.cancelling:
                    self.state = R.cancelling(self.state)
                if now - drawn >= TICK_S:
                    drawn = now
                    draw()
            return answer.result().summary
        finally:
            tasks = [t for t in (answer, leader) if t is not None]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _find_leader(self) -> None:
        """Ask the mesh (on a second client: the first is busy streaming) who leads us.

        A remote leader says so in its next heartbeat, so ask again until one does."""
        conversation = self.state.conversation
        async with MeshClient(self.state.address, self.key) as client:
            for _ in range(LEADER_POLLS):
                try:
                    nodes = await client.peers(timeout=CONNECT_TIMEOUT_S)
                except MeshError as exc:
                    log.debug("could not list peers mid-answer: %s", exc)
                    return
                self.state = R.mesh_seen(self.state, nodes)
                if any(session_tag(conversation) in n.get("leader_of", []) for n in nodes):
                    return
                await asyncio.sleep(HEARTBEAT_INTERVAL_S / 2)


@contextlib.contextmanager
def _no_echo() -> Iterator[None]:
    """Keys typed while the live view is up are not echoed: an echoed "^C" would move the
    cursor, and the view would be redrawn one line off."""
    try:
        import termios
        fd = sys.stdin.fileno()
        old = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError) as exc:
        log.debug("terminal echo stays on: %s", exc)
        yield
        return
    except termios.error:
        yield
        return
    quiet = termios.tcgetattr(fd)
    quiet[3] &= ~(termios.ECHO | termios.ECHOCTL)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, old)


def _load_history() -> Any:
    try:
        import readline
    except ImportError:          # no readline (Windows): input() still works, no history
        return None
    path = cache_dir() / "chat_history"
    readline.set_history_length(HISTORY_LINES)
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    return readline, path


def _save_history(history: Any) -> None:
    if history is None:
        return
    readline, path = history
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
    except OSError as exc:
        log.debug("could not save the chat history: %s", exc)


def run_chat(args: argparse.Namespace, key: MeshKey | None = None) -> int:
    """The `chat` command: an exit code. `key`: the mesh key (None: an open mesh)."""
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)   # log lines would tear the live view
    return ChatApp(args, Console(), key).run()
