#!/usr/bin/env python3
"""Choose the online weights' constants of text-level sessions on DEV text.

    .venv/bin/python bench/tune_text_weights.py \\
        --models smollm2-135m qwen2.5-coder-0.5b gemma-3-270m \\
        --json bench/results/text_weights_dev.json

The bench (`ensemble_vs_single.py`) scores documents cut from some of the text files
(`bench/texts.py`). This script cuts as many bytes of documents from the OTHER files
(`texts.dev_documents`), runs every member through its own text session
(`quality_text.member_tokens`), and scores the exact mixture over stable units
(`quality_text`) for every (η, α) of a grid, with the perplexity prior from each
document's prompt. The cell with the lowest bits per byte on that dev text is what
`config.TEXT_ONLINE_ETA` / `TEXT_ONLINE_ALPHA` hold, so the bench never reports a figure
on text its constants were chosen on. Prints the grid; writes every figure to --json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):                      # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dwarfmesh  # noqa: E402,F401  (OpenBLAS preload before mlx)
from dwarfmesh.config import TEXT_ONLINE_ALPHA, TEXT_ONLINE_ETA  # noqa: E402

ETAS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
ALPHAS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
MIXED_TRIO = ["smollm2-135m", "qwen2.5-coder-0.5b", "gemma-3-270m"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/tune_text_weights.py",
        description="Choose TEXT_ONLINE_ETA / TEXT_ONLINE_ALPHA (online weights of text-level "
                    "sessions) on dev text: documents from the text files the bench does not "
                    "score, exact mixture over stable units, every cell of an η × α grid.")
    p.add_argument("--models", nargs="+", default=MIXED_TRIO, metavar="M",
                   help="members (short names, .gguf files or mlx-lm dirs; default the mixed "
                        "trio)")
    p.add_argument("--text", nargs="+", type=Path, metavar="FILE",
                   help="text files (default Debian's fortunes, as the bench)")
    p.add_argument("--max-bytes", type=int, default=24000,
                   help="bytes of documents the bench scores, and of dev text (default "
                        "%(default)s, as the bench)")
    p.add_argument("--doc-bytes", type=int, default=2000, help="per document (as the bench)")
    p.add_argument("--prompt-bytes", type=int, default=500, help="per prompt (as the bench)")
    p.add_argument("--json", type=Path, default=Path("bench/out/text_weights_dev.json"),
                   help="where to write the grid (default %(default)s)")
    args = p.parse_args(argv)
    if min(args.max_bytes, args.doc_bytes, args.prompt_bytes) < 1:
        p.error("--max-bytes, --doc-bytes and --prompt-bytes must be positive")
    if len(args.models) < 2:
        p.error("give at least two --models: there is no mixture of one")
    return args


def tune(engines: list, dev: list, etas=ETAS, alphas=ALPHAS) -> dict:
    """Every (eta, alpha) cell's bits per byte on `dev`, and the best cell."""
    from bench import quality_text
    from dwarfmesh.fusion.text import utf8_len

    views = [quality_text.member_tokens(e, dev) for e in engines]
    prepared = quality_text.prepare(engines, views, dev)
    cells = {quality_text.cell(e, a): (e, a) for e in etas for a in alphas}
    scale = math.log(2) * sum(utf8_len(d.text) for d in dev)
    bpb = {k: v / scale for k, v in quality_text.grid_nll(prepared, cells).items()}
    members = {e.model_name: float(-sum(p["lp"][i].sum() for p in prepared) / scale)
               for i, e in enumerate(engines)}
    best_cell = min(bpb, key=bpb.get)
    best_member = min(members.values())
    return {"members": members,
            "grid": {k: {"eta": cells[k][0], "alpha": cells[k][1], "bpb": v,
                         "vs_best_member": (v - best_member) / best_member}
                     for k, v in bpb.items()},
            "best": {"eta": cells[best_cell][0], "alpha": cells[best_cell][1],
                     "bpb": bpb[best_cell],
                     "vs_best_member": (bpb[best_cell] - best_member) / best_member},
            "units": int(sum(p["lp"].shape[1] for p in prepared))}


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from bench import quality_text, texts
    from bench.ensemble_vs_single import _names
    from bench.quality import load_engines
    from dwarfmesh.models.registry import ModelError, resolve_model

    args = parse_args(argv)
    console = Console(stderr=True)
    try:
        paths = {n: str(resolve_model(s, pull=True)) for n, s in _names(args.models).items()}
        files = args.text or texts.default_text_files()
        scored = texts.make_documents(files, max_bytes=args.max_bytes,
                                      doc_bytes=args.doc_bytes, prompt_bytes=args.prompt_bytes)
        dev = texts.dev_documents(files, scored, max_bytes=args.max_bytes,
                                  doc_bytes=args.doc_bytes, prompt_bytes=args.prompt_bytes)
    except (ModelError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    t0 = time.perf_counter()
    with console.status(f"scoring {len(dev)} dev documents with {len(paths)} members ..."):
        result = tune(load_engines(paths), dev)
    result.update(
        config={"models": paths, "max_bytes": args.max_bytes, "doc_bytes": args.doc_bytes,
                "prompt_bytes": args.prompt_bytes},
        dev_texts=[d.describe() for d in dev], scored_files=sorted({d.file for d in scored}),
        in_config={"eta": TEXT_ONLINE_ETA, "alpha": TEXT_ONLINE_ALPHA},
        seconds=time.perf_counter() - t0)
    table = Table(title=f"dev text: ensemble bits per byte vs best member "
                        f"({sum(d.scored_bytes for d in dev)} bytes, {result['units']} units)")
    table.add_column("η \\ α")
    for a in ALPHAS:
        table.add_column(f"{a:g}", justify="right")
    for e in ETAS:
        row = [result["grid"][quality_text.cell(e, a)]["vs_best_member"] for a in ALPHAS]
        table.add_row(f"{e:g}", *(f"{v:+.2%}" for v in row))
    console.print(table)
    best = result["best"]
    console.print(f"best: η {best['eta']:g}, α {best['alpha']:g} ({best['vs_best_member']:+.2%}); "
                  f"config.py holds η {TEXT_ONLINE_ETA:g}, α {TEXT_ONLINE_ALPHA:g}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    console.print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
