"""The session core's own cost per token, without the network or a model.

    .venv/bin/python bench/core_overhead.py --json bench/results/core_overhead.json

Three real nodes in one process (`tests/inproc.py`: dispatch, router, tables, rounds,
fusion, commit, the origin's stream; messages encoded and decoded by the real protocol)
answer on the real engine over a scripted model (`tests/scripted.py`: a function of the
ids, microseconds a step). What is left of a step is the mesh's own work: the wall time
per committed token, for an id session and a speculative one. Run it in two checkouts
(the same scripted model copied into an older one) to see what a change to the session
code costs, without the noise of model forwards on shared cores.

Owns nothing but the timing loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

TREE = Path.cwd()            # the checkout whose package and tests are measured
sys.path[:0] = [str(TREE), str(TREE / "tests")]

from inproc import Net, P  # noqa: E402  (the protocol module of the measured checkout)
from scripted import scripted_engine  # noqa: E402

GenParams = P.GenParams

PROMPT = "def quicksort(xs):\n"


def one_answer(tokens: int, speculate: int) -> float:
    """Seconds per committed token of one answer by three scripted nodes."""
    engines = [scripted_engine() for _ in range(3)]
    try:
        net = Net(engines)
        params = GenParams(mode="stream", max_tokens=tokens, weights="equal", speculate=speculate)

        async def go() -> P.End:
            net.generate("node1", P.Generate("bench", PROMPT, params, [], "bench"))
            return await asyncio.wait_for(net.end(600), 600)
        t0 = time.perf_counter()
        end = asyncio.run(go())
        took = time.perf_counter() - t0
        assert isinstance(end, P.End) and end.summary["steps"] == tokens, end
        return took / tokens
    finally:
        for e in engines:
            e.shutdown(wait=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=400, help="tokens an answer (default 400)")
    p.add_argument("--answers", type=int, default=7, help="answers a kind (default 7)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args()
    import dwarfmesh
    out: dict = {"package": dwarfmesh.__file__, "tokens": args.tokens, "answers": args.answers,
                 "command": ["bench/core_overhead.py", *sys.argv[1:]]}
    for kind, speculate in (("ids", 0), ("speculate_4", 4)):
        try:
            runs = [one_answer(args.tokens, speculate) * 1000.0 for _ in range(args.answers)]
        except TypeError:            # a checkout from before speculative rounds
            continue
        out[kind] = {"ms_per_token_median": statistics.median(runs), "ms_per_token": runs}
        print(f"{kind:12} {statistics.median(runs):.3f} ms a token "
              f"(runs {', '.join(f'{r:.3f}' for r in runs)})")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
