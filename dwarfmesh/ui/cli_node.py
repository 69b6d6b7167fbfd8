"""`dwarfmesh node`: a node's process from start to exit (the rest of the CLI is cli.py).

Owns loading the model, starting the node (and its HTTP API), turning start-up failures
into one-line `CliError`s, serving until SIGINT/SIGTERM, and leaving the process.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from dwarfmesh.ui.errors import CliError

log = logging.getLogger("dwarfmesh")


async def run_node(args: argparse.Namespace) -> None:
    """`dwarfmesh node`: load the model, join the mesh, serve until SIGINT/SIGTERM."""
    from dwarfmesh.config import state_dir
    from dwarfmesh.mesh.process import IdentityInUse, fd_limit_kept, lock_identity, raise_fd_limit

    try:
        lock_identity(state_dir(), args.name)     # held (fd left open) until the process exits
    except IdentityInUse as exc:
        raise CliError(str(exc)) from None
    with fd_limit_kept():                         # mlx-lm would lower it at import
        from dwarfmesh.engine.choose import make_engine
        from dwarfmesh.models.registry import ModelError
    from dwarfmesh.node import Node, NodeOptions
    from dwarfmesh.wire.security import resolve_key

    key = resolve_key(args.mesh_key)
    name = args.model if "/" not in args.model else None
    try:
        with fd_limit_kept():                     # (the choice may import mlx-lm too)
            engine, why = make_engine(args.model, getattr(args, "engine", "auto"),
                                      model_name=name,
                                      repack=not getattr(args, "no_repack", False))
    except (ValueError, ModelError) as exc:
        raise CliError(str(exc).splitlines()[0]) from None
    log.debug("file descriptor limit: %d", raise_fd_limit())
    log.info("engine %s: %s", engine.engine_name, why)
    log.info("loading %s ...", engine.model_name)
    try:
        await engine.load()
    except (OSError, ValueError, KeyError) as exc:
        engine.shutdown()
        raise CliError(f"could not load model {args.model!r}: {str(exc).splitlines()[0]}") from None
    opts = NodeOptions(model=args.model, name=args.name, host=args.host, port=args.port,
                       peers=args.peer, mdns=not args.no_mdns, interfaces=args.interface,
                       weight=args.weight, step_timeout_s=args.step_timeout,
                       step_deadline_s=args.step_deadline / 1000.0 if args.step_deadline else None,
                       key=key)
    node = Node(opts, engine)
    try:
        await node.start()
    except Exception as exc:
        await node.stop()
        if "Address already in use" in str(exc):
            raise CliError(f"port {args.port} is in use: pick another with --port") from None
        if isinstance(exc, OSError) or type(exc).__name__ == "NonUniqueNameException":
            raise CliError(f"mDNS could not start ({exc}); use --no-mdns with --peer "
                           "HOST:PORT, or --interface IP") from None
        raise
    api = None
    if args.http_port is not None:
        from dwarfmesh.ui.api import ApiServer
        own = args.host if args.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        api = ApiServer(f"{own}:{node.transport.port}", key=key, host=args.http_host,
                        port=args.http_port, api_key=args.api_key,
                        cors_origins=args.cors_origin, allow_hosts=args.http_allow_host)
        try:
            await api.start()
        except OSError as exc:
            await node.stop()
            raise CliError(f"cannot serve HTTP on port {args.http_port}: {exc.strerror}; pick "
                           "another with --http-port") from None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, node._stopped.set)
    try:
        await node.serve_forever()
    finally:
        log.info("stopping node %s", args.name)
        if api is not None:
            await api.close()
        await node.stop()


def exit_now() -> None:
    """Leave at once, once the node has stopped (sessions ended, sockets closed) and the
    logs are flushed. The model thread is not joined and the interpreter's teardown is
    skipped: tearing mlx's thread state down there raced, and a node that had served
    peers aborted now and then ("terminate called without an active exception", exit
    134; 4 of 12 stops measured, 0 of 24 since)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
