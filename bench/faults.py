#!/usr/bin/env python3
"""The fault bench: N trials per fault kind on a mesh of real nodes in network namespaces,
on id sessions (one tokenizer) and on text sessions (three tokenizers: rank / fuse-text).

    .venv/bin/python bench/faults.py --trials 2                       # every kind, both
    .venv/bin/python bench/faults.py --sessions id --kinds leader,pause --trials 20 \\
        --json bench/results/faults.json

Three hosts (host0 runs the client, `MeshClient` to host0's node) and a spare namespace
on the same bridge that runs no node (the forged goodbye comes from there). Id sessions:
three copies of one tiny random-weight model; the exact answer is mlx-lm's own greedy
continuation whatever the membership. Text sessions: three tiny models with different
vocabularies (320, 400, 288); alternate trials run `rank` and `fuse`.

Per trial the bench records every streamed piece's time and judges:
- completed: the answer ended (length / eos / stop) within --answer-timeout;
- exact, id sessions: the summary's token ids and the streamed text equal the reference;
- exact, text sessions: the streamed text equals the summary's text, one piece per
  committed step (nothing lost or repeated), the text streamed before the fault equals
  the no-fault run's, and, when every node is still a member at the end, the whole text
  equals the no-fault run's (a member that left changes what the others write next);
- recovery: for each fault, fault -> next streamed piece; a fault before the first piece
  counts (request -> first piece) minus the no-fault runs' median of the same; the
  multicast loss counts the longest gap between pieces while it lasted. A trial's recovery
  is its worst fault's. A fault with no piece after it gives a lower bound (">="): the
  time from the fault to the end of the wait. When faults come in a row (`two`), the
  first one's recovery includes the second's detection window;
  `recovery_after_last_fault_max_s` counts from the last fault before each piece, as a
  single fault would.

Between trials every node is healed (restarted with the same id, link up, SIGCONT, mDNS
back) and the bench waits until every node lists every host again; if the mesh does not
re-form in --rejoin-timeout, every node is restarted (counted as `mesh_resets`). Prints
a table per session kind; --json writes every trial (with the node-log lines about it when
it failed). Needs root. Exit status 0 when every trial completed exactly, 1 otherwise, 2
when the run could not start.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bench.faults_kinds import KINDS  # noqa: E402
from bench.faults_trial import TrialContext, run_kind, summarize  # noqa: E402

SESSIONS = ("id", "text")
T_START = time.monotonic()
SUBNET = "10.199.8.0/24"
MESH_DEADLINE_S = 150.0
WARMUP_RUNS = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/faults.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="fault kinds:\n" + "\n".join(
                                    f"  {k:8} {v}" for k, v in KINDS.items()))
    p.add_argument("--sessions", default=",".join(SESSIONS),
                   help="id, text or both, comma-separated (default id,text)")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="comma-separated fault kinds, in order (default: all, see below)")
    p.add_argument("--trials", type=int, default=2, help="trials per kind (default 2)")
    p.add_argument("--tokens", type=int, default=120,
                   help="max tokens per answer, id sessions (default 120)")
    p.add_argument("--text-tokens", type=int, default=200,
                   help="max tokens per answer, text sessions (default 200: rank commits a "
                        "word or more a step, ~13 pieces)")
    p.add_argument("--answer-timeout", type=float, default=30.0, metavar="S",
                   help="give up on an answer after S seconds (default 30; the goal is a "
                        "recovery under 6 s)")
    p.add_argument("--rejoin-timeout", type=float, default=60.0, metavar="S",
                   help="after healing, wait this long for the mesh to re-form before "
                        "restarting every node (default 60)")
    p.add_argument("--time-budget", type=float, default=0.0, metavar="S",
                   help="start no trial after S seconds (0: none); the JSON says so")
    p.add_argument("--seed", type=int, default=11, help="seed of durations and moments")
    p.add_argument("--subnet", default=SUBNET, help=f"the bridge's /24 (default {SUBNET})")
    p.add_argument("--json", type=Path, metavar="OUT", help="write every trial here (also "
                   "after each trial, so an interrupted run keeps what it measured)")
    p.add_argument("--jobs", type=int, default=1, choices=(1, 2, 4),
                   help="meshes at once, each in its own process on its own bridge (the next "
                        "/24s): 2 runs the id and the text mesh side by side, 4 two of each "
                        "(trials dealt round-robin); most of a trial is waiting (liveness, "
                        "restarts, mDNS), so this raises throughput (default 1)")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="run nothing: print the per-kind tables of an earlier run as markdown")
    p.add_argument("--trial-offset", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--trial-step", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help="node logs and models (default: a temp dir, "
                   "removed after a run with no failed trial)")
    args = p.parse_args(argv)
    args.session_kinds = [s.strip() for s in args.sessions.split(",") if s.strip()]
    args.fault_kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not args.session_kinds or set(args.session_kinds) - set(SESSIONS):
        p.error(f"--sessions: choose from {', '.join(SESSIONS)}")
    bad = [k for k in args.fault_kinds if k not in KINDS]
    if bad or not args.fault_kinds:
        p.error(f"--kinds: unknown {bad}; choose from {', '.join(KINDS)}")
    if args.trials < 1:
        p.error("--trials must be at least 1")
    if not (20 <= args.tokens <= 2000 and 20 <= args.text_tokens <= 2000):
        p.error("--tokens and --text-tokens must be between 20 and 2000")
    if args.answer_timeout < 5 or args.rejoin_timeout < 10:
        p.error("--answer-timeout must be at least 5 and --rejoin-timeout at least 10")
    return args


def models_for(session_kind: str, workdir: Path) -> list[str]:
    from tiny import make_tiny_model

    if session_kind == "id":    # seed 5: its greedy answer streams text at every token
        m = str(make_tiny_model(workdir / "tiny-id", 5, hidden=256, layers=4))
        return [m, m, m]
    return [str(make_tiny_model(workdir / f"tiny-v{v}", seed, vocab_size=v))
            for seed, v in ((11, 320), (12, 400), (13, 288))]


def run_session_kind(sk: str, args: argparse.Namespace, workdir: Path, doc: dict[str, Any],
                     err: Any) -> list[Any]:
    from netns import bridged_netns_with_switch

    from bench.faults_mesh import FaultMesh

    models = models_for(sk, workdir)
    trials: list[Any] = []
    with bridged_netns_with_switch(4, args.subnet) as (switch, namespaces):
        mesh = FaultMesh(switch, namespaces[:3], namespaces[3], models, workdir / sk)
        (workdir / sk).mkdir(parents=True, exist_ok=True)
        mesh.start()
        took = mesh.wait_mesh(MESH_DEADLINE_S)
        err.print(f"{sk}: mesh of 3 formed by mDNS in {took:.1f}s: "
                  + ", ".join(f"{n}={i}" for n, i in sorted(mesh.ids.items())))
        ctx = TrialContext.warm_up(sk, mesh, models[0], args, WARMUP_RUNS, err)
        doc["sessions"][sk] = {"reference": ctx.describe(), "faults": {}, "trials": []}
        # Round by round (trial i of every kind, then i + 1), so a run stopped early
        # still has about as many trials of every kind.
        for i in range(args.trial_offset, args.trials, args.trial_step):
            for kind in args.fault_kinds:
                if args.time_budget and time.monotonic() - T_START > args.time_budget:
                    doc["stopped"] = (f"--time-budget {args.time_budget:.0f}s spent in round "
                                      f"{i + 1}: fewer than {args.trials} trials of some kinds")
                    err.print(f"{sk}: {doc['stopped']}")
                    return trials
                t = run_kind(ctx, kind, i, random.Random(f"{args.seed}-{sk}-{kind}-{i}"))
                trials.append(t)
                err.print(t.line(args.trials))
                doc["sessions"][sk]["trials"].append(t.as_json())
                doc["sessions"][sk]["faults"] = summarize(trials, args.fault_kinds)
                if args.json:
                    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return trials


def table(sk: str, stats: dict[str, dict[str, Any]], args: argparse.Namespace) -> Any:
    from rich.table import Table

    def s(v: float | None, lower: bool = False) -> str:
        return "-" if v is None else f"{'≥' if lower else ''}{v:.2f}"

    tokens = args.tokens if sk == "id" else args.text_tokens
    tab = Table(title=f"fault bench, {sk} sessions: 3 hosts, {tokens} tokens, "
                      f"answer timeout {args.answer_timeout:.0f} s (recovery in s)")
    for col in ("fault", "trials", "completed", "exact", "recovery p50", "p95", "max",
                "stalled", "took over", "leader left on", "mesh resets"):
        tab.add_column(col, justify="left" if col == "fault" else "right")
    for kind, st in stats.items():
        ok = st["exact"] == st["trials"] and (st["recovery_max_s"] or 0) <= 2 * _liveness()
        style = "green" if ok else "red"
        tab.add_row(kind, str(st["trials"]), str(st["completed"]),
                    f"[{style}]{st['exact']}[/{style}]", s(st["recovery_p50_s"]),
                    s(st["recovery_p95_s"]), s(st["recovery_max_s"],
                                                st["recovery_max_is_lower_bound"]),
                    str(st["stalled"]), str(st["took_over"]), str(st["leader_left_running"]),
                    str(st["mesh_resets"]))
    return tab


def markdown(doc: dict[str, Any]) -> str:
    """The per-kind tables of a run's JSON, as markdown (the README's copy)."""
    def s(v: float | None, lower: bool = False) -> str:
        return "–" if v is None else f"{'≥' if lower else ''}{v:.2f}"

    out = []
    for sk, res in doc["sessions"].items():
        out += [f"{sk} sessions | trials | completed | exact | recovery p50 / p95 / max (s) "
                "| took over | leader left on", "|".join(["---"] * 7)]
        for kind, st in res["faults"].items():
            out.append(" | ".join([
                f"`{kind}`", str(st["trials"]), str(st["completed"]), str(st["exact"]),
                f"{s(st['recovery_p50_s'])} / {s(st['recovery_p95_s'])} / "
                f"{s(st['recovery_max_s'], st['recovery_max_is_lower_bound'])}",
                str(st["took_over"]), str(st["leader_left_running"])]))
        out.append("")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.report:
        print(markdown(json.loads(args.report.read_text())))
        return 0
    from netns import NetnsError, netns_unavailable
    from rich.console import Console

    from bench.faults_mesh import RunError

    out, err = Console(width=max(Console().width, 132)), Console(stderr=True, width=132)
    why = netns_unavailable()
    if why is not None:
        err.print(f"faults: cannot run: {why}")
        return 2

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    workdir = (args.workdir.resolve() if args.workdir
               else Path(tempfile.mkdtemp(prefix="faults-")))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    doc: dict[str, Any] = {"command": "bench/faults.py " + " ".join(argv),
                           "git_commit": _git_commit(), "hosts": 3, "tokens": args.tokens,
                           "text_tokens": args.text_tokens,
                           "answer_timeout_s": args.answer_timeout,
                           "trials_per_kind": args.trials, "seed": args.seed,
                           "kinds": {k: KINDS[k] for k in args.fault_kinds},
                           "liveness_window_s": _liveness(), "sessions": {}, "failure": ""}
    all_trials: dict[str, list[Any]] = {}
    rc = 0
    if args.jobs > 1:
        return run_jobs(argv, args, workdir, doc, out, err)
    try:
        for sk in args.session_kinds:
            all_trials[sk] = run_session_kind(sk, args, workdir, doc, err)
    except (RunError, NetnsError, OSError) as exc:
        doc["failure"] = str(exc)
        err.print(f"[red]faults: {exc}[/red]")
        rc = 2
    except KeyboardInterrupt:
        doc["failure"] = "interrupted"
        err.print("faults: interrupted; namespaces and nodes removed")
        rc = 130
    doc["run_s"] = round(time.monotonic() - t0, 1)
    for sk, trials in all_trials.items():
        out.print(table(sk, summarize(trials, args.fault_kinds), args))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    failed = any(not t.exact for ts in all_trials.values() for t in ts)
    if rc == 0 and failed:
        rc = 1
    if rc == 0 and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        err.print(f"node logs kept in {workdir}")
    return rc


def run_jobs(argv: list[str], args: argparse.Namespace, workdir: Path, doc: dict[str, Any],
             out: Any, err: Any) -> int:
    """`--jobs` child benches at once, each on its own bridge (the next /24s), the session
    kinds split evenly and each kind's trials dealt round-robin; merge their JSON."""
    import ipaddress
    import subprocess

    from bench.faults_trial import Trial

    net = ipaddress.ip_network(args.subnet)
    per = max(1, args.jobs // len(args.session_kinds))
    children = []
    for sk in args.session_kinds:
        for j in range(per):
            n = len(children)
            subnet = ipaddress.ip_network((int(net.network_address) + 256 * n, 24))
            name = f"job-{sk}-{j}"
            cmd = [sys.executable, str(Path(__file__).resolve()), *_without(
                argv, "--jobs", "--json", "--workdir", "--subnet", "--sessions"),
                "--sessions", sk, "--subnet", str(subnet), "--trial-offset", str(j),
                "--trial-step", str(per), "--workdir", str(workdir / name),
                "--json", str(workdir / f"{name}.json")]
            children.append((sk, name, subprocess.Popen(cmd)))   # output goes to ours
    rcs = [p.wait() for _sk, _n, p in children]    # each child bounds its own waits
    merged: dict[str, list[Any]] = {}
    for sk, name, _p in children:
        try:
            child = json.loads((workdir / f"{name}.json").read_text())
        except (OSError, ValueError) as exc:
            doc["failure"] += f"{name}: no results ({exc}); "
            continue
        res = child["sessions"].get(sk)
        if res is None:
            doc["failure"] += f"{name}: {child['failure']}; "
            continue
        mine = doc["sessions"].setdefault(sk, {"reference": res["reference"],
                                               "references_per_job": [], "trials": []})
        mine["references_per_job"].append(res["reference"])
        merged.setdefault(sk, []).extend(Trial(**t) for t in res["trials"])
        doc["failure"] += f"{name}: {child['failure']}; " if child["failure"] else ""
        if child.get("stopped"):
            doc.setdefault("stopped", {})[name] = child["stopped"]
    for sk, trials in merged.items():
        trials.sort(key=lambda t: (args.fault_kinds.index(t.kind), t.trial))
        doc["sessions"][sk]["trials"] = [t.as_json() for t in trials]
        doc["sessions"][sk]["faults"] = summarize(trials, args.fault_kinds)
        out.print(table(sk, doc["sessions"][sk]["faults"], args))
    doc["run_s"] = round(time.monotonic() - T_START, 1)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    failed = any(not t.exact for ts in merged.values() for t in ts)
    return max([*rcs, 1 if failed else 0])


def _without(argv: list[str], *options: str) -> list[str]:
    """argv less the given options and their values (as --opt V or --opt=V)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif not any(a.startswith(o + "=") for o in options):
            out.append(a)
    return out


def _liveness() -> float:
    from dwarfmesh.config import HEARTBEAT_INTERVAL_S, LIVENESS
    return HEARTBEAT_INTERVAL_S * LIVENESS


def _git_commit() -> str:
    import subprocess
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True, check=False)
    return r.stdout.strip()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
