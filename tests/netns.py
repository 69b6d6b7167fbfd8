"""Network namespaces for tests that need real multicast without touching the host's network.

- `loopback_netns()`: one namespace with only `lo`, up, multicast on, 224.0.0.0/4 routed to
  it: every process inside sees every other's mDNS on 127.0.0.1, and nothing leaves.
- `bridged_netns(n)`: n namespaces ("hosts"), each with `lo` and an `eth0` veth into a
  bridge that lives in its own switch namespace; host i is 10.199.0.(i+1)/24 by default.
  Nothing is created in the root namespace, so no address or route can clash with the host.
- `bridged_netns_with_switch(n)`: the same, also yielding the switch namespace, where host
  i's bridge port is `veth{i}`; `set_host_link(switch, i, up)` takes that link down / up.
- `Namespace.run` / `popen` / `python`: run a command (or Python) inside it
  (`ip netns exec`); processes started through `popen` are killed on cleanup.
- Fixtures `lo_netns` and `bridged_netns_factory`; tests skip when not root or when
  `ip netns` does not work (`netns_unavailable()` gives the reason).

Namespace names are `dwm<pid>-<n>-<role>`, unique per test run; namespaces left behind by
a run that died (its pid is gone) are removed the next time one is created.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PREFIX = "dwm"
DEFAULT_SUBNET = "10.199.0.0/24"
KILL_TIMEOUT_S = 5.0
REPO_ROOT = Path(__file__).resolve().parent.parent
_counter = itertools.count()


class NetnsError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def netns_unavailable() -> str | None:
    """Why network-namespace tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root for `ip netns`"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    name = _unique_name("probe")
    try:
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")
    except NetnsError as exc:
        return f"`ip netns` does not work here: {exc}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


def _unique_name(role: str) -> str:
    return f"{PREFIX}{os.getpid()}-{next(_counter)}-{role}"


def _remove_stale() -> None:
    """Delete namespaces of earlier runs whose process is gone (never another live run's)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        match = re.match(rf"({PREFIX}(\d+)-\S+)", line)
        if match and not Path(f"/proc/{match.group(2)}").exists():
            _ip("netns", "del", match.group(1), check=False)


@dataclass
class Namespace:
    name: str
    address: str = "127.0.0.1"          # this "host"'s own address inside the namespace
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def command(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, args: Sequence[str], *, timeout: float = 30.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(args), capture_output=True, text=True,
                              timeout=timeout, check=check)

    def popen(self, args: Sequence[str], **kwargs: object) -> subprocess.Popen[str]:
        """Start a process inside; stdin/stdout are text pipes unless overridden."""
        options: dict[str, object] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE,
                                      "text": True, "bufsize": 1, "cwd": REPO_ROOT}
        options.update(kwargs)
        proc: subprocess.Popen[str] = subprocess.Popen(self.command(args), **options)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def python(self, *args: str, **kwargs: object) -> subprocess.Popen[str]:
        """`python ARGS...` inside, with this interpreter (e.g. `"-m", "mod"` or `"-c", code`)."""
        return self.popen([sys.executable, *args], **kwargs)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=KILL_TIMEOUT_S)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


@contextlib.contextmanager
def _namespaces() -> Iterator[list[Namespace]]:
    """Namespaces appended to the yielded list are torn down on exit, processes first."""
    created: list[Namespace] = []
    try:
        yield created
    finally:
        for ns in created:
            ns.kill_all()
        for ns in reversed(created):
            _ip("netns", "del", ns.name, check=False)


def _add(created: list[Namespace], role: str, address: str = "127.0.0.1") -> Namespace:
    ns = Namespace(_unique_name(role), address)
    _ip("netns", "add", ns.name)
    created.append(ns)
    _ip("-n", ns.name, "link", "set", "lo", "up")
    return ns


@contextlib.contextmanager
def loopback_netns() -> Iterator[Namespace]:
    """One namespace whose only interface, lo, carries multicast (mDNS on 127.0.0.1)."""
    _remove_stale()
    with _namespaces() as created:
        ns = _add(created, "lo")
        _ip("-n", ns.name, "link", "set", "lo", "multicast", "on")
        _ip("-n", ns.name, "route", "add", "224.0.0.0/4", "dev", "lo")
        yield ns


@contextlib.contextmanager
def bridged_netns(count: int, subnet: str = DEFAULT_SUBNET) -> Iterator[list[Namespace]]:
    """`count` hosts on one private L2 segment; host i has the i+1-th address of `subnet`."""
    with bridged_netns_with_switch(count, subnet) as (_switch, hosts):
        yield hosts


@contextlib.contextmanager
def bridged_netns_with_switch(count: int, subnet: str = DEFAULT_SUBNET
                              ) -> Iterator[tuple[Namespace, list[Namespace]]]:
    """`bridged_netns`, yielding (switch, hosts): host i's port on the bridge is `veth{i}`."""
    network = ipaddress.ip_network(subnet)
    if count < 1 or count >= network.num_addresses - 2:
        raise ValueError(f"cannot fit {count} hosts in {subnet}")
    _remove_stale()
    with _namespaces() as created:
        switch = _add(created, "sw", address="")
        _ip("-n", switch.name, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch.name, "link", "set", "br0", "up")
        hosts = []
        for i in range(count):
            host = _add(created, f"h{i}", address=str(network[i + 1]))
            _ip("-n", switch.name, "link", "add", f"veth{i}", "type", "veth",
                "peer", "name", "eth0", "netns", host.name)
            _ip("-n", switch.name, "link", "set", f"veth{i}", "master", "br0", "up")
            _ip("-n", host.name, "addr", "add", f"{host.address}/{network.prefixlen}",
                "dev", "eth0")
            _ip("-n", host.name, "link", "set", "eth0", "multicast", "on", "up")
            _ip("-n", host.name, "route", "add", "224.0.0.0/4", "dev", "eth0")
            hosts.append(host)
        yield switch, hosts


def set_host_link(switch: Namespace, index: int, up: bool) -> None:
    """Take host `index`'s link to the bridge down (a pulled cable) or bring it back up."""
    _ip("-n", switch.name, "link", "set", f"veth{index}", "up" if up else "down")


def _skip_if_unavailable() -> None:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def lo_netns() -> Iterator[Namespace]:
    """A loopback-only namespace with multicast (see `loopback_netns`)."""
    _skip_if_unavailable()
    with loopback_netns() as ns:
        yield ns


@pytest.fixture
def bridged_netns_factory() -> Iterator[object]:
    """`make(count, subnet=...) -> list[Namespace]`; everything is removed after the test."""
    _skip_if_unavailable()
    with contextlib.ExitStack() as stack:
        yield lambda count, subnet=DEFAULT_SUBNET: stack.enter_context(
            bridged_netns(count, subnet))
