"""Speculative rounds against plain rounds: the same mesh, the same prompts, one run.

    .venv/bin/python bench/speculate.py                                   # the defaults
    .venv/bin/python bench/speculate.py --systems qwen2.5-coder-0.5b+qwen2.5-coder-1.5b \\
        --humaneval 8 --fortunes 4 --max-tokens 96 --speculate auto 4 \\
        --json bench/results/speculate.json

A system is models joined by `+` (one node each on this machine: `--engine auto`, so
llama.cpp on a CPU-only one); a model named twice is two copies. For every prompt the
plain answer and each `--speculate` setting answer in turn, in an order that rotates from
prompt to prompt (so a slow spell of the shared machine does not fall on one setting).
A setting is `auto` or N drafted tokens a round, drafted by prompt lookup (and, under
auto, by a member where the measured costs say it pays), or `member:auto` / `member:N`:
the fastest member drafts greedily. Per setting: decode tokens/s (the summary's, first
token excluded), the ratio to plain on the same prompt with a bootstrap 95% interval of
the median, tokens per round, the drafted tokens accepted, wire bytes per token, and
whether the token ids are the plain answer's (`mismatches`: answers that differ
anywhere; the goal is 0).

Prompts: HumanEval's first N problems in the bench's fixed order (code), and N passages
of the fortunes files (prose), each answered greedily.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import speed  # noqa: E402
from bench.humaneval_problems import STOPS, load_problems, subset  # noqa: E402
from bench.texts import default_text_files, make_documents  # noqa: E402
from dwarfmesh.wire.protocol import GenParams  # noqa: E402

OUT_DIR = ROOT / "bench" / "out" / "speculate"
BOOTSTRAP = 2000


def prompts(n_code: int, n_prose: int) -> list[dict]:
    out = []
    if n_code:
        problems = load_problems()
        for task in subset(problems, n_code):
            out.append({"kind": "humaneval", "id": task, "prompt": problems[task]["prompt"],
                        "stop": list(STOPS)})
    if n_prose:
        docs = make_documents(default_text_files(), max_bytes=n_prose * 400, doc_bytes=400,
                              prompt_bytes=300)
        for i, d in enumerate(docs[:n_prose]):
            out.append({"kind": "fortunes", "id": f"{Path(d.file).name}#{i}",
                        "prompt": d.prompt, "stop": []})
    return out


def setting_name(gamma: int, drafter: str = "auto") -> str:
    name = {0: "off", -1: "auto"}.get(gamma, str(gamma))
    return name if drafter == "auto" or gamma == 0 else f"{drafter}:{name}"


def parse_setting(text: str) -> tuple[int, str]:
    """"auto", "N", "member:auto", "member:N", "lookup:N" -> (gamma, drafter)."""
    drafter, _, gamma = text.rpartition(":")
    drafter = drafter or "auto"
    if drafter not in ("auto", "lookup", "member"):
        raise ValueError(text)
    g = -1 if gamma == "auto" else int(gamma)
    if g == 0 or g < -1 or g > 16:
        raise ValueError(text)
    return g, drafter


def run_system(models: list[str], items: list[dict], gammas: list[tuple[int, str]],
               args) -> dict:
    settings = [(0, "auto"), *gammas]
    rows: list[dict] = []
    work = OUT_DIR / time.strftime("%Y%m%d-%H%M%S") / "+".join(models)
    node_args = ["--engine", args.engine] + (["--no-repack"] if args.no_repack else [])
    with speed.running_mesh(models, work_dir=work, node_args=node_args) as addrs:
        speed.answer(addrs[0], items[0]["prompt"], GenParams(
            mode="stream", max_tokens=8))     # warm-up
        for n, item in enumerate(items):
            order = settings[n % len(settings):] + settings[:n % len(settings)]
            got = {}
            for g in order:
                params = GenParams(mode="stream", max_tokens=args.max_tokens, temperature=0.0,
                                   stop=item["stop"], speculate=g[0], drafter=g[1])
                got[g] = speed.answer(addrs[0], item["prompt"], params)
            for g in settings:
                s = got[g]
                spec = s.get("speculate") or {}
                rows.append({
                    "kind": item["kind"], "id": item["id"], "speculate": setting_name(*g),
                    "drafters": spec.get("drafters"),
                    "member_drafter": spec.get("member_drafter"),
                    "tokens": s["steps"], "tokens_per_s": s["tokens_per_s"],
                    "wire_bytes_per_token": s["wire_bytes_per_token"],
                    "same_as_plain": s["token_ids"] == got[0, "auto"]["token_ids"],
                    "first_difference": _first_difference(s["token_ids"],
                                                          got[0, "auto"]["token_ids"]),
                    "rounds": spec.get("rounds"), "drafted": spec.get("drafted"),
                    "accepted": spec.get("accepted"),
                    "tokens_per_round": spec.get("tokens_per_round"),
                    "loadavg_1min": s["loadavg_1min"]})
            print(f"  {item['id']}: " + ", ".join(
                f"{setting_name(*g)} {got[g]['tokens_per_s']:.2f} tok/s" for g in settings),
                flush=True)
    return {"models": models, "rows": rows, "summary": summarize(rows, settings)}


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _median_ci(x: np.ndarray, rng: np.random.Generator) -> list[float]:
    if len(x) < 2:
        return [float(np.median(x))] * 2 if len(x) else [float("nan")] * 2
    boots = np.median(rng.choice(x, size=(BOOTSTRAP, len(x))), axis=1)
    return [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]


def summarize(rows: list[dict], settings: list[tuple[int, str]]) -> dict:
    """Per setting and prompt kind (and all): speed-up over plain on the same prompt."""
    rng = np.random.default_rng(0)
    out: dict[str, dict] = {}
    plain = {(r["kind"], r["id"]): r for r in rows if r["speculate"] == "off"}
    for g in settings:
        name = setting_name(*g)
        for kind in ("all", *sorted({r["kind"] for r in rows})):
            mine = [r for r in rows if r["speculate"] == name and kind in ("all", r["kind"])]
            if not mine:
                continue
            ratio = np.array([r["tokens_per_s"] / plain[(r["kind"], r["id"])]["tokens_per_s"]
                              for r in mine])
            drafted = sum(r["drafted"] or 0 for r in mine)
            out.setdefault(name, {})[kind] = {
                "prompts": len(mine),
                "tokens_per_s_median": float(np.median([r["tokens_per_s"] for r in mine])),
                "speedup_median": float(np.median(ratio)),
                "speedup_ci95": _median_ci(ratio, rng),
                "tokens_per_round": (sum(r["tokens"] for r in mine)
                                     / max(sum(r["rounds"] or r["tokens"] for r in mine), 1)),
                "acceptance": (sum(r["accepted"] or 0 for r in mine) / drafted
                               if drafted else None),
                "wire_bytes_per_token_median": float(np.median(
                    [r["wire_bytes_per_token"] for r in mine])),
                "mismatches": sum(not r["same_as_plain"] for r in mine)}
    return out


def forward_costs(model: str, engine: str, repack: bool, repeat: int = 15) -> dict:
    """One engine in this process, nothing else running: the median time of a forward over
    1, 2, 5 and 9 positions (what a round with 0, 1, 4, 8 drafted tokens costs a member),
    and whether the log-probs after each of 5 positions forwarded together are those of
    5 forwards of one token."""
    from dwarfmesh.engine.choose import make_engine

    e = make_engine(model, engine, pull=True, repack=repack)[0]
    e.load_sync()
    try:
        b = e.backend
        prompt = e.encode("def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n")
        e.open_sync("costs", prompt, 64)
        cache = e._sessions["costs"].cache
        toks = [int(t) for t in prompt[:5]]
        one = []
        for t in toks:
            one.append(b.forward(cache, [t])[0])
        b.trim(cache, len(toks))
        together = b.forward_all(cache, toks)
        b.trim(cache, len(toks))
        out = {"model": model, "engine": e.engine_name, "repack": repack,
               "max_abs_logprob_difference": float(max(
                   np.abs(a - c).max() for a, c in zip(one, together))), "forward_ms": {}}
        for n in (1, 2, 5, 9):
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                b.forward_all(cache, toks[:1] * n)
                times.append(time.perf_counter() - t0)
                b.trim(cache, n)
            out["forward_ms"][str(n)] = round(float(np.median(times)) * 1000.0, 2)
        return out
    finally:
        e.shutdown(wait=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--systems", nargs="+", default=[
        "qwen2.5-coder-0.5b+qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b+qwen2.5-coder-0.5b"],
        help="models joined by + (default: the same-tokenizer pair, two copies of the 0.5B)")
    ap.add_argument("--humaneval", type=int, default=8, metavar="N",
                    help="HumanEval prompts, in the bench's fixed order (default 8)")
    ap.add_argument("--fortunes", type=int, default=4, metavar="N",
                    help="passages of the fortunes files (default 4)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--speculate", nargs="+", default=["auto", "4"],
                    metavar="[DRAFTER:]auto|N",
                    help="settings to compare with plain rounds (default: auto 4); "
                    "member:N or member:auto has the fastest member draft, lookup:N prompt "
                    "lookup only")
    ap.add_argument("--engine", default="auto", choices=["auto", "mlx", "llamacpp"])
    ap.add_argument("--no-repack", action="store_true",
                    help="nodes run `--no-repack` (llama.cpp: drafted forwards exact)")
    ap.add_argument("--forward-costs", nargs="+", default=None, metavar="MODEL",
                    help="instead: each model's forward over 1, 2, 5, 9 positions in this "
                         "process (on --engine; llama.cpp with and without repacking)")
    ap.add_argument("--json", type=Path, default=None, metavar="OUT",
                    help="write the results here (e.g. bench/results/speculate.json)")
    args = ap.parse_args(argv)
    try:
        args.gammas = [parse_setting(s) for s in args.speculate]
    except ValueError:
        ap.error("--speculate takes [auto|lookup|member:]auto or 1 to 16 (plain rounds "
                 "always run)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.forward_costs:
        from dwarfmesh.engine.choose import choose

        costs = []
        for model in args.forward_costs:
            kind = choose(args.engine, model)[0]
            for repack in ((True, False) if kind == "llamacpp" else (True,)):
                costs.append(forward_costs(model, args.engine, repack))
                print(json.dumps(costs[-1]), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"command": "bench/speculate.py " + " ".join(
                sys.argv[1:]), "forward_costs": costs}, indent=1))
        return 0
    items = prompts(args.humaneval, args.fortunes)
    result = {"command": "bench/speculate.py " + " ".join(sys.argv[1:]),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "max_tokens": args.max_tokens,
              "engine": args.engine, "no_repack": args.no_repack,
              "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
              "prompts": [{k: v for k, v in p.items() if k != "prompt"} for p in items],
              "systems": {}}
    for spec in args.systems:
        print(f"{spec}:", flush=True)
        try:
            result["systems"][spec] = run_system(spec.split("+"), items, args.gammas, args)
        except RuntimeError as e:
            print(f"{spec}: {e}", file=sys.stderr)
            return 1
        for name, kinds in result["systems"][spec]["summary"].items():
            a = kinds["all"]
            print(f"  {name:>4}: {a['tokens_per_s_median']:.2f} tok/s, x{a['speedup_median']:.2f} "
                  f"[{a['speedup_ci95'][0]:.2f}, {a['speedup_ci95'][1]:.2f}], "
                  f"{a['tokens_per_round']:.2f} tokens/round, mismatches {a['mismatches']}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
