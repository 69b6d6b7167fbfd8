"""The fault kinds of the fault bench: for one trial, which session (so the rendezvous
order puts the right node in the right role), who is hurt, and the timed actions that
hurt and heal. Pure planning plus closures over `FaultMesh`; judging is bench/faults.py.

Every kind but `random` strikes once the client has streamed `fault_after` pieces (about
a fifth of the answer). Roles never depend on luck: the session id is chosen so that the
leader is (or is not) the client's node as the kind needs; durations and moments come
from the bench's seeded random generator, and are recorded per trial.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

from bench.faults_mesh import Action, FaultMesh, Host

KINDS: dict[str, str] = {
    "none": "no fault (control)",
    "member": "SIGKILL a member (neither the leader nor the client's node); restarted after "
              "the answer",
    "leader": "SIGKILL the leader (not the client's node); restarted after the answer",
    "client": "SIGKILL the client's node (the leader in even trials, a member in odd ones)",
    "two": "SIGKILL the leader, then 0.5-4 s later the node next in its rendezvous order "
           "(neither is the client's node): one node is left",
    "link": "the bridge port of a member (even trials) or the leader (odd) down for 1-5 s, "
            "then up again",
    "restart": "SIGKILL the leader (even trials) or a member (odd) and start it again at once "
               "with the same name and id",
    "pause": "SIGSTOP the leader for 2-8 s, then SIGCONT",
    "goodbye": "a forged mDNS goodbye (TTL-0 PTR for the live leader's service) multicast from "
               "a namespace on the bridge that runs no node",
    "mcast": "UDP 5353 dropped both ways on the leader's link from 14 s before the request "
             "(mDNS records expire 15-20 s into the loss) until 12 s after it",
    "random": "SIGKILL the leader, a member or the client's node at a uniform random moment "
              "from the request to the no-fault answer's end (before the first piece too)",
}
MCAST_LEAD_S = 14.0
MCAST_AFTER_S = 12.0


@dataclass
class Plan:
    session: str
    order: list[str]                       # host names in the session's rendezvous order
    victims: list[str] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    before: Callable[[], None] | None = None   # runs before the request (mcast)
    detail: dict[str, float | str] = field(default_factory=dict)


def session_where(prefix: str, mesh: FaultMesh, ok: Callable[[list[str]], bool]
                  ) -> tuple[str, list[str]]:
    """A fresh conversation id whose rendezvous order (host names) satisfies `ok`."""
    from dwarfmesh.mesh.membership import rank_for_session

    by_id = {mesh.ids[h.name]: h.name for h in mesh.hosts}
    members = [SimpleNamespace(node_id=i) for i in by_id]
    for i in range(10_000):
        order = [by_id[m.node_id] for m in rank_for_session(f"{prefix}{i}", members)]
        if ok(order):
            return f"{prefix}{i}", order
    raise ValueError("no session id with that rendezvous order")


def plan(kind: str, trial: int, prefix: str, mesh: FaultMesh, rng: random.Random,
         answer_s: float) -> Plan:
    """The session, victims and timed actions of one trial of `kind`."""
    hosts = {h.name: h for h in mesh.hosts}
    client = mesh.hosts[0].name

    def host(name: str) -> Host:
        return hosts[name]

    def at_fault(fn: Callable[[], None], label: str, delay: float = 0.0,
                 harmful: bool = True) -> Action:
        return Action("fault", delay, fn, label, harmful)

    if kind == "client":
        leads = trial % 2 == 0
        session, order = session_where(prefix, mesh, lambda o: (o[0] == client) == leads)
    elif kind == "random":
        session, order = session_where(prefix, mesh, lambda o: o[0] != client)
    elif kind == "two":
        session, order = session_where(prefix, mesh, lambda o: client not in o[:2])
    else:
        session, order = session_where(prefix, mesh, lambda o: o[0] != client)
    leader = order[0]
    members = [n for n in order[1:] if n != client]
    p = Plan(session, order)

    if kind == "member":
        p.victims = [members[trial % len(members)]]
        p.actions = [at_fault(lambda: mesh.kill(host(p.victims[0])), "kill")]
    elif kind == "leader":
        p.victims = [leader]
        p.actions = [at_fault(lambda: mesh.kill(host(leader)), "kill")]
    elif kind == "client":
        p.victims = [client]
        p.actions = [at_fault(lambda: mesh.kill(host(client)), "kill")]
    elif kind == "two":
        second = order[1]
        gap = round(rng.uniform(0.5, 4.0), 2)
        p.victims, p.detail = [leader, second], {"second_after_s": gap}
        p.actions = [at_fault(lambda: mesh.kill(host(leader)), "kill"),
                     at_fault(lambda: mesh.kill(host(second)), "kill2", gap)]
    elif kind == "link":
        victim = members[0] if trial % 2 == 0 else leader
        down = round(rng.uniform(1.0, 5.0), 2)
        p.victims, p.detail = [victim], {"down_s": down}
        p.actions = [at_fault(lambda: mesh.set_link(host(victim), False), "link down"),
                     at_fault(lambda: mesh.set_link(host(victim), True), "link up", down,
                              harmful=False)]
    elif kind == "restart":
        victim = leader if trial % 2 == 0 else members[0]
        p.victims = [victim]
        p.actions = [at_fault(lambda: mesh.restart(host(victim)), "kill+start")]
    elif kind == "pause":
        stop = round(rng.uniform(2.0, 8.0), 2)
        p.victims, p.detail = [leader], {"paused_s": stop}
        p.actions = [at_fault(lambda: mesh.pause(host(leader)), "SIGSTOP"),
                     at_fault(lambda: mesh.resume(host(leader)), "SIGCONT", stop,
                              harmful=False)]
    elif kind == "goodbye":
        p.victims = [leader]
        p.actions = [at_fault(mesh.prepare_goodbye(mesh.ids[leader]), "goodbye")]
    elif kind == "mcast":
        p.victims = [leader]
        p.before = lambda: mesh.drop_mdns(host(leader), True)
        p.detail = {"loss_before_request_s": MCAST_LEAD_S}
        p.actions = [Action("sent", MCAST_AFTER_S, lambda: mesh.drop_mdns(host(leader), False),
                            "mDNS back", harmful=False)]
    elif kind == "random":
        victim = rng.choice([leader, *members, client])
        when = round(rng.uniform(0.0, answer_s), 3)
        p.victims = [victim]
        p.detail = {"at_s": when, "role": ("leader" if victim == leader else "client"
                                           if victim == client else "member")}
        p.actions = [Action("sent", when, lambda: mesh.kill(host(victim)), "kill")]
    return p


def fault_after_pieces(kind: str, pieces_by_fifth: int) -> int:
    """The piece after which a kind strikes (0: it is timed from the request instead)."""
    return 0 if kind in ("none", "random", "mcast") else pieces_by_fifth
