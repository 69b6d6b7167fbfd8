"""One bench result (the JSON dict) → goals, rich tables, a markdown table, a PNG plot.

Pure functions of the result, except `plot` (writes the PNG; matplotlib is optional:
`pip install matplotlib`, the `bench` extra) and `print_report` (the terminal).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from rich.console import Console
from rich.table import Table

OVERHEAD_SHARE_GOAL = 0.05          # mesh overhead ≤ 5% of the slowest member's forward
OVERHEAD_MS_GOAL = 1.0              # ... and ≤ 1 ms per token on loopback
WIRE_BYTES_GOAL = 512               # per node per token at k = 64
MIXED_GAIN_GOAL = -0.04             # mixed tokenizers: ensemble ≥ 4% below the best member


def _goal(value, target: str, met, note: str = "") -> dict:
    return {"value": value, "target": target, "met": met, "note": note}


def goals(result: dict) -> dict:
    """Where each goal of the issue stands, from the figures alone."""
    out: dict = {}
    ens = result.get("quality", {}).get("ensemble", {})
    if ens.get("bpb") is not None and "method" in ens:      # different tokenizers
        out["ensemble_bpb_below_best_member"] = _goal(
            ens["vs_best_member"], f"<= {MIXED_GAIN_GOAL:.0%} (relative to the best member's "
            "BPB; mixed tokenizers)", ens["vs_best_member"] <= MIXED_GAIN_GOAL,
            f"mixture over {ens['units']} units, {ens['weights']} weights")
    elif ens.get("bpb") is not None:
        out["ensemble_bpb_below_best_member"] = _goal(
            ens["vs_best_member"], "< 0 (relative to the best member's BPB)",
            ens["vs_best_member"] < 0, f"{ens['fuse']} pool, {ens['weights']} weights")
    sp = result.get("speed", {})
    der = sp.get("derived") or {}
    if sp.get("ensemble"):
        ens_sp = sp["ensemble"]
        out["ensemble_kept_every_member"] = _goal(
            len(ens_sp.get("members") or []), f"= {len(result['config']['models'])}",
            not ens_sp.get("error"), _short(ens_sp.get("error", ""), 60))
    for mode in list(der.get("modes") or {})[1:]:          # the first is `ensemble`
        ens_sp = sp["modes"][mode]
        out[f"ensemble_kept_every_member/{mode}"] = _goal(
            len(ens_sp.get("members") or []), f"= {len(result['config']['models'])}",
            not ens_sp.get("error"), _short(ens_sp.get("error", ""), 60))
    if "rank_over_fuse_ms_per_byte" in der:
        m = der["modes"]
        out["rank_cost_per_byte_vs_fuse"] = _goal(
            der["rank_over_fuse_ms_per_byte"], "stated (rank ms per committed byte / fuse's)",
            None, f"rank {_f(m['rank']['client_ms_per_byte'], '.0f')} ms/B, fuse "
                  f"{_f(m['fuse']['client_ms_per_byte'], '.0f')} ms/B; wire "
                  f"{_f(m['rank']['wire_bytes_per_byte'], '.0f')} vs "
                  f"{_f(m['fuse']['wire_bytes_per_byte'], '.0f')} B/B")
    if der and not der.get("error") and "mesh_overhead_ms_per_token" in der:
        share, ms = der["mesh_overhead_share_of_slowest_forward"], der["mesh_overhead_ms_per_token"]
        out["mesh_overhead_share"] = _goal(share, f"<= {OVERHEAD_SHARE_GOAL:.0%}",
                                           share is not None and share <= OVERHEAD_SHARE_GOAL)
        single = der.get("single_node_overhead_ms_per_token")
        out["mesh_overhead_ms"] = _goal(
            ms, f"<= {OVERHEAD_MS_GOAL} ms/token", ms <= OVERHEAD_MS_GOAL,
            "loopback; the same loop with one node: " + _f(single, ".2f") + " ms")
        k = result["config"]["k"]
        out["wire_bytes_per_node_per_token"] = _goal(
            der["wire_bytes_per_node_per_token"], f"<= {WIRE_BYTES_GOAL} B at k=64",
            der["wire_bytes_per_node_per_token"] <= WIRE_BYTES_GOAL if k == 64 else None,
            f"measured at k={k}")
    for name, r in (result.get("llama_cpp") or {}).items():
        ratio = r.get("dwarfmesh_over_llama_cpp_p50")
        mean = r.get("dwarfmesh_over_llama_cpp")
        note = r.get("error") or f"from mean tokens/s: {_f(mean, '.3g')}"
        out[f"single_node_vs_llama_cpp/{name}"] = _goal(
            ratio, ">= 1.0 (dwarfmesh speed over llama.cpp's, p50 time between tokens)",
            None if ratio is None else ratio >= 1.0, _short(note))
    return out


def _short(text: str, n: int = 48) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _f(x, fmt: str = ".4f") -> str:
    return "—" if x is None else format(x, fmt)


def quality_rows(q: dict) -> list[tuple[str, str, str, str]]:
    """(what, full-vocabulary BPB, top-k frame BPB, note) rows."""
    rows = []
    ens = q.get("ensemble", {})
    mixed = "method" in ens
    best_name = ens.get("best_member", q.get("best_member"))
    for name, m in q.get("members", {}).items():
        best = " (best member)" if name == best_name else ""
        note = f"{m['outside_topk_rate']:.1%} of tokens outside its top-k{best}"
        if mixed:
            note += f"; {_f(m['bpb'])} tokenizing prompt and text apart"
        rows.append((f"{name} alone", _f(m["bpb_text"] if mixed else m["bpb"]),
                     _f(m["bpb_topk"]), note))
    if ens.get("bpb") is None:
        rows.append(("ensemble", "—", "—", ens.get("reason", "")))
        return rows
    if mixed:
        return rows + _mixed_rows(ens)
    for pool, kinds in ens["variants"].items():
        for kind, v in kinds.items():
            mark = " ← ensemble.bpb" if (pool, kind) == (ens["fuse"], ens["weights"]) else ""
            rows.append((f"ensemble {pool}, {kind} weights", _f(v["bpb"]), _f(v["bpb_topk"]),
                         mark.strip()))
    rows.append(("per-token oracle (reference, not a method)",
                 _f(ens["oracle_per_token_bpb"]), "", ""))
    return rows + _per_document_row(ens)


def _mixed_rows(ens: dict) -> list[tuple[str, str, str, str]]:
    chosen = f" (η {ens['online_eta']:g}, α {ens['online_alpha']:g}: chosen on dev text)"
    rows = [(f"ensemble, mixture over units, {kind}" + ("" if "," in kind else " weights")
             + (chosen if kind == ens["weights"] else ""),
             _f(v["bpb"]), "",
             f"{v['vs_best_member']:+.2%} vs best member"
             + (" ← ensemble.bpb" if kind == ens["weights"] else ""))
            for kind, v in ens["variants"].items()]
    grid = [v["vs_best_member"] for v in ens["sensitivity"].values()]
    rows.append((f"  η × α grid ({len(grid)} settings; sensitivity on this text, not tuning)",
                 "", "",
                 f"{min(grid):+.2%} … {max(grid):+.2%} vs best member"))
    rows.append(("per-unit oracle (reference, not a method)", _f(ens["oracle_per_unit_bpb"]),
                 "", f"{ens['units']} units, {ens['bytes_per_unit']:.1f} bytes each; "
                     f"{ens['improper_units']} with p > 1"))
    rows += _per_document_row(ens)
    return rows


def _per_document_row(ens: dict) -> list[tuple[str, str, str, str]]:
    pd = ens.get("vs_best_member_per_document")
    if not pd:
        return []
    lo, hi = pd["bootstrap_ci95"]
    return [(f"ensemble.bpb − best member, over {pd['documents']} documents",
             f"{pd['bpb_difference']:+.4f}", "",
             f"better in {pd['ensemble_better_in']} of {pd['documents']}; "
             f"bootstrap 95% interval [{lo:+.4f}, {hi:+.4f}]")]


def speed_rows(result: dict) -> list[tuple[str, ...]]:
    """(run, tokens/s, TTFT ms, client p50/p95 ms between tokens, step p50, slowest forward,
    round trip, fusion, wire B per node per token) rows."""
    rows = []
    sp = result.get("speed", {})
    ens = sp.get("ensemble")
    if ens and ens.get("mode") not in (None, "fuse-ids"):
        ens = None                         # text-level modes: text_speed_rows
    runs = [("ensemble (all members)" if not ens.get("error") else
             "ensemble — LOST MEMBERS, not an ensemble's figures", ens)] if ens else []
    runs += [(f"{n} alone (1-node mesh)", r) for n, r in sp.get("single", {}).items()]
    for label, r in runs:
        t, c = r["timing_ms"], r["client"]
        rows.append((label, _f(r["tokens_per_s"], ".2f"), _f(c["ttft_ms"], ".0f"),
                     f"{_f(c['inter_token_p50_ms'], '.1f')} / {_f(c['inter_token_p95_ms'], '.1f')}",
                     _f(t["step_p50"], ".1f"), _f(t["slowest_forward_p50"], ".1f"),
                     _f(t["overhead_p50"], ".2f"), _f(t["fusion_p50"], ".2f"),
                     _f(r["frame_bytes_per_member_per_token"], ".0f")
                     if label.startswith("ensemble") else "—"))
    for name, r in (result.get("llama_cpp") or {}).items():
        if "error" in r:
            rows.append((f"{name} llama.cpp: not run ({_short(r['error'])})",
                         *["—"] * (len(SPEED_HEADER) - 1)))
        else:
            rows.append((f"{name} llama.cpp ({r['threads']} threads)",
                         _f(r["tokens_per_s"], ".2f"), _f(r["ttft_ms"], ".0f"),
                         f"{_f(r['inter_token_p50_ms'], '.1f')} / "
                         f"{_f(r['inter_token_p95_ms'], '.1f')}",
                         "—", "—", "—", "—", "—"))
    return rows


def text_speed_rows(result: dict) -> list[tuple[str, ...]]:
    """Text-level modes (mixed tokenizers) and each member alone, per committed byte."""
    sp = result.get("speed", {})
    der = sp.get("derived") or {}
    rows = []
    for mode, d in (der.get("modes") or {}).items():
        if "error" in d:
            rows.append((f"ensemble, {mode} mode: LOST MEMBERS ({_short(d['error'])})",
                         *["—"] * (len(TEXT_SPEED_HEADER) - 1)))
            continue
        r = d["round_ms"]
        rows.append((f"ensemble, {mode} mode ({d['session']})", _f(d["client_ms_per_byte"], ".3g"),
                     _f(d["ms_per_committed_byte"], ".3g"), _f(d["bytes_per_round"], ".1f"),
                     _f(r["step_p50"], ".0f"), _f(r.get("propose"), ".0f"),
                     _f(r.get("score"), ".0f"), _f(r.get("frame"), ".0f"),
                     _f(r["slowest_forward_p50"], ".0f"), _f(d["wire_bytes_per_byte"], ".0f")))
    for name, r in sp.get("single", {}).items():
        rows.append((f"{name} alone (1-node mesh)", _f(r["client"]["ms_per_byte"], ".3g"),
                     *["—"] * (len(TEXT_SPEED_HEADER) - 2)))
    return rows


TEXT_SPEED_HEADER = ("run", "ms/byte (client)", "ms/byte (leader)", "bytes/round",
                     "round ms", "propose ms", "score ms", "frame ms", "slowest forward ms",
                     "wire B/byte")
TEXT_SPEED_CAPTION = ("per committed byte after the first piece; a round = one commit; "
                      "propose / score / frame: p50 time the leader waits for every member's "
                      "answer (includes their re-sync to the last commit)")


def _speed_tables(result: dict) -> list[tuple[tuple[str, ...], list[tuple[str, ...]], str]]:
    """(header, rows, caption) for each speed table this result has."""
    out = []
    ids = speed_rows(result)
    if ids:
        out.append((SPEED_HEADER, ids, SPEED_CAPTION))
    if (result.get("speed", {}).get("derived") or {}).get("modes"):
        out.append((TEXT_SPEED_HEADER, text_speed_rows(result), TEXT_SPEED_CAPTION))
    return out


SPEED_HEADER = ("run", "tokens/s", "TTFT ms", "between tokens p50/p95 ms", "step ms",
                "slowest forward ms", "round trip ms", "fusion ms", "B/node/token")
SPEED_CAPTION = ("step, forward, round trip, fusion: p50 per token at the leader; "
                 "between tokens: as the client sees the text arrive")


def markdown(result: dict) -> str:
    """The tables the README shows."""
    lines = ["| | BPB, full vocabulary | BPB, top-k frame only | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |"
              for a, b, c, d in quality_rows(result.get("quality", {}))]
    for header, rows, caption in _speed_tables(result):
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += ["", f"_{caption}._"]
    lines += ["", "| goal | value | target | met |", "|---|---|---|---|"]
    for name, g in result.get("goals", {}).items():
        v = g["value"]
        lines.append(f"| {name} | {_f(v, '.4g') if isinstance(v, float) else v} | "
                     f"{g['target']} | {g['met']} |")
    return "\n".join(lines) + "\n"


def print_report(result: dict, console: Console | None = None) -> None:
    console = console or Console()
    scored = result.get("quality", {}).get("scored_bytes", 0)
    q = Table(title=f"Bits per byte on {scored:,} held-out "
                    f"bytes (k={result['config']['k']})")
    for col in ("", "full vocabulary", "top-k frame only", ""):
        q.add_column(col)
    for row in quality_rows(result.get("quality", {})):
        q.add_row(*row)
    console.print(q)
    for header, rows, caption in _speed_tables(result):
        s = Table(title=f"Speed: {result.get('speed', {}).get('max_tokens', '?')} greedy "
                        "tokens", caption=caption)
        for col in header:
            s.add_column(col)
        for row in rows:
            s.add_row(*row)
        console.print(s)
    g = Table(title="Goals")
    for col in ("goal", "value", "target", "met", "note"):
        g.add_column(col)
    for name, v in result.get("goals", {}).items():
        val = v["value"]
        g.add_row(name, _f(val, ".4g") if isinstance(val, float) else str(val), v["target"],
                  {True: "[green]yes", False: "[red]no", None: "n/a"}[v["met"]], v["note"])
    console.print(g)


def plot(result: dict, out: Path) -> str | None:
    """BPB per member vs ensemble variants; ms per token stacked by component. None or why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    timed = bool(result.get("speed", {}).get("single"))
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(13 if timed else 7, 5.2),
                             squeeze=False)
    ax1 = axes[0][0]
    rows = [r for r in quality_rows(result.get("quality", {}))
            if r[1] not in ("—", "") and not r[0].startswith("ensemble.bpb")]
    labels = [r[0] for r in rows][::-1]
    full = [float(r[1]) for r in rows][::-1]
    topk = [float(r[2]) if r[2] else float("nan") for r in rows][::-1]
    y = range(len(labels))
    ax1.barh([i + 0.2 for i in y], full, height=0.4, label="full vocabulary (exact)")
    ax1.barh([i - 0.2 for i in y], topk, height=0.4, label=f"top-k frame only "
                                                           f"(k={result['config']['k']})")
    ax1.set_yticks(list(y), labels, fontsize=8)
    ax1.set_xlabel("bits per byte (lower is better)")
    lo = min(full + [v for v in topk if v == v])
    ax1.set_xlim(left=max(lo * 0.9, 0))
    ax1.legend(fontsize=8, loc="lower right")
    ax1.set_title("Quality, held-out text")
    if timed:
        _plot_speed(axes[0][1], result)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return None


def _plot_text_speed(ax2, result: dict) -> None:
    rows = [r for r in text_speed_rows(result) if r[1] != "—"]
    names = [textwrap.fill(r[0].replace(" (1-node mesh)", "").replace("ensemble, ", ""), 11)
             for r in rows]
    ms = [float(r[1]) for r in rows]
    ax2.bar(names, ms, color=["C1" if r[0].startswith("ensemble") else "C0" for r in rows])
    for x, v in enumerate(ms):
        ax2.annotate(f"{v:.0f} ms", (x, v), ha="center", va="bottom", fontsize=7)
    ax2.margins(y=0.15)
    ax2.set_ylabel("ms per byte of answer (client, p50 run)")
    ax2.set_title("Cost per byte of answer (members share the cores)")
    ax2.tick_params(axis="x", labelsize=7)


def _plot_speed(ax2, result: dict) -> None:
    sp = result.get("speed", {})
    if (sp.get("derived") or {}).get("modes"):
        return _plot_text_speed(ax2, result)
    ens = sp.get("ensemble")
    runs = [("ensemble" + (" (LOST MEMBERS)" if ens.get("error") else ""), ens)] if ens else []
    runs += [(f"{n} alone", r) for n, r in sp.get("single", {}).items()]
    names = [textwrap.fill(n, 16) for n, _ in runs]
    fwd = [r["timing_ms"]["slowest_forward_p50"] for _, r in runs]
    rtt = [r["timing_ms"]["overhead_p50"] for _, r in runs]
    fus = [r["timing_ms"]["fusion_p50"] for _, r in runs]
    ax2.bar(names, fwd, label="slowest member's forward")
    ax2.bar(names, rtt, bottom=fwd, label="round trip + bookkeeping")
    ax2.bar(names, fus, bottom=[a + b for a, b in zip(fwd, rtt)], label="fusion")
    for x, (a, b, c) in enumerate(zip(fwd, rtt, fus)):
        ax2.annotate(f"{a + b + c:.0f} ms\n(+{b + c:.1f} ms\nnot forward)", (x, a + b + c),
                     ha="center", va="bottom", fontsize=7)
    for name, r in (result.get("llama_cpp") or {}).items():
        if r.get("inter_token_p50_ms"):
            ms = r["inter_token_p50_ms"]
            label = textwrap.fill(f"{name} llama.cpp", 16)
            ax2.bar(label, ms, color="grey", label="llama.cpp decode (whole step)")
            ax2.annotate(f"{ms:.0f} ms", (label, ms), ha="center", va="bottom", fontsize=7)
    ax2.margins(y=0.15)
    ax2.set_ylabel("ms per token (p50)")
    ax2.set_title("Time per decode step (members share the CPU cores)")
    ax2.tick_params(axis="x", labelsize=7)
    handles, labels2 = ax2.get_legend_handles_labels()
    uniq = dict(zip(labels2, handles))
    ax2.legend(uniq.values(), uniq.keys(), fontsize=8)
