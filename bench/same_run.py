"""Two commits' speed, measured in one run: does a change slow the mesh down?

    .venv/bin/python bench/same_run.py --base 9d4d94d --rounds 3 \\
        --json bench/results/same_run.json

checks `--base` out into a temporary git worktree and runs the speed half of
`bench/ensemble_vs_single.py` there and here, alternately (base, this tree, base, ...),
so both meet the same load on a shared machine; then it sets each figure's median beside
the other's: the mesh's own overhead per token in an id session (step minus the slowest
member's forward, plus fusion), the same with one node, and rank mode's ms per committed
byte. Every run's figures are in the JSON too: the spread between rounds is the noise.

Arguments after `--` go to ensemble_vs_single.py instead of the default (two copies of
Qwen2.5-Coder-0.5B, `--modes fuse rank`: fuse is the id path for one tokenizer in every
version; 64 tokens, no quality run, no llama.cpp peer).
Owns the alternation and the comparison; measures nothing itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARGS = ["--skip-quality", "--skip-llama-cpp", "--models", "qwen2.5-coder-0.5b",
                "qwen2.5-coder-0.5b", "--modes", "fuse", "rank", "--speed-tokens", "64"]


def figures(result: dict) -> dict[str, float | None]:
    sp = result.get("speed", {})
    derived, modes = sp.get("derived", {}), sp.get("modes", {})
    out: dict[str, float | None] = {
        "mesh_overhead_ms_per_token": derived.get("mesh_overhead_ms_per_token"),
        "single_node_overhead_ms_per_token": derived.get("single_node_overhead_ms_per_token"),
    }
    for mode, r in modes.items():
        if isinstance(r, dict) and "timing_ms" in r:
            out[f"{mode}_step_p50_ms"] = r["timing_ms"].get("step_p50")
            if r.get("ms_per_byte") is not None:
                out[f"{mode}_ms_per_byte"] = r["ms_per_byte"]
    return out


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def _run(tree: Path, bench_args: list[str], out: Path) -> dict:
    # The tree's own package: `python -m dwarfmesh` nodes import it from their working
    # directory, and the bench puts its tree first on sys.path.
    cmd = [sys.executable, "bench/ensemble_vs_single.py", *bench_args, "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"bench failed in {tree} (rc {proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the commit to compare against")
    p.add_argument("--rounds", type=int, default=3, help="runs of each (default 3)")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "same_run.json",
                   help="where the comparison goes (default: %(default)s)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    bench_args = extra or DEFAULT_ARGS
    head = _git("rev-parse", "HEAD") + ("+uncommitted" if _git("status", "--porcelain")
                                        else "")
    base = _git("rev-parse", args.base)
    runs: dict[str, list[dict]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory(prefix="dwarfmesh-same-run-") as tmp:
        worktree = Path(tmp) / "base"
        _git("worktree", "add", "--detach", str(worktree), base)
        try:
            for i in range(args.rounds):
                for name, tree in (("base", worktree), ("head", ROOT)):
                    t0 = time.monotonic()
                    print(f"round {i + 1}/{args.rounds}: {name} ...", end="", flush=True)
                    result = _run(tree, bench_args, Path(tmp) / f"{name}{i}.json")
                    runs[name].append(figures(result))
                    print(f" {time.monotonic() - t0:.0f}s", flush=True)
        finally:
            _git("worktree", "remove", "--force", str(worktree))
    keys = sorted({k for r in runs["base"] + runs["head"] for k in r})
    median = {name: {k: statistics.median([r[k] for r in rs if r.get(k) is not None])
                     for k in keys if any(r.get(k) is not None for r in rs)}
              for name, rs in runs.items()}
    out = {"base": base, "head": head, "rounds": args.rounds, "bench_args": bench_args,
           "command": ["bench/same_run.py", *sys.argv[1:]], "runs": runs, "median": median,
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"{'figure':40} {'base':>10} {'head':>10}   (median of {args.rounds})")
    for k in keys:
        b, h = (median[n].get(k) for n in ("base", "head"))
        b_text, h_text = ("-" if v is None else f"{v:.2f}" for v in (b, h))
        print(f"{k:40} {b_text:>10} {h_text:>10}")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
