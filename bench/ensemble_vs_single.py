#!/usr/bin/env python3
"""What an ensemble is worth against each of its members alone: quality and speed.

    .venv/bin/python bench/ensemble_vs_single.py --quick
    .venv/bin/python bench/ensemble_vs_single.py --models qwen2.5-coder-0.5b qwen2.5-coder-1.5b \\
        --text my.txt --max-bytes 20000 --json out.json --plot out.png

1. Quality (`bench/quality.py`): held-out bits per byte, teacher-forced, of every member
   and of the ensemble exactly as the mesh fuses (weights, pool, frame size); members
   with different tokenizers get the exact mixture over stable units of text
   (`bench/quality_text.py`).
2. Speed (`bench/speed.py`): greedy generation through real `dwarfmesh node` processes
   on 127.0.0.1, all members (id fusion; for mixed tokenizers rank and fuse mode, per
   committed byte), then each model alone as a one-node mesh.
3. Peer (`bench/llamacpp.py`): the same GGUF through llama.cpp on the same machine.

Writes the JSON (every figure and the configuration), a markdown copy of the tables next
to it, the PNG plot, and prints rich tables. This script is the only place that prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):                      # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dwarfmesh  # noqa: E402,F401  (OpenBLAS preload before mlx)
from dwarfmesh.config import (  # noqa: E402
    DEFAULT_TOP_K,
    MAX_TOP_K,
    ONLINE_ALPHA,
    ONLINE_ETA,
    PERPLEXITY_TAU,
    TEXT_ONLINE_ALPHA,
    TEXT_ONLINE_ETA,
)

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "out"
DEFAULT_MODELS = ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
FULL = {"max_bytes": 24000, "speed_tokens": 128}
QUICK = {"max_bytes": 4000, "speed_tokens": 24}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/ensemble_vs_single.py",
        description="Ensemble vs single model: held-out bits per byte (each member, the "
                    "ensemble as the mesh fuses, top-k frame vs full vocabulary, equal / "
                    "perplexity / online weights), speed through real node processes "
                    "(ensemble and one-node meshes), and llama.cpp on the same GGUF.")
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="M",
                   help="model specs, as `dwarfmesh node --model` takes them (pulled if needed; "
                        "default: %(default)s)")
    p.add_argument("--text", action="append", type=Path, default=None, metavar="FILE",
                   help="text to score (repeatable); default: every Debian fortunes file")
    p.add_argument("--max-bytes", type=int, default=None,
                   help=f"scored bytes in all (default {FULL['max_bytes']}, "
                        f"--quick {QUICK['max_bytes']})")
    p.add_argument("--doc-bytes", type=int, default=2000,
                   help="scored bytes per document (default %(default)s)")
    p.add_argument("--prompt-bytes", type=int, default=500,
                   help="bytes of prompt before each document: context and the source of the "
                        "perplexity weights, never scored (default %(default)s)")
    p.add_argument("--k", type=int, default=DEFAULT_TOP_K,
                   help="top-k frame size (default %(default)s)")
    p.add_argument("--weights", choices=["online", "equal", "perplexity"], default="online",
                   help="the weighting `ensemble.bpb` and the speed run use (online = the mesh "
                        "default: perplexity prior, Bayesian updates with fixed share; default "
                        "%(default)s)")
    p.add_argument("--fuse", choices=["linear", "loglinear"], default="linear",
                   help="the pool `ensemble.bpb` and the speed run use (default %(default)s)")
    p.add_argument("--modes", nargs="+", choices=["auto", "stream", "fuse", "rank", "select"],
                   default=None,
                   help="session modes the ensemble is timed in (default: stream, i.e. "
                        "id-level fusion, for one tokenizer; rank and fuse for mixed "
                        "tokenizers)")
    p.add_argument("--speed-tokens", type=int, default=None,
                   help=f"greedy tokens per speed run (default {FULL['speed_tokens']}, "
                        f"--quick {QUICK['speed_tokens']})")
    p.add_argument("--json", type=Path, default=OUT_DIR / "ensemble_vs_single.json",
                   metavar="OUT", help="the JSON result; a .md with the tables goes beside it "
                        "(default bench/out/ensemble_vs_single.json)")
    p.add_argument("--plot", type=Path, default=OUT_DIR / "ensemble_vs_single.png",
                   metavar="OUT.png",
                   help="the PNG plot (default bench/out/ensemble_vs_single.png)")
    p.add_argument("--quick", action="store_true",
                   help="small text and few tokens: a few minutes on a 2-core CPU")
    p.add_argument("--skip-speed", action="store_true", help="quality only")
    p.add_argument("--skip-quality", action="store_true", help="speed only")
    p.add_argument("--skip-llama-cpp", action="store_true", help="no llama.cpp peer run")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.max_bytes = args.max_bytes or preset["max_bytes"]
    args.speed_tokens = args.speed_tokens or preset["speed_tokens"]
    if not 1 <= args.k <= MAX_TOP_K:
        p.error(f"--k must be in 1..{MAX_TOP_K}")
    if min(args.max_bytes, args.doc_bytes, args.prompt_bytes, args.speed_tokens) < 1:
        p.error("sizes must be positive")
    return args


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("+uncommitted" if dirty else "") if out.returncode == 0 else None


def _names(specs: list[str]) -> dict[str, str]:
    """Display name -> spec; the same model twice gets `#2`."""
    from dwarfmesh.models.registry import model_id
    out: dict[str, str] = {}
    for spec in specs:
        name = base = model_id(spec)
        i = 2
        while name in out:
            name, i = f"{base}#{i}", i + 1
        out[name] = spec
    return out


def _mixed(result: dict, paths: dict[str, str]) -> bool:
    """Do the members use more than one tokenizer (so the mesh works by text)?"""
    tokenizers = result["config"].get("tokenizers")
    if tokenizers is None:
        from mlx_lm.utils import load_tokenizer

        from dwarfmesh.engine import tokenizer_fingerprint
        tokenizers = {n: tokenizer_fingerprint(load_tokenizer(Path(p)))
                      for n, p in paths.items()}
    return len(set(tokenizers.values())) > 1


def run(args: argparse.Namespace, console) -> dict:
    from bench import llamacpp, quality, report, speed, texts
    from dwarfmesh.models.registry import resolve_model
    from dwarfmesh.wire.protocol import GenParams

    specs = _names(args.models)
    paths = {n: str(resolve_model(s, pull=True)) for n, s in specs.items()}
    files = args.text or texts.default_text_files()
    docs = texts.make_documents(files, max_bytes=args.max_bytes, doc_bytes=args.doc_bytes,
                                prompt_bytes=args.prompt_bytes)
    result: dict = {"config": {
        "models": {n: {"spec": specs[n], "path": paths[n]} for n in specs},
        "k": args.k, "weights": args.weights, "fuse": args.fuse, "quick": args.quick,
        "modes": args.modes,
        "max_bytes": args.max_bytes, "doc_bytes": args.doc_bytes,
        "prompt_bytes": args.prompt_bytes, "speed_tokens": args.speed_tokens,
        "texts": [d.describe() for d in docs],
        "online_eta": ONLINE_ETA, "online_alpha": ONLINE_ALPHA, "perplexity_tau": PERPLEXITY_TAU,
        "text_online_eta": TEXT_ONLINE_ETA, "text_online_alpha": TEXT_ONLINE_ALPHA,
        "tuned_on": "nothing here: the mesh's own constants (the text sessions' were chosen on "
                    "dev text from files this bench does not score, bench/tune_text_weights."
                    "py); perplexity weights and the online prior come from each document's "
                    "prompt, which is never scored",
        "git_commit": _git_commit(), "argv": sys.argv[1:],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg_at_start": os.getloadavg()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }}
    failed = False
    if not args.skip_quality:
        with console.status("scoring the text with every member ..."):
            result["quality"] = quality.score_in_child(paths, docs, k=args.k,
                                                       weights=args.weights, fuse=args.fuse)
        result["config"]["tokenizers"] = result["quality"].pop("tokenizers")
        result["config"]["vocab_sizes"] = result["quality"].pop("vocab_sizes")
        # float32 on the CPU: the bytes of weights each decode step reads
        result["config"]["parameters"] = result["quality"].pop("parameters")
    if not args.skip_speed:
        params = GenParams(mode="stream", max_tokens=args.speed_tokens, top_k=args.k,
                           weights=args.weights, fuse=args.fuse)
        prompt = docs[0].prompt
        sp: dict = {"max_tokens": args.speed_tokens, "top_k": args.k,
                    "weights": args.weights, "fuse": args.fuse, "single": {}}
        result["speed"] = sp
        peers = result["llama_cpp"] = {} if not args.skip_llama_cpp else None
        # node logs: git-ignored whatever --json says, one directory per run
        work = OUT_DIR / "nodes" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        sp["node_logs"] = str(work)
        modes = args.modes or (["rank", "fuse"] if _mixed(result, paths) else ["stream"])
        sp["modes"] = {}
        try:
            for mode in modes if len(paths) > 1 else []:
                with console.status(f"timing the ensemble ({mode} mode) through node "
                                    "processes ..."):
                    sp["modes"][mode] = speed.measure_ensemble(
                        paths, prompt, dataclasses.replace(params, mode=mode),
                        work_dir=work / mode)
                sp.setdefault("ensemble", sp["modes"][mode])
            # Each model alone, then llama.cpp on its GGUF right after: the machine's load
            # changes over minutes, so the pair is measured as close together as it can be.
            for name, path in paths.items():
                with console.status(f"timing {name} alone (one-node mesh) ..."):
                    sp["single"][name] = speed.measure_single(name, path, prompt, params,
                                                              work_dir=work)
                if peers is not None:
                    with console.status(f"timing {name} through llama.cpp ..."):
                        peers[name] = llamacpp.peer(specs[name], prompt, args.speed_tokens,
                                                    sp["single"][name])
        except (RuntimeError, OSError) as e:
            sp["error"] = str(e)
            failed = True
        sp["derived"] = speed.compare(sp)
    result["goals"] = report.goals(result)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["config"]["machine"]["loadavg_at_end"] = os.getloadavg()
    result["failed"] = failed
    return result


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from bench import report

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
    result = run(args, console)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    if "quality" in result:
        args.json.with_suffix(".md").write_text(report.markdown(result))
    report.print_report(result, console)
    why_not = report.plot(result, args.plot) if "quality" in result else "needs the quality run"
    console.print(f"JSON: {args.json}" + (f"\nplot: {args.plot}" if why_not is None
                                          else f"\nno plot: {why_not}"))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
