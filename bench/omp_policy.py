"""libgomp's wait policy for a llama.cpp node: one-node meshes on each policy, interleaved.

    .venv/bin/python bench/omp_policy.py --models smollm2-135m,qwen2.5-coder-0.5b \\
        --json bench/results/omp_policy.json

Each variant sets the environment a node process starts with (the node leaves libgomp's
default alone unless told): PASSIVE (threads sleep at once), ACTIVE (they spin without
bound), ACTIVE with GOMP_SPINCOUNT 10^4 / 10^5, and libgomp's own default (a bounded spin).
Owns this comparison only; a node is run by `bench.engines.one_node`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engines import one_node  # noqa: E402

VARIANTS = {
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "active_spin_1e4": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "10000"},
    "active_spin_1e5": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "100000"},
    "default": {},
}
KEYS = ("tokens_per_s", "forward_p50_ms", "step_p50_ms", "handoff_ms_per_token",
        "client_inter_token_p50_ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", default="/tmp/bench-omp")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out: dict = {"command": " ".join(sys.argv), "runs": {}}
    for rep in range(args.repeat):
        for name in args.models.split(","):
            for variant, env in VARIANTS.items():
                os.environ.clear()
                os.environ.update(base)
                os.environ.update(env)
                r = one_node(name, "llamacpp", args.tokens,
                             Path(args.work) / f"{name}-{variant}-{rep}")
                out["runs"].setdefault(name, {}).setdefault(variant, []).append(
                    {k: r[k] for k in KEYS})
                print(name, variant, rep, {k: round(r[k], 2) for k in KEYS}, flush=True)
    text = json.dumps(out, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
