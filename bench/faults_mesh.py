"""The fault bench's mesh: hosts in network namespaces on one bridge, a real `dwarfmesh
node` on each (mDNS on, no --peer), a client in host0, and the faults themselves.

Owns: starting and restarting nodes (same name, so the same persistent id), asking any
node for its view, waiting (bounded) until the mesh has re-formed, running one answer
while timed actions fire, and every way the bench hurts the mesh: SIGKILL, SIGSTOP /
SIGCONT, a bridge port down / up, UDP 5353 dropped both ways on one host's link (tc: an
htb class whose queue holds nothing), and a forged mDNS goodbye sent from a spare
namespace on the bridge that runs no node. Does not own: which fault a trial injects or
how it is judged (bench/faults.py). Nothing leaves the namespaces this run created.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netns import Namespace, set_host_link

REPO = Path(__file__).resolve().parent.parent
PORT = 5757
PEERS_TIMEOUT_S = 2.0
SETTLE_MAX_S = 6.0          # > the transport's reconnect backoff plus a heartbeat
POLL_S = 0.05               # how often timed actions are checked while an answer runs
LOG_TIME = "%Y-%m-%d %H:%M:%S"


class RunError(RuntimeError):
    """The run cannot go on (setup failed, the driver died, a node would not come back)."""


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the bench dies, however it dies."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


@dataclass
class Host:
    index: int
    ns: Namespace
    model: str
    log: Path
    proc: Any = None                       # the node's Popen (`ip netns exec` execs into it)
    paused: bool = False

    @property
    def name(self) -> str:
        return f"host{self.index}"

    @property
    def address(self) -> str:
        return f"{self.ns.address}:{PORT}"


@dataclass
class Action:
    """Run `fn` `delay` seconds after the driver reports `anchor` ("sent" or "fault")."""
    anchor: str
    delay: float
    fn: Callable[[], None]
    label: str
    harmful: bool = True                   # a fault (timed for recovery), not a heal


@dataclass
class Answer:
    ok: bool
    text: str
    summary: dict[str, Any]
    pieces: list[str]
    times: list[float]
    error: str
    sent_at: float | None
    ended_at: float
    events: list[tuple[str, float, bool]] = field(default_factory=list)  # label, t, harmful
    unfired: list[Action] = field(default_factory=list)


class FaultMesh:
    """The hosts, their nodes, the client driver in host0; every wait has a deadline."""

    def __init__(self, switch: Namespace, hosts: list[Namespace], spare: Namespace,
                 models: list[str], workdir: Path) -> None:
        self.switch, self.spare, self.workdir = switch, spare, workdir
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "DWARFMESH_STATE": str(workdir / "state")}
        # three nodes share this machine's cores: llama.cpp's threads sleep between ops
        self.env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.hosts = [Host(i, ns, models[i], workdir / f"host{i}.log")
                      for i, ns in enumerate(hosts)]
        self.ids: dict[str, str] = {}
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.driver: Any = None
        self.mdns_dropped: set[int] = set()
        self.leading: dict[str, list[str]] = {}    # node -> sessions it leads, last asked

    # --- processes ------------------------------------------------------------------

    def start_node(self, host: Host) -> None:
        with open(host.log, "a") as log:
            log.write(f"--- start {time.strftime(LOG_TIME)} ---\n")
            log.flush()
            host.proc = host.ns.python(
                "-m", "dwarfmesh", "node", "--model", host.model, "--name", host.name,
                "--host", host.ns.address, "--port", str(PORT), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                preexec_fn=_die_with_parent)
        host.paused = False

    def start(self) -> None:
        for host in self.hosts:
            self.start_node(host)
        self.driver = self.hosts[0].ns.python(
            "-m", "bench.faults_driver", env=self.env, cwd=REPO,
            stderr=open(self.workdir / "driver.log", "a"), preexec_fn=_die_with_parent)
        threading.Thread(target=self._read_driver, daemon=True).start()

    def _read_driver(self) -> None:
        for line in self.driver.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def alive(self, host: Host) -> bool:
        return host.proc is not None and host.proc.poll() is None

    def kill(self, host: Host) -> None:
        if self.alive(host):
            host.proc.kill()
            host.proc.wait(timeout=10)
        host.paused = False

    def pause(self, host: Host) -> None:
        if self.alive(host):
            host.proc.send_signal(signal.SIGSTOP)
            host.paused = True

    def resume(self, host: Host) -> None:
        if self.alive(host) and host.paused:
            host.proc.send_signal(signal.SIGCONT)
        host.paused = False

    def restart(self, host: Host) -> None:
        self.kill(host)
        self.start_node(host)

    # --- the network ----------------------------------------------------------------

    def set_link(self, host: Host, up: bool) -> None:
        set_host_link(self.switch, host.index, up)

    def drop_mdns(self, host: Host, on: bool) -> None:
        """Drop UDP to or from port 5353 leaving host's eth0 and leaving its bridge port
        (i.e. arriving at the host): mDNS both ways, everything else untouched."""
        for ns, dev in ((host.ns, "eth0"), (self.switch, f"veth{host.index}")):
            def tc(*args: str, check: bool = True, ns: Namespace = ns) -> None:
                ns.run(["tc", *args], check=check)
            if not on:
                tc("qdisc", "del", "dev", dev, "root", check=False)
                continue
            tc("qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
            tc("class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
               "rate", "10gbit")
            tc("class", "add", "dev", dev, "parent", "1:", "classid", "1:2", "htb",
               "rate", "8kbit")
            tc("qdisc", "add", "dev", dev, "parent", "1:2", "handle", "20:", "pfifo",
               "limit", "0")                    # a queue that holds nothing: every packet dropped
            for port in ("dport", "sport"):
                tc("filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1",
                   "u32", "match", "ip", "protocol", "17", "0xff", "match", "ip", port,
                   "5353", "0xffff", "classid", "1:2")
        (self.mdns_dropped.add if on else self.mdns_dropped.discard)(host.index)

    def prepare_goodbye(self, node_id: str) -> Callable[[], None]:
        """A forger in the spare namespace, started now; calling the result makes it send
        a TTL-0 PTR record for `node_id`'s service at once."""
        proc = self.spare.python("-m", "bench.faults_driver", "goodbye", node_id,
                                 self.spare.address, cwd=REPO, env=self.env,
                                 preexec_fn=_die_with_parent)
        ready = proc.stdout.readline()         # bounded: the forger exits if it cannot bind
        if "ready" not in ready:
            proc.kill()
            raise RunError(f"the goodbye forger did not start: {ready!r}")

        def send() -> None:
            proc.stdin.write("go\n")         # it sends and exits; reaped at teardown
            proc.stdin.flush()
        return send

    # --- the driver -----------------------------------------------------------------

    def _send(self, req: dict[str, Any]) -> None:
        self.driver.stdin.write(json.dumps(req) + "\n")
        self.driver.stdin.flush()

    def _recv(self, timeout: float) -> dict[str, Any] | None:
        try:
            line = self._lines.get(timeout=max(timeout, 0.001))
        except queue.Empty:
            return None
        if line is None:
            raise RunError(f"the client driver exited (see {self.workdir / 'driver.log'})")
        return json.loads(line)

    def peers(self, host: Host) -> list[dict[str, Any]]:
        self._send({"op": "peers", "address": host.address})
        reply = self._recv(PEERS_TIMEOUT_S * 10)
        if reply is None:
            raise RunError("the client driver said nothing for 20s")
        return reply.get("nodes") or []

    def views(self) -> tuple[dict[str, list[str]], dict[str, int]]:
        """Each live node's list of node names, and its transport's send-failure count."""
        views, failures = {}, {}
        for host in self.hosts:
            if not self.alive(host) or host.paused:
                continue
            nodes = self.peers(host)
            views[host.name] = sorted(n["name"] for n in nodes)
            for n in nodes:
                if n.get("self"):
                    failures[host.name] = n.get("stats", {}).get("send_failures", 0)
                    self.leading[host.name] = list(n.get("leader_of", []))
            if views[host.name] == sorted(h.name for h in self.hosts):
                self.ids.update({n["name"]: n["node_id"] for n in nodes})
        return views, failures

    def wait_mesh(self, deadline_s: float) -> float:
        """Until every node lists exactly every host and no send fails for a heartbeat
        (a DEALER still in libzmq's reconnect backoff drops what is sent); the seconds."""
        want = sorted(h.name for h in self.hosts)
        t0 = time.monotonic()
        views: dict[str, list[str]] = {}
        while time.monotonic() - t0 < deadline_s:
            dead = [h.name for h in self.hosts if not self.alive(h)]
            if dead:
                raise RunError(f"node(s) {dead} exited; see {self.workdir}")
            views, failures = self.views()
            if len(views) == len(self.hosts) and all(v == want for v in views.values()):
                end = min(time.monotonic() + SETTLE_MAX_S, t0 + deadline_s)
                while time.monotonic() < end:
                    time.sleep(1.2)
                    _views, now = self.views()
                    if now == failures:
                        break
                    failures = now
                return time.monotonic() - t0
            time.sleep(0.5)
        raise RunError(f"the mesh did not re-form in {deadline_s:.0f}s; views: {views}")

    def answer(self, req: dict[str, Any], actions: list[Action]) -> Answer:
        """One session from host0's client (every node's address, host0's first, as mDNS
        gives them to `dwarfmesh generate`) while `actions` fire on time; bounded."""
        self._send({"op": "generate", "addresses": [h.address for h in self.hosts], **req})
        anchors: dict[str, float] = {}
        events: list[tuple[str, float, bool]] = []
        pending = list(actions)
        deadline = time.monotonic() + req["timeout"] + 30
        while True:
            now = time.monotonic()
            for a in [a for a in pending if a.anchor in anchors
                      and anchors[a.anchor] + a.delay <= now]:
                pending.remove(a)
                events.append((a.label, time.monotonic(), a.harmful))
                a.fn()
            if now > deadline:
                raise RunError(f"the client driver gave no result in {req['timeout'] + 30:.0f}s")
            due = [anchors[a.anchor] + a.delay - now for a in pending if a.anchor in anchors]
            msg = self._recv(min([POLL_S, *due]))
            if msg is None:
                continue
            if "event" in msg:
                anchors[msg["event"]] = msg["at"]
            elif msg.get("op") == "result":
                return Answer(msg["ok"], msg["text"], msg["summary"], msg["pieces"],
                              msg["times"], msg["error"], anchors.get("sent"),
                              time.monotonic(), events, pending)

    # --- what the nodes said --------------------------------------------------------

    def takeovers(self, session: str, since: float) -> list[str]:
        """Nodes whose log says they took `session` over (id or text) since `since`."""
        return sorted({line.split(" ", 1)[0] for line in self.log_excerpt(
            since, time.time(), (f"session {session}: ",), limit=10_000)
            if "taking over" in line})

    def log_excerpt(self, since: float, until: float, needles: tuple[str, ...],
                    limit: int = 24) -> list[str]:
        """Node-log lines between two wall-clock times that mention any of `needles`."""
        lines = []
        for host in self.hosts:
            try:
                text = host.log.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                try:
                    t = time.mktime(time.strptime(line[:19], LOG_TIME)) + int(line[20:23]) / 1e3
                except ValueError:
                    continue
                if since - 1 <= t <= until + 1 and any(n in line for n in needles):
                    lines.append(f"{host.name} {line[11:]}")
        lines.sort(key=lambda s: s.split(" ", 1)[1])
        return lines[:limit] if len(lines) <= limit else lines[:limit // 2] + ["..."] + \
            lines[-limit // 2:]
