"""The two engines on the same GGUF, measured in one run: speed, overhead, memory, agreement.

For each model (a pulled short name):

- llama.cpp alone (`bench.llamacpp.decode_speed`, llama-cpp-python's own generate loop)
  against a one-node mesh on each engine (`dwarfmesh node --engine llamacpp|mlx`, answered
  through `MeshClient.generate`), greedy, the same prompt, token count and thread count;
  the figure is the decode tokens/s ratio mesh(llama.cpp engine) / llama.cpp alone.
- the mesh's overhead per token with one node (leader step minus its engine's forward,
  plus fusion: the hand-off to the engine thread and the session loop);
- the peak resident memory of each node process (VmHWM), float32 mlx import vs GGUF;
- with --agreement: both engines in this process, a greedy run on mlx with the llama.cpp
  engine fed the same tokens; the share of steps whose top-1 ids are equal;
- with --pairs: an ensemble on the llama.cpp engine (id fusion, online weights) beside
  each of its members alone, and its speed over its slowest member's.

With --repeat N every measurement runs N times, interleaved (llama.cpp alone, then each
node), so that a burst of other work on a shared machine hits both sides; the figures
are the median runs, and every run's tokens/s is kept beside them.

Owns this comparison only; nodes are started by `bench.speed.running_mesh`.

    .venv/bin/python bench/engines.py \
        --models smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b:llamacpp \
        --agreement smollm2-135m --json bench/results/engines.json
    .venv/bin/python bench/engines.py --repeat 3 \
        --models smollm2-135m,qwen2.5-coder-0.5b:llamacpp,qwen2.5-coder-1.5b:llamacpp \
        --pairs qwen2.5-coder-0.5b+qwen2.5-coder-1.5b --agreement smollm2-135m \
        --json bench/results/engines_quiet.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import llamacpp  # noqa: E402
from bench.speed import running_mesh, timed_generate  # noqa: E402
from dwarfmesh.models import registry as models  # noqa: E402
from dwarfmesh.wire.protocol import GenParams  # noqa: E402

log = logging.getLogger("bench.engines")
PROMPT = "def quicksort(xs):"


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def one_node(name: str, engine: str, tokens: int, work: Path) -> dict:
    """One node on `engine` answering PROMPT greedily; its summary, client timings, memory."""
    peaks: dict[str, float | None] = {}

    def before_stop(procs) -> None:
        peaks["node"] = peak_rss_mb(procs[0].pid)

    params = GenParams(mode="stream", max_tokens=tokens, temperature=0.0, weights="equal")
    with running_mesh([name], work_dir=work / f"{name}-{engine}",
                      node_args=["--engine", engine], before_stop=before_stop) as addrs:
        out = timed_generate(addrs[0], PROMPT, params)
    t = out["timing_ms"]
    return {
        "tokens_per_s": out["tokens_per_s"],
        "steps": out["steps"],
        "client_inter_token_p50_ms": out["client"]["inter_token_p50_ms"],
        "step_p50_ms": t["step_p50"],
        "forward_p50_ms": t["slowest_forward_p50"],
        "overhead_ms_per_token": t["overhead_p50"] + t["fusion_p50"],
        "handoff_ms_per_token": t["overhead_p50"],
        "fusion_ms_per_token": t["fusion_p50"],
        "peak_rss_mb": peaks.get("node"),
        "token_ids": out["token_ids"],
        "loadavg_1min": out["loadavg_1min"],
    }


def ensemble(names: list[str], tokens: int, work: Path, repeat: int) -> dict:
    """One node per model on the llama.cpp engine, fused by id with online weights: its
    tokens/s beside each member's alone (one-node meshes), interleaved runs, medians."""
    params = GenParams(mode="stream", max_tokens=tokens, temperature=0.0, weights="online")
    runs: list[dict] = []
    alone: dict[str, list[float]] = {n: [] for n in names}
    for r in range(max(1, repeat)):
        with running_mesh(names, work_dir=work / f"pair-{r}",
                          node_args=["--engine", "llamacpp"]) as addrs:
            out = timed_generate(addrs[0], PROMPT, params)
        runs.append({"tokens_per_s": out["tokens_per_s"], "members": out.get("members"),
                     "step_p50_ms": out["timing_ms"]["step_p50"],
                     "slowest_forward_p50_ms": out["timing_ms"]["slowest_forward_p50"]})
        for n in names:
            alone[n].append(one_node(n, "llamacpp", tokens, work / f"pair-{r}")
                            ["tokens_per_s"])
        log.info("%s: %.2f tok/s; alone %s", "+".join(names), runs[-1]["tokens_per_s"],
                 {n: round(v[-1], 2) for n, v in alone.items()})
    med = median_run(runs)
    slowest = min(sorted(v)[(len(v) - 1) // 2] for v in alone.values())
    return {"engine": "llamacpp", "weights": "online", **med,
            "runs_tokens_per_s": [r["tokens_per_s"] for r in runs],
            "alone_tokens_per_s": {n: sorted(v)[(len(v) - 1) // 2] for n, v in alone.items()},
            "alone_runs_tokens_per_s": alone,
            "ensemble_over_slowest_member": med["tokens_per_s"] / slowest}


def median_run(runs: list[dict]) -> dict:
    """The run whose tokens/s is the median (the lower middle one for an even count)."""
    ok = [r for r in runs if r.get("tokens_per_s")]
    if not ok:
        return dict(runs[0])
    return dict(sorted(ok, key=lambda r: r["tokens_per_s"])[(len(ok) - 1) // 2])


def agreement(name: str, tokens: int) -> dict:
    """Top-1 agreement of the two engines' frames along mlx's greedy run."""
    from dwarfmesh.engine.choose import make_engine

    mlx, lcp = (make_engine(name, e, pull=False)[0] for e in ("mlx", "llamacpp"))
    mlx.load_sync()
    lcp.load_sync()
    try:
        ids = mlx.encode(PROMPT)
        a, b = mlx.open_sync("a", ids, 64), lcp.open_sync("a", ids, 64)
        same, steps, worst = 0, 0, 0.0
        for _ in range(tokens):
            steps += 1
            same += int(a.ids[0] == b.ids[0])
            tok = int(a.ids[0])
            if tok in mlx.eos_ids:
                break
            a, b = mlx.step_sync("a", tok, 64), lcp.step_sync("a", tok, 64)
            worst = max(worst, abs(a.prev_logp - b.prev_logp))
        return {"steps": steps, "top1_equal": same, "top1_agreement": same / steps,
                "max_abs_diff_logp_of_committed": worst,
                "fingerprint_mlx": mlx.fingerprint, "fingerprint_llamacpp": lcp.fingerprint}
    finally:
        mlx.shutdown()
        lcp.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--engines", default="llamacpp,mlx")
    ap.add_argument("--agreement", default="", help="models to check top-1 agreement on")
    ap.add_argument("--agreement-tokens", type=int, default=200)
    ap.add_argument("--pairs", default="",
                    help="ensembles to time on the llama.cpp engine, e.g. "
                         "qwen2.5-coder-0.5b+qwen2.5-coder-1.5b (comma-separated)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of llama.cpp alone and of each node, interleaved; the figures "
                         "are their medians, every run's tokens/s is kept beside them")
    ap.add_argument("--work", default="/tmp/bench-engines")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from dwarfmesh.engine.llamacpp_backend import physical_cores

    threads = physical_cores()
    result: dict = {"command": " ".join(sys.argv), "prompt": PROMPT, "tokens": args.tokens,
                    # the nodes set PASSIVE themselves; llama.cpp alone here runs with this
                    "omp_wait_policy_llama_cpp_alone": os.environ.get("OMP_WAIT_POLICY"),
                    "threads": threads, "cpu_count": os.cpu_count(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "models": {}}
    for spec in [m for m in args.models.split(",") if m]:
        name, _, only = spec.partition(":")      # name:llamacpp runs that engine only
        engines = only.split("+") if only else args.engines.split(",")
        gguf = models.gguf_path_for(name)
        if not gguf.is_file():
            result["models"][name] = {"error": f"{name} is not pulled (dwarfmesh pull {name})"}
            continue
        res: dict = {"gguf_bytes": gguf.stat().st_size}
        alone_runs: list[dict] = []
        node_runs: dict[str, list[dict]] = {e: [] for e in engines}
        for _ in range(max(1, args.repeat)):       # interleaved: drift hits both sides
            alone_runs.append(llamacpp.decode_speed(gguf, PROMPT, args.tokens,
                                                    threads=threads))
            for engine in engines:
                node_runs[engine].append(one_node(name, engine, args.tokens, Path(args.work)))
                log.info("%s on %s: %.1f tok/s (llama.cpp alone %s)", name, engine,
                         node_runs[engine][-1]["tokens_per_s"],
                         alone_runs[-1].get("tokens_per_s"))
        alone = median_run(alone_runs)
        res["llama_cpp_alone"] = {k: alone.get(k) for k in
                                  ("tokens_per_s", "inter_token_p50_ms", "steps", "threads",
                                   "llama_cpp_version", "error", "token_ids")}
        res["llama_cpp_alone"]["runs_tokens_per_s"] = [r.get("tokens_per_s")
                                                       for r in alone_runs]
        for engine in engines:
            res[f"node_{engine}"] = median_run(node_runs[engine])
            res[f"node_{engine}"]["runs_tokens_per_s"] = [r["tokens_per_s"]
                                                          for r in node_runs[engine]]
        if "llamacpp" in node_runs and all(r.get("tokens_per_s") for r in alone_runs):
            res["mesh_llamacpp_over_llama_cpp_alone_runs"] = [
                n["tokens_per_s"] / a["tokens_per_s"]
                for n, a in zip(node_runs["llamacpp"], alone_runs)]
        lc = res.get("node_llamacpp")
        if lc and alone.get("tokens_per_s"):
            res["mesh_llamacpp_over_llama_cpp_alone"] = lc["tokens_per_s"] / alone["tokens_per_s"]
            res["same_tokens_as_llama_cpp_alone"] = lc["token_ids"] == alone["token_ids"]
        if lc and res.get("node_mlx"):
            res["llamacpp_engine_over_mlx_engine"] = (lc["tokens_per_s"]
                                                      / res["node_mlx"]["tokens_per_s"])
        for v in res.values():
            if isinstance(v, dict):
                v.pop("token_ids", None)
        result["models"][name] = res
    for pair in [p for p in args.pairs.split(",") if p]:
        result.setdefault("pairs", {})[pair] = ensemble(pair.split("+"), args.tokens,
                                                        Path(args.work), args.repeat)
    for name in [m for m in args.agreement.split(",") if m]:
        result["models"].setdefault(name, {})["agreement"] = agreement(
            name, args.agreement_tokens)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
