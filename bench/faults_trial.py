"""One trial of the fault bench, start to heal, and how it is judged and summed up.

`TrialContext.warm_up` measures what a trial is judged against: for id sessions mlx-lm's
own greedy answer (exact whatever the membership), for text sessions the mesh's own
no-fault answer per mode, and for both the no-fault time from request to first piece
(what a fault before the first piece is measured against) and to the end. `run_kind`
plans (bench/faults_kinds.py), runs the answer while the faults fire, heals every node,
waits for the mesh to re-form, and judges. `summarize` is pure.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.faults_kinds import MCAST_LEAD_S, fault_after_pieces, plan, session_where
from bench.faults_mesh import Answer, FaultMesh, RunError

PROMPTS = ("return xs", "def quicksort(xs):", "The quick brown fox")
FINISHED = ("length", "eos", "stop")
LOG_NEEDLES = ("left", "joined", "takes over", "taking over", "gone", "refus", "ERROR",
               "Traceback", "diverged", "sent no", "origin moves", "adopting", "dropped", "deposed",
               "re-electing", "freeing", "goodbye")


@dataclass
class TrialContext:
    sk: str                                   # "id" or "text"
    mesh: FaultMesh
    args: Any
    prompt: str
    modes: list[str]
    ref_ids: list[int] = field(default_factory=list)
    eos: set[int] = field(default_factory=set)
    ref_text: dict[str, str] = field(default_factory=dict)       # per mode
    first_piece_s: dict[str, float] = field(default_factory=dict)
    answer_s: dict[str, float] = field(default_factory=dict)
    fifth: dict[str, int] = field(default_factory=dict)          # pieces by 1/5 of it
    notes: list[str] = field(default_factory=list)

    @classmethod
    def warm_up(cls, sk: str, mesh: FaultMesh, model: str, args: Any, runs: int,
                err: Any) -> TrialContext:
        ctx = cls(sk, mesh, args, PROMPTS[0], ["stream"] if sk == "id" else ["rank", "fuse"])
        if sk == "id":
            ctx._id_reference(model)
        for mode in ctx.modes:
            firsts, totals, texts = [], [], []
            for i in range(runs):                  # led by host1, then host2
                leader = mesh.hosts[1 + i % 2].name
                session, _ = session_where(f"{sk}-warm-{mode}-{i}-{os.getpid()}-", mesh,
                                           lambda o, leader=leader: o[0] == leader)
                a = mesh.answer(ctx.request(session, mode, 0), [])
                if not (a.ok and a.times and a.summary.get("finish_reason") in FINISHED):
                    raise RunError(f"no-fault {mode} answer failed: {a.error or a.summary}")
                firsts.append(a.times[0] - a.sent_at)
                totals.append(a.times[-1] - a.sent_at)
                texts.append("".join(a.pieces))
                if sk == "id" and "".join(a.pieces) != ctx.text_of_reference():
                    raise RunError("the no-fault id answer is not mlx-lm's greedy answer")
            ctx.ref_text[mode] = texts[0]
            if len(set(texts)) > 1:
                ctx.notes.append(f"{mode}: no-fault text differs between leaders")
            ctx.first_piece_s[mode] = statistics.median(firsts)
            ctx.answer_s[mode] = statistics.median(totals)
            ctx.fifth[mode] = max(1, len(a.pieces) // 5)
            err.print(f"{sk} {mode}: no-fault answer {len(a.pieces)} pieces, first after "
                      f"{ctx.first_piece_s[mode]:.2f}s, all in {ctx.answer_s[mode]:.2f}s")
        return ctx

    def _id_reference(self, model: str) -> None:
        """mlx-lm's greedy answer to the first prompt whose every token streams text."""
        import mlx.core as mx
        from mlx_lm import load, stream_generate

        from dwarfmesh.sessions.answer import answer_detokenizer

        m, tok = load(model)
        if mx.default_device() == mx.cpu:
            m.set_dtype(mx.float32)               # as the engine does
        best = None
        for prompt in PROMPTS:
            ids = [r.token for r in stream_generate(m, tok, prompt,
                                                    max_tokens=self.tokens)]
            detok = answer_detokenizer(tok.detokenizer, chat=False)   # as a completion streams
            segments = []
            for t in ids:
                detok.add_token(t)
                segments.append(detok.last_segment)
            key = (sum(not s for s in segments), -len(ids))
            if best is None or key < best[0]:
                best = (key, prompt, ids, "".join(segments))
        _key, self.prompt, self.ref_ids, text = best
        self.ref_text["stream"] = text
        self.eos = set(int(i) for i in tok.eos_token_ids)

    @property
    def tokens(self) -> int:
        return self.args.tokens if self.sk == "id" else self.args.text_tokens

    def text_of_reference(self) -> str:
        return self.ref_text.get("stream", "")

    def request(self, session: str, mode: str, fault_after: int) -> dict[str, Any]:
        return {"session": session, "prompt": self.prompt, "tokens": self.tokens,
                "mode": mode, "fault_after": fault_after, "timeout": self.args.answer_timeout}

    def describe(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "modes": self.modes,
                "reference_tokens": len(self.ref_ids), "text": self.ref_text,
                "no_fault_first_piece_s": self.first_piece_s,
                "no_fault_answer_s": self.answer_s, "fault_after_pieces": self.fifth,
                "notes": self.notes}


@dataclass
class Trial:
    sk: str
    kind: str
    trial: int
    mode: str
    session: str
    order: list[str]
    victims: list[str]
    detail: dict[str, Any]
    fault_after: int
    events: list[tuple[str, float]] = field(default_factory=list)  # label, s after request
    completed: bool = False
    exact: bool = False
    mismatch: str = ""
    error: str = ""
    finish_reason: str = ""
    final_leader: str = ""
    members: list[str] = field(default_factory=list)
    pieces: int = 0
    struck: bool = False                  # a fault fired before the last piece
    recovery_s: float | None = None
    recovery_lower_bound: bool = False
    recovery_after_last_fault_s: float | None = None   # see `after_last_fault`
    longest_gap_s: float | None = None
    rejoin_s: float | None = None
    mesh_reset: bool = False
    took_over: list[str] = field(default_factory=list)     # logged taking the session over
    leading_after_end: list[str] = field(default_factory=list)  # a second leader still on
    log: list[str] = field(default_factory=list)
    text_diff: dict[str, Any] = field(default_factory=dict)

    def line(self, of: int) -> str:
        rec = ("-" if self.recovery_s is None else
               f"{'≥' if self.recovery_lower_bound else ''}{self.recovery_s:.2f}s")
        who = ",".join(self.victims) or "-"
        leader = self.order[0] + (f" -> {self.final_leader}" if self.final_leader
                                  and self.final_leader != self.order[0] else "")
        verdict = "exact" if self.exact else f"NOT exact ({self.mismatch or self.error})"
        return (f"{self.sk} {self.kind:7} {self.trial + 1}/{of} {self.mode}: leader {leader}, "
                f"victim {who}: {verdict}, recovery {rec}"
                + (f", took over: {','.join(self.took_over)}" if self.took_over else "")
                + (f", STILL LEADING after the end: {','.join(self.leading_after_end)}"
                   if self.leading_after_end else "")
                + (", MESH RESET" if self.mesh_reset else ""))

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def run_kind(ctx: TrialContext, kind: str, i: int, rng: Any) -> Trial:
    mesh, args = ctx.mesh, ctx.args
    mode = ctx.modes[i % len(ctx.modes)]
    p = plan(kind, i, f"{ctx.sk}-{kind}-{i}-{os.getpid()}-", mesh, rng, ctx.answer_s[mode])
    t = Trial(ctx.sk, kind, i, mode, p.session, p.order, p.victims, p.detail,
              fault_after_pieces(kind, ctx.fifth[mode]))
    wall0 = time.time()
    before: list[tuple[str, float, bool]] = []
    answer = None
    try:
        if p.before is not None:
            before.append(("mDNS loss", time.monotonic(), True))
            p.before()
            time.sleep(MCAST_LEAD_S)
        answer = mesh.answer(ctx.request(p.session, mode, t.fault_after), p.actions)
    finally:
        t.rejoin_s, t.mesh_reset = heal(mesh, answer, args.rejoin_timeout)
    tags = {p.session, _tag(p.session)}
    t.leading_after_end = sorted(n for n, ss in mesh.leading.items() if tags & set(ss))
    t.took_over = mesh.takeovers(p.session, wall0)
    judge(ctx, t, answer, before + answer.events)
    if not t.exact or (t.recovery_s or 0) > 6.0 or t.leading_after_end:
        t.log = mesh.log_excerpt(wall0, time.time(), (p.session, *LOG_NEEDLES))
    return t


def heal(mesh: FaultMesh, answer: Answer | None, rejoin_s: float) -> tuple[float | None, bool]:
    """Undo every fault (late heals first), restart dead nodes, wait for the mesh."""
    for action in (answer.unfired if answer else []):
        if not action.harmful:
            action.fn()
    for host in mesh.hosts:
        mesh.resume(host)
        mesh.set_link(host, True)
        if host.index in mesh.mdns_dropped:
            mesh.drop_mdns(host, False)
        if not mesh.alive(host):
            mesh.start_node(host)
    try:
        return mesh.wait_mesh(rejoin_s), False
    except RunError:
        for host in mesh.hosts:
            mesh.restart(host)
        return mesh.wait_mesh(rejoin_s * 2), True


def judge(ctx: TrialContext, t: Trial, a: Answer, events: list[tuple[str, float, bool]]
          ) -> None:
    s, streamed = a.summary, "".join(a.pieces)
    sent = a.sent_at if a.sent_at is not None else a.ended_at
    t.events = [(label, round(te - sent, 3)) for label, te, _h in events]
    t.pieces, t.error = len(a.pieces), a.error
    t.finish_reason = s.get("finish_reason", "")
    t.completed = a.ok and t.finish_reason in FINISHED
    t.final_leader, t.members = s.get("leader", ""), sorted(s.get("members", []))
    gaps = [y - x for x, y in zip([sent, *a.times], a.times)]
    t.longest_gap_s = round(max(gaps), 3) if gaps else None
    last = a.times[-1] if a.times else sent
    t.struck = any(h and te <= last for _l, te, h in events)
    rec = recovery(events, sent, a.times, a.ended_at, t.completed,
                   ctx.first_piece_s[t.mode])
    if rec is not None:
        t.recovery_s, t.recovery_lower_bound = round(rec[0], 3), rec[1]
    rec = recovery(after_last_fault(events, a.times), sent, a.times, a.ended_at, t.completed,
                   ctx.first_piece_s[t.mode])
    if rec is not None:
        t.recovery_after_last_fault_s = round(rec[0], 3)
    if not t.completed:
        t.mismatch = f"did not complete: {a.error or t.finish_reason or 'no end'}"
        return
    checks: list[tuple[bool, str]] = [(streamed == a.text, "streamed text != summary text")]
    ref = ctx.ref_text[t.mode]
    if ctx.sk == "id":
        ids = list(s.get("token_ids", []))
        if ids and ids[-1] in ctx.eos and ids[:-1] == ctx.ref_ids:
            ids = ids[:-1]                        # the summary keeps the EOS, mlx-lm does not
        checks += [(ids == ctx.ref_ids, f"token ids differ from step {_diff(ids, ctx.ref_ids)}"
                    f" ({len(ids)} vs {len(ctx.ref_ids)})"),
                   (streamed == ref, "streamed text != reference text")]
    else:
        steps = s.get("steps")
        fault_t = min((te for _l, te, h in events if h), default=None)
        shown = "".join(p for p, x in zip(a.pieces, a.times) if fault_t is None or x <= fault_t)
        everyone = sorted(h.name for h in ctx.mesh.hosts)
        checks += [(steps == len(a.pieces), f"{len(a.pieces)} pieces for {steps} steps"),
                   (ref.startswith(shown), "text before the fault differs from no-fault")]
        if t.members == everyone:
            checks.append((streamed == ref, f"every node a member but text != no-fault "
                                            f"(from char {_diff(list(streamed), list(ref))})"))
    t.mismatch = "; ".join(why for ok, why in checks if not ok)
    t.exact = not t.mismatch
    if not t.exact:                               # where the text went wrong, for the log
        at = _diff(list(streamed), list(ref))
        t.text_diff = {"at_char": at, "streamed": streamed[max(0, at - 30):at + 50],
                       "expected": ref[max(0, at - 30):at + 50],
                       "summary_has_text": "text" in s}


def after_last_fault(events: list[tuple[str, float, bool]], times: list[float]
                     ) -> list[tuple[str, float, bool]]:
    """The events without the faults that another fault followed before the next piece:
    when faults come in a row (`two`), what the last one costs, as a single fault would.
    (`recovery` counts from the first: the second's detection window is added to it.)"""
    harmful = sorted(te for _l, te, h in events if h)
    kept = []
    for label, te, h in events:
        nxt = next((x for x in times if x > te), float("inf"))
        if h and any(te < other < nxt for other in harmful):
            continue
        kept.append((label, te, h))
    return kept


def recovery(events: list[tuple[str, float, bool]], sent: float, times: list[float],
             ended: float, completed: bool, first_piece_s: float
             ) -> tuple[float, bool] | None:
    """The worst fault's fault -> next piece (see bench/faults.py), and whether it is only
    a lower bound (no piece came after it)."""
    worst: tuple[float, bool] | None = None
    harmful = [(label, te) for label, te, h in events if h]
    heals = {label: te for label, te, h in events if not h}
    for label, te in harmful:
        if not times or te < times[0]:
            r = ((times[0] - sent - first_piece_s, False) if times
                 else (ended - max(te, sent), True))
        else:
            nxt = next((x for x in times if x > te), None)
            r = ((nxt - te, False) if nxt is not None
                 else (ended - te, not completed))
        if label == "mDNS loss":                   # the longest gap while it lasted
            until = heals.get("mDNS back", ended)
            marks = [sent, *times]
            gaps = [y - x for x, y in zip(marks, marks[1:]) if x < until]
            r = (max([r[0], *gaps[1:]]), r[1])
        r = (max(r[0], 0.0), r[1])
        if worst is None or r[0] > worst[0]:
            worst = r
    return worst


def _tag(session: str) -> str:
    """How `peers` lists a session a node leads (a tag, where the package hides ids)."""
    try:
        from dwarfmesh.wire.protocol import session_tag
    except ImportError:
        return session
    return session_tag(session)


def _diff(a: list[Any], b: list[Any]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[max(0, math.ceil(q * len(v)) - 1)], 3)


def summarize(trials: list[Trial], kinds: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for kind in kinds:
        ts = [t for t in trials if t.kind == kind]
        if not ts:
            continue
        rec = [t.recovery_s for t in ts if t.recovery_s is not None]
        top = max((t for t in ts if t.recovery_s is not None), default=None,
                  key=lambda t: t.recovery_s)
        out[kind] = {
            "trials": len(ts), "completed": sum(t.completed for t in ts),
            "exact": sum(t.exact for t in ts), "struck": sum(t.struck for t in ts),
            "recovery_p50_s": _pct(rec, 0.5), "recovery_p95_s": _pct(rec, 0.95),
            "recovery_max_s": _pct(rec, 1.0),
            "recovery_max_is_lower_bound": bool(top and top.recovery_lower_bound),
            "recovery_after_last_fault_max_s": _pct(
                [t.recovery_after_last_fault_s for t in ts
                 if t.recovery_after_last_fault_s is not None], 1.0),
            "stalled": sum(not t.completed for t in ts),
            "mesh_resets": sum(t.mesh_reset for t in ts),
            "took_over": sum(bool(t.took_over) for t in ts),
            "leader_left_running": sum(bool(t.leading_after_end) for t in ts),
            "failures": [f"{t.trial}: {t.mismatch or t.error}" for t in ts if not t.exact],
        }
    return out
