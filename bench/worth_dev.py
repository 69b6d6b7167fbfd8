#!/usr/bin/env python3
"""Where the worth policy's gate is chosen: each model's prompt NLL per byte on the
development problems (`bench/devcode.py`, never HumanEval), over the strongest model's
on the same prompt.

    .venv/bin/python bench/worth_dev.py --json bench/results/worth_dev.json

The NLL per byte is computed as a select member computes its strength (the engine's
text session over the raw prompt: `TextSessions.open`, -log P / UTF-8 bytes), on the
engine a node would pick here. Prints, per model, the quantiles of its excess over the
best model on each prompt, and how many prompts each candidate `GATE_RATIO` would bench
it on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):                      # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.devcode import load_devcode  # noqa: E402

MODELS = ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "gemma-3-270m", "smollm2-135m")
CANDIDATE_RATIOS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


def strengths(model: str, prompts: list[str]) -> list[float]:
    """The model's prompt NLL per byte of each prompt, as a select member reports it."""
    from dwarfmesh.engine.choose import make_engine

    engine, _ = make_engine(model)
    engine.load_sync()
    out = []
    try:
        for i, prompt in enumerate(prompts):
            got = engine.text.open(f"dev{i}", prompt, False)
            out.append(-got.logp / got.nbytes)
            engine.close_sync(f"dev{i}")
    finally:
        engine.shutdown(wait=True)
    return out


def summarise(table: dict[str, list[float]]) -> dict:
    nll = np.array([table[m] for m in table])            # [models, prompts]
    excess = nll / nll.min(axis=0) - 1.0
    models = list(table)
    return {
        "prompts": nll.shape[1],
        "nll_per_byte_median": {m: float(np.median(nll[i])) for i, m in enumerate(models)},
        "excess_over_best": {m: {"min": float(excess[i].min()),
                                 "median": float(np.median(excess[i])),
                                 "p90": float(np.percentile(excess[i], 90)),
                                 "max": float(excess[i].max())}
                             for i, m in enumerate(models)},
        "benched_prompts_by_ratio": {str(r): {m: int((excess[i] > r).sum())
                                              for i, m in enumerate(models)}
                                     for r in CANDIDATE_RATIOS},
        "per_prompt_nll_per_byte": {m: [round(v, 4) for v in table[m]] for m in models},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/worth_dev.py", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--json", type=Path, help="write the summary here")
    args = p.parse_args(argv)
    problems = load_devcode()
    prompts = [problems[t]["prompt"] for t in problems]
    report = summarise({m: strengths(m, prompts) for m in args.models})
    brief = {k: v for k, v in report.items() if k != "per_prompt_nll_per_byte"}
    sys.stdout.write(json.dumps(brief, indent=1) + "\n")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
