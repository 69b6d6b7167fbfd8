"""Discovery over real mDNS, always inside network namespaces (never the host's interfaces).

Each node is its own process (`discovery_driver.py`) reporting on_up/on_down as JSON lines;
the pure tests at the end check the TXT record format without any network.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from zeroconf.asyncio import AsyncServiceInfo

from dwarfmesh.mesh.discovery import (
    EXPIRY_BOUND_S,
    SERVICE_TYPE,
    Discovery,
    PeerRecord,
    advertised_addresses,
    instance_name,
    pick_address,
)

if TYPE_CHECKING:
    from netns import Namespace

pytest_plugins = ("netns",)  # fixtures: lo_netns, bridged_netns_factory

DRIVER = str(Path(__file__).with_name("discovery_driver.py"))
FIND_TIMEOUT_S = 10.0        # three fresh nodes see each other well within this
GOODBYE_TIMEOUT_S = 3.0      # a clean stop reaches the others this fast
SLACK_S = 3.0                # scheduling noise on a loaded CI machine


class Node:
    """One driver process; collects its JSON events on a reader thread."""

    def __init__(self, proc: subprocess.Popen[str], label: str) -> None:
        self.proc, self.label = proc, label
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.events.append(json.loads(line))
                self._changed.notify_all()

    def peers(self) -> dict[str, dict[str, Any]]:
        """The peer set its on_up/on_down calls describe."""
        seen: dict[str, dict[str, Any]] = {}
        for event in list(self.events):
            if event["event"] == "up":
                seen[event["record"]["node_id"]] = event["record"]
            elif event["event"] == "down":
                seen.pop(event["node_id"], None)
        return seen

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> float:
        """Seconds until `condition` held; fails the test after `timeout`."""
        start = time.monotonic()
        with self._changed:
            while not condition():
                left = start + timeout - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self._reader.is_alive():
                    pytest.fail(f"{self.label}: not {what} after {timeout:.0f}s; "
                                f"events: {self.events}")
                self._changed.wait(min(left, 0.2))
        return time.monotonic() - start

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        self.wait_until(lambda: any(e["event"] == "stopped" for e in self.events), 10, "stopped")
        assert self.proc.wait(timeout=10) == 0


def start_node(ns: Namespace, node_id: str, port: int, log_dir: Path, *extra: str) -> Node:
    stderr = open(log_dir / f"{node_id}.log", "a")  # noqa: SIM115  (closed with the process)
    node = Node(ns.python(DRIVER, "node", node_id, "--port", str(port), *extra, stderr=stderr),
                node_id)
    stderr.close()
    node.wait_until(lambda: bool(node.events), 15, "started")
    assert node.events[0] == {"event": "started"}
    return node


def expected(node_id: str, host: str, port: int) -> dict[str, Any]:
    return {"node_id": node_id, "name": f"name-{node_id}", "model": f"model-{node_id}",
            "fingerprint": f"fp-{node_id}", "vocab_size": 49152, "protocol_version": 1,
            "host": host, "port": port}


PORTS = {"alpha": 6001, "bravo": 6002, "charlie": 6003}


def start_trio(ns: Namespace, log_dir: Path) -> dict[str, Node]:
    nodes = {node_id: start_node(ns, node_id, port, log_dir) for node_id, port in PORTS.items()}
    for node_id, node in nodes.items():
        others = {other: expected(other, "127.0.0.1", PORTS[other]) for other in PORTS
                  if other != node_id}
        node.wait_until(lambda node=node, others=others: node.peers() == others,
                        FIND_TIMEOUT_S, f"seeing exactly {sorted(others)}")
    return nodes


def down_events(node: Node, node_id: str) -> int:
    return sum(1 for e in node.events if e["event"] == "down" and e["node_id"] == node_id)


def up_events(node: Node, node_id: str) -> int:
    return sum(1 for e in node.events if e["event"] == "up" and e["record"]["node_id"] == node_id)


@pytest.mark.netns
@pytest.mark.timeout(60)
def test_three_nodes_find_each_other(lo_netns: Namespace, tmp_path: Path) -> None:
    nodes = start_trio(lo_netns, tmp_path)
    for node_id, node in nodes.items():
        ups = [e["record"]["node_id"] for e in node.events if e["event"] == "up"]
        assert node_id not in ups, "a node must never report itself"
        assert sorted(ups) == sorted(set(PORTS) - {node_id}), "one on_up per peer, no repeats"
    for node in nodes.values():
        node.stop()


@pytest.mark.netns
@pytest.mark.timeout(60)
def test_clean_stop_sends_goodbye(lo_netns: Namespace, tmp_path: Path) -> None:
    nodes = start_trio(lo_netns, tmp_path)
    nodes["alpha"].stop()
    for survivor in ("bravo", "charlie"):
        node = nodes[survivor]
        took = node.wait_until(lambda node=node: "alpha" not in node.peers(),
                               GOODBYE_TIMEOUT_S, "told alpha left")
        assert took < GOODBYE_TIMEOUT_S
        assert down_events(node, "alpha") == 1
        assert set(node.peers()) == {"bravo", "charlie"} - {survivor}


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_killed_node_expires_and_can_come_back(lo_netns: Namespace, tmp_path: Path) -> None:
    nodes = start_trio(lo_netns, tmp_path)
    nodes["alpha"].proc.send_signal(signal.SIGKILL)   # no goodbye
    killed_at = time.monotonic()
    nodes["alpha"].proc.wait(timeout=5)
    for survivor in ("bravo", "charlie"):
        node = nodes[survivor]
        node.wait_until(lambda node=node: "alpha" not in node.peers(),
                        EXPIRY_BOUND_S + SLACK_S - (time.monotonic() - killed_at),
                        "expired alpha")
    # The survivors kept each other past a full TTL: live peers are refreshed, not expired.
    for survivor, other in (("bravo", "charlie"), ("charlie", "bravo")):
        assert set(nodes[survivor].peers()) == {other}
        assert down_events(nodes[survivor], other) == 0
        assert up_events(nodes[survivor], other) == 1, "refreshing is not a new on_up"
    # A node that comes back under the same id is reported again.
    start_node(lo_netns, "alpha", PORTS["alpha"], tmp_path)
    for survivor in ("bravo", "charlie"):
        node = nodes[survivor]
        node.wait_until(lambda node=node: "alpha" in node.peers(), FIND_TIMEOUT_S,
                        "seeing alpha again")
        assert node.peers()["alpha"] == expected("alpha", "127.0.0.1", PORTS["alpha"])


@pytest.mark.netns
@pytest.mark.timeout(60)
def test_browse_once_lists_live_nodes(lo_netns: Namespace, tmp_path: Path) -> None:
    nodes = start_trio(lo_netns, tmp_path)
    nodes["charlie"].stop()
    browser = Node(lo_netns.python(DRIVER, "browse", "--timeout", "2",
                                   stderr=subprocess.DEVNULL), "browser")
    browser.wait_until(lambda: bool(browser.events), 15, "done browsing")
    assert browser.proc.wait(timeout=10) == 0
    assert browser.events[0]["records"] == [expected("alpha", "127.0.0.1", PORTS["alpha"]),
                                           expected("bravo", "127.0.0.1", PORTS["bravo"])]


@pytest.mark.netns
@pytest.mark.timeout(60)
def test_nodes_on_separate_hosts_advertise_their_bridge_address(
        bridged_netns_factory: Callable[..., list[Namespace]], tmp_path: Path) -> None:
    hosts = bridged_netns_factory(3)
    nodes = {f"h{i}": start_node(ns, f"h{i}", 7000 + i, tmp_path) for i, ns in enumerate(hosts)}
    for i, node in enumerate(nodes.values()):
        others = {f"h{j}": expected(f"h{j}", hosts[j].address, 7000 + j)
                  for j in range(len(hosts)) if j != i}
        node.wait_until(lambda node=node, others=others: node.peers() == others,
                        FIND_TIMEOUT_S, "seeing the other hosts at their bridge addresses")
    browser = Node(hosts[0].python(DRIVER, "browse", stderr=subprocess.DEVNULL), "browser")
    browser.wait_until(lambda: bool(browser.events), 15, "done browsing")
    assert [r["host"] for r in browser.events[0]["records"]] == [ns.address for ns in hosts]


# --- pure: no network ---------------------------------------------------------------------

ME = PeerRecord("0a1b2c3d4e5f", "studio", "smollm2-135m", "sha256:abcd", 49152, 1,
                "10.0.0.7", 5757)


def service_info(txt: dict[str, str], *, name: str = instance_name(ME.node_id),
                 port: int = ME.port, type_: str = SERVICE_TYPE,
                 addresses: list[str] | None = None) -> AsyncServiceInfo:
    return AsyncServiceInfo(type_, name, port=port, properties=txt,
                            parsed_addresses=addresses or ["10.0.0.7"])


def test_txt_round_trip() -> None:
    txt = ME.to_txt()
    assert txt == {"node_id": "0a1b2c3d4e5f", "name": "studio", "model": "smollm2-135m",
                   "fingerprint": "sha256:abcd", "vocab": "49152", "proto": "1", "port": "5757"}
    assert PeerRecord.from_service_info(service_info(txt)) == ME
    assert ME.address() == "10.0.0.7:5757"


@pytest.mark.parametrize("change", [
    {"vocab": "many"}, {"vocab": "0"}, {"proto": "-1"}, {"port": "80"}, {"node_id": "a b"},
    {"node_id": "other"}, {"fingerprint": None},
])
def test_malformed_txt_yields_none(change: dict[str, str | None]) -> None:
    txt = {key: value for key, value in {**ME.to_txt(), **change}.items() if value is not None}
    assert PeerRecord.from_service_info(service_info(txt)) is None


def test_foreign_records_yield_none() -> None:
    foreign = "_http._tcp.local."
    assert PeerRecord.from_service_info(
        service_info(ME.to_txt(), type_=foreign, name=f"{ME.node_id}.{foreign}")) is None
    assert PeerRecord.from_service_info(service_info({"path": "/"})) is None
    assert PeerRecord.from_service_info(service_info({})) is None


def test_long_names_are_clipped_to_fit_txt() -> None:
    long = dataclasses.replace(ME, model="/models/" + "x" * 400)
    txt = long.to_txt()
    assert all(len(f"{k}={v}".encode()) < 256 for k, v in txt.items())
    assert txt["model"].startswith("/models/xxx")


def test_address_choice() -> None:
    lan = [ipaddress.ip_network("192.168.1.0/24")]
    assert pick_address(["127.0.0.1", "10.8.0.2", "192.168.1.9"], lan) == "192.168.1.9"
    assert pick_address(["127.0.0.1", "10.8.0.2"], lan) == "10.8.0.2"
    assert pick_address(["fe80::1", "127.0.0.1"], []) == "127.0.0.1"
    assert pick_address([], lan) is None
    assert dataclasses.replace(ME, host="fd00::1").address() == "[fd00::1]:5757"
    assert advertised_addresses("10.0.0.7", ["10.0.0.8"]) == ["10.0.0.7"]
    assert advertised_addresses("0.0.0.0", ["10.0.0.8"]) == ["10.0.0.8"]
    assert advertised_addresses("0.0.0.0", None)   # every non-loopback IPv4, or 127.0.0.1


def test_stop_before_start_is_a_no_op() -> None:
    discovery = Discovery(ME, on_up=lambda record: None, on_down=lambda node_id: None)
    asyncio.run(discovery.stop())
    assert discovery.peers() == {}
