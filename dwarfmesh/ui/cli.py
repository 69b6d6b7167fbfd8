"""`dwarfmesh` command line: node, peers, generate, chat, serve, pull, models.

Owns running a command: logging set-up, `asyncio.run`, and turning every expected failure
(missing model, unreachable mesh) into one line on stderr and exit code 2. What the
commands accept (options, checks, help) is `cli_args`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Any

from dwarfmesh.ui.cli_args import build_parser
from dwarfmesh.ui.errors import CliError
from dwarfmesh.wire.modes import Mode

log = logging.getLogger("dwarfmesh")

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
                       speculate=args.speculate, drafter=args.drafter)

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
                         f"{_speculated(s)}{_voted(s)}]\n")
    return result.summary


def _pace(summary: dict[str, Any]) -> str:
    """How far and how fast the answer went, in the mode's own units."""
    s = summary
    if s.get("mode") == Mode.IDS.value:
        return f"{s.get('steps', 0)} tokens, {s.get('tokens_per_s', 0):.1f} tok/s"
    return f"{s.get('steps', 0)} rounds, {s.get('committed_bytes', 0)} bytes"


def _voted(summary: dict[str, Any]) -> str:
    """Who voted, who was benched (and why), whose answer select kept."""
    if "voted" not in summary:
        return ""
    out = f", voted {', '.join(summary['voted'])}"
    for name, why in (summary.get("benched") or {}).items():
        out += f", benched {name} ({why})"
    chosen = (summary.get("select") or {}).get("chosen_by")
    return out + (f", kept the answer of {' and '.join(chosen)}" if chosen else "")


def _speculated(summary: dict[str, Any]) -> str:
    spec = summary.get("speculate")
    if not isinstance(spec, dict):
        return ""
    by = spec.get("member_drafter")
    return (f", {spec.get('tokens_per_round', 0):.2f} tokens a round, "
            f"{spec.get('acceptance', 0):.0%} of drafted tokens accepted (drafter "
            f"{spec.get('drafter')}{f' {by}' if by else ''})")


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
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "drafter", "auto") != "auto" and not getattr(args, "speculate", 0):
        parser.error("--drafter takes effect only with --speculate auto or N")
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
