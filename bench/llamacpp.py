"""The single-model peer: the same GGUF decoded by llama.cpp (llama-cpp-python), same machine.

dwarfmesh imports a GGUF into an mlx-lm directory and runs it in float32 on the CPU;
llama.cpp runs the GGUF's quantized weights as they are. Both decode the same prompt
greedily for the same number of tokens with every core of the machine; the ratio of
their decode speeds (tokens after the first, per second) is the figure. When
llama-cpp-python is not importable or a model has no GGUF, the result says exactly why.

Owns the llama.cpp run; no mesh, no mlx. `decode_speed` runs in a fresh process of its
own (`python bench/llamacpp.py GGUF PROMPT TOKENS THREADS`), as a user runs llama.cpp: in
the bench's process, dwarfmesh's OpenBLAS preload and mlx's threads would share the cores
with llama.cpp's and slow it down (measured: 4 vs 44 tok/s on SmolLM2-135M).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

WARMUP_PROMPT = "Hello"


def gguf_for(spec: str) -> Path | None:
    """The GGUF a model spec was converted from: a pulled short name's, or the file itself."""
    from dwarfmesh.models import registry as dm_models

    if spec.lower().endswith(".gguf") and Path(spec).is_file():
        return Path(spec)
    if spec in dm_models.SHORT_NAMES:
        path = dm_models.gguf_path_for(spec)
        return path if path.is_file() else None
    return None


def decode_speed(gguf: Path, prompt: str, max_tokens: int, *,
                 threads: int | None = None) -> dict:
    """Greedy decode of `prompt` for `max_tokens` tokens, in a fresh process: tokens/s,
    TTFT, the token ids (or {"error": why})."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, str(Path(__file__).resolve()), str(gguf), prompt, str(max_tokens),
           str(threads or 0)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        return {"error": f"llama.cpp run failed: {out.stderr.strip()[-500:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _decode_speed_here(gguf: Path, prompt: str, max_tokens: int, *,
                       threads: int | None = None) -> dict:
    try:
        import llama_cpp
    except ImportError as e:
        return {"error": f"llama-cpp-python is not importable ({e}); build it with "
                         "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install llama-cpp-python"}
    threads = threads or os.cpu_count() or 1
    t_load = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=4096, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t_load
    eos = llm.token_eos()

    def run(text: str, n: int) -> tuple[list[int], list[float], float]:
        llm.reset()                     # no prefix reuse between runs: TTFT includes prefill
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        toks, stamps = [], []
        t0 = time.perf_counter()
        for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                repeat_penalty=1.0, reset=True):
            if tok == eos:
                break
            toks.append(int(tok))
            stamps.append(time.perf_counter())
            if len(toks) >= n:
                break
        return toks, stamps, t0

    run(WARMUP_PROMPT, 4)
    toks, stamps, t0 = run(prompt, max_tokens)
    decode_s = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    gaps = np.diff(stamps) * 1000.0
    return {
        "gguf": str(gguf),
        "gguf_bytes": gguf.stat().st_size,
        "llama_cpp_version": getattr(llama_cpp, "__version__", "?"),
        "threads": threads,
        "load_s": load_s,
        "steps": len(toks),
        "ttft_ms": (stamps[0] - t0) * 1000.0 if stamps else None,
        "tokens_per_s": (len(toks) - 1) / decode_s if decode_s > 0 else None,
        "inter_token_p50_ms": float(np.percentile(gaps, 50)) if len(gaps) else None,
        "inter_token_p95_ms": float(np.percentile(gaps, 95)) if len(gaps) else None,
        "token_ids": toks,
        "loadavg_1min": os.getloadavg()[0],
    }


def peer(spec: str, prompt: str, max_tokens: int, mine: dict | None) -> dict:
    """llama.cpp on the GGUF of `spec`, against dwarfmesh's single-node result `mine`."""
    gguf = gguf_for(spec)
    if gguf is None:
        return {"error": f"no GGUF for {spec!r} (only pulled short names and .gguf files "
                         "have one): nothing for llama.cpp to run"}
    res = decode_speed(gguf, prompt, max_tokens)
    if "error" in res or not mine or not mine.get("tokens_per_s") or not res["tokens_per_s"]:
        return res
    res["dwarfmesh_single_tokens_per_s"] = mine["tokens_per_s"]
    res["dwarfmesh_over_llama_cpp"] = mine["tokens_per_s"] / res["tokens_per_s"]
    # The same ratio from the median time between tokens on both sides: robust to the
    # bursts of other work on a shared machine that skew a mean.
    ours_p50 = mine.get("client", {}).get("inter_token_p50_ms")
    if ours_p50 and res["inter_token_p50_ms"]:
        res["dwarfmesh_over_llama_cpp_p50"] = res["inter_token_p50_ms"] / ours_p50
    same = 0
    for a, b in zip(mine.get("token_ids", []), res["token_ids"]):
        if a != b:
            break
        same += 1
    res["same_leading_tokens_as_dwarfmesh"] = same
    return res


if __name__ == "__main__":            # decode_speed's own process
    import json
    import sys

    _gguf, _prompt, _tokens, _threads = sys.argv[1:5]
    print(json.dumps(_decode_speed_here(Path(_gguf), _prompt, int(_tokens),
                                        threads=int(_threads) or None)))
