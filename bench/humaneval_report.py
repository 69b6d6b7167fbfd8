"""HumanEval results (the JSON dict) → derived figures, rich tables, a PNG plot.

`summarise` is pure: from each system's per-problem records it derives pass@1 with its
95% Wilson interval, cost (wall time per problem, tokens/s, tokens, wire bytes per
token), every pair's paired comparison (exact McNemar), and for each ensemble: its best
member on the same problems, the problems a member solves and the ensemble does not (with
both completions, to show where it loses), and its time over its slowest member's. Only
`print_report` (the terminal) and `plot` (the PNG) do I/O.
"""

from __future__ import annotations

import statistics
from itertools import combinations
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.humaneval_stats import paired, wilson_interval

TOTAL_PROBLEMS = 164
LOSS_EXAMPLES = 5
EXAMPLE_CHARS = 600
ANCHORS = {   # Qwen2.5-Coder technical report, HumanEval pass@1 (%), instruct models
    "qwen2.5-coder-0.5b": 61.6,
    "qwen2.5-coder-1.5b": 70.7,
}
ANCHOR_NOTE = ("published: Qwen2.5-Coder technical report (arXiv 2409.12186), instruct models "
               "in bf16 with their chat template (the model writes the whole function from an "
               "instruction). Ours: the registry's Q4_K_M GGUF (run as it is on llama.cpp, or "
               "its float32 import on mlx: `systems.NAME.engine`), the plain "
               "completion protocol (no chat template: the instruct model continues the "
               "prompt as code), greedy, stop strings, a max-token limit; the quick runs use "
               "a subset. Each of these moves the figure.")


def _cost(records: list[dict]) -> dict:
    gen = [r for r in records if "wall_s" in r]
    if not gen:
        return {}
    wall = [r["wall_s"] for r in gen]
    tokens = sum(r.get("tokens") or 0 for r in gen)
    nbytes = sum(r.get("bytes") or 0 for r in gen)
    decode = [r["tokens_per_s"] for r in gen if r.get("tokens_per_s")]
    return {
        "generation_s": round(sum(wall), 1),
        "wall_s_per_problem_mean": sum(wall) / len(wall),
        "wall_s_per_problem_median": statistics.median(wall),
        "tokens_generated": tokens,
        "tokens_per_problem_mean": tokens / len(gen),
        # end to end, prefill included; `decode_tokens_per_s_median` is the session's own
        "tokens_per_s": tokens / sum(wall) if sum(wall) > 0 else None,
        "decode_tokens_per_s_median": statistics.median(decode) if decode else None,
        "ms_per_byte_of_completion": 1000.0 * sum(wall) / nbytes if nbytes else None,
        "wire_bytes_per_token": (sum(r.get("wire_bytes") or 0 for r in gen) / tokens
                                 if tokens else None),
        "finish_reasons": _count(r.get("finish_reason") for r in gen),
        "modes": _count(r.get("mode") for r in gen),
        "hit_max_tokens": sum(1 for r in gen if r.get("finish_reason") == "length"),
    }


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def _system_figures(entry: dict) -> dict:
    results = entry.get("results", {})
    n = len(results)
    passed = sum(1 for r in results.values() if r["passed"])
    lo, hi = wilson_interval(passed, n)
    models = entry.get("models") or []
    return {
        "pass_at_1": passed / n if n else None, "passed": passed, "problems": n,
        "interval_95": [lo, hi], "interval_method": "Wilson score",
        "partial": n < TOTAL_PROBLEMS,
        "per_problem": {t: bool(results[t]["passed"]) for t in sorted(results)},
        "statuses": _count(r["status"] for r in results.values()),
        "problems_missing_a_member": sum(1 for r in results.values()
                                         if len(models) > 1
                                         and r.get("members_kept", len(models)) < len(models)),
        "cost": _cost(list(results.values())),
    }


def _ensemble(name: str, systems: dict) -> dict | None:
    """The ensemble `name` against its members alone, on the problems all of them ran."""
    entry = systems[name]
    members = [m for m in entry.get("models") or [] if m in systems]
    if len(entry.get("models") or []) < 2 or not members:
        return None
    res = entry["results"]
    common = set(res)
    for m in members:
        common &= set(systems[m]["results"])
    if not common:
        return {"members_run": members, "common_problems": 0}
    per = {s: {t: bool(systems[s]["results"][t]["passed"]) for t in common}
           for s in [name, *members]}
    best = max(members, key=lambda m: (sum(per[m].values()), m))
    losses = [t for t in sorted(common) if not per[name][t]
              and any(per[m][t] for m in members)]
    wall = {s: sum(systems[s]["results"][t].get("wall_s", 0.0) for t in common)
            for s in [name, *members]}
    slowest = max(members, key=lambda m: wall[m])
    return {
        "members_run": members, "members_missing": sorted(set(entry["models"]) - set(members)),
        "common_problems": len(common), "best_member": best,
        "vs_best_member": paired(per[name], per[best]),
        "vs_members": {m: paired(per[name], per[m]) for m in members},
        "time_over_slowest_member": wall[name] / wall[slowest] if wall[slowest] else None,
        "slowest_member": slowest,
        "time_s_on_common_problems": {s: round(w, 1) for s, w in wall.items()},
        "losses": [{"task_id": t, "ensemble": _short(res[t]),
                    **{m: _short(systems[m]["results"][t]) for m in members
                       if per[m][t]}} for t in losses[:LOSS_EXAMPLES]],
        "losses_total": len(losses),
    }


def _short(record: dict) -> dict:
    return {"completion": record.get("completion", "")[:EXAMPLE_CHARS],
            "status": record.get("status"), "detail": record.get("detail", "")[:200]}


def summarise(data: dict) -> dict:
    """The file's data with every derived figure recomputed from the records."""
    systems = data.get("systems", {})
    for entry in systems.values():
        entry.update(_system_figures(entry))
    data["partial"] = any(e["problems"] < TOTAL_PROBLEMS for e in systems.values())
    data["comparisons"] = {
        f"{a} vs {b}": paired(systems[a]["per_problem"], systems[b]["per_problem"])
        for a, b in combinations(sorted(systems), 2)}
    data["ensembles"] = {n: e for n in sorted(systems) if (e := _ensemble(n, systems))}
    data["anchors"] = {"pass_at_1_percent": ANCHORS, "note": ANCHOR_NOTE}
    return data


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _f(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def systems_table(data: dict) -> Table:
    t = Table(title="HumanEval pass@1" + (" (partial: a subset)" if data.get("partial") else ""))
    for col in ("system", "problems", "passed", "pass@1 %", "95% interval", "published %",
                "s/problem", "tokens/s", "tokens", "wire B/token", "× slowest member"):
        t.add_column(col, justify="left" if col == "system" else "right")
    for name, e in data["systems"].items():
        c = e.get("cost", {})
        lo, hi = e["interval_95"]
        ens = data.get("ensembles", {}).get(name, {})
        anchor = ANCHORS.get(name)
        t.add_row(name, str(e["problems"]), str(e["passed"]), _pct(e["pass_at_1"]),
                  f"{_pct(lo)}–{_pct(hi)}", _f(anchor, ".1f"),
                  _f(c.get("wall_s_per_problem_mean"), ".1f"), _f(c.get("tokens_per_s"), ".2f"),
                  _f(c.get("tokens_generated"), "d"), _f(c.get("wire_bytes_per_token"), ".0f"),
                  _f(ens.get("time_over_slowest_member"), ".2f"))
    return t


def differences_table(data: dict) -> Table:
    t = Table(title="Where systems differ (paired, on the problems both ran; exact McNemar)")
    for col in ("A vs B", "problems", "both", "neither", "only A", "only B", "p"):
        t.add_column(col, justify="left" if col == "A vs B" else "right")
    for pair, d in data["comparisons"].items():
        t.add_row(pair, str(d["problems"]), str(d["both"]), str(d["neither"]),
                  str(len(d["only_a"])), str(len(d["only_b"])), f"{d['p_value']:.3g}")
    return t


def markdown(data: dict) -> str:
    """The systems and differences tables as markdown (for the README and review)."""
    rows = ["| system | problems | passed | pass@1 % | 95% interval | s/problem | tokens/s | "
            "tokens | wire B/token | × slowest member |", "|---" * 10 + "|"]
    for name, e in data["systems"].items():
        c, ens = e.get("cost", {}), data.get("ensembles", {}).get(name, {})
        lo, hi = e["interval_95"]
        rows.append(f"| `{name}` | {e['problems']} | {e['passed']} | {_pct(e['pass_at_1'])} | "
                    f"{_pct(lo)}–{_pct(hi)} | {_f(c.get('wall_s_per_problem_mean'), '.1f')} | "
                    f"{_f(c.get('tokens_per_s'), '.2f')} | {_f(c.get('tokens_generated'), 'd')} "
                    f"| {_f(c.get('wire_bytes_per_token'), '.0f')} | "
                    f"{_f(ens.get('time_over_slowest_member'), '.2f')} |")
    rows += ["", "| A vs B | problems | both | neither | only A | only B | p (exact McNemar) |",
             "|---|---|---|---|---|---|---|"]
    for pair, d in data["comparisons"].items():
        rows.append(f"| {pair} | {d['problems']} | {d['both']} | {d['neither']} | "
                    f"{len(d['only_a'])} | {len(d['only_b'])} | {d['p_value']:.3g} |")
    return "\n".join(rows) + "\n"


def print_report(data: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(systems_table(data))
    if data["comparisons"]:
        console.print(differences_table(data))
    for name, e in data.get("ensembles", {}).items():
        if not e.get("common_problems"):
            continue
        vs = e["vs_best_member"]
        console.print(f"{name}: vs its best member {e['best_member']} on "
                      f"{e['common_problems']} problems: {len(vs['only_a'])} only the ensemble, "
                      f"{len(vs['only_b'])} only the member (p = {vs['p_value']:.3g}); "
                      f"{e['losses_total']} problem(s) a member solves and it does not"
                      + (f": {', '.join(x['task_id'] for x in e['losses'])}"
                         if e["losses"] else ""))
    console.print(f"[dim]{ANCHOR_NOTE}")


def plot(data: dict, out: Path) -> str | None:
    """pass@1 per system with its 95% interval, published anchors beside; None if written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    names = list(data["systems"])
    if not names:
        return "no systems to plot"
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names) + 2), 4.5))
    vals = [100 * (data["systems"][n]["pass_at_1"] or 0) for n in names]
    lo = [max(v - 100 * data["systems"][n]["interval_95"][0], 0.0) for v, n in zip(vals, names)]
    hi = [max(100 * data["systems"][n]["interval_95"][1] - v, 0.0) for v, n in zip(vals, names)]
    xs = range(len(names))
    ax.bar(xs, vals, yerr=[lo, hi], capsize=4, color="#4c72b0", label="ours (95% Wilson)")
    anchored = [(i, ANCHORS[n]) for i, n in enumerate(names) if n in ANCHORS]
    if anchored:
        ax.scatter([i for i, _ in anchored], [a for _, a in anchored], marker="D",
                   color="#dd8452", zorder=3, label="published (bf16, chat protocol)")
    for i, n in enumerate(names):
        ax.text(i, 1, f"n={data['systems'][n]['problems']}", ha="center", fontsize=8,
                color="#222222")
    ax.set_xticks(list(xs), [n.replace("+", "+\n") for n in names], fontsize=7)
    ax.set_ylabel("pass@1 %")
    ax.set_ylim(0, 100)
    ax.set_title("HumanEval pass@1" + (" — partial (subset)" if data.get("partial") else ""))
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return None
