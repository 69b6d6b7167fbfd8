"""mDNS advertisement and browsing of dwarfmesh nodes (python-zeroconf, asyncio API).

Owns: advertising this node as one `_dwarfmesh._tcp` service whose TXT record says who it
is (node id, name, model, fingerprint, vocabulary size, protocol version, port; nothing
secret), browsing for the other nodes, and turning what mDNS sees into two events:
`on_up(PeerRecord)` when a peer appears or its record changes, `on_down(node_id)` when it
says goodbye or its records expire. `browse_once` is the same browsing for clients.

Does not own: static `--peer` addresses, handshakes, heartbeats and liveness (transport);
who is a member (membership). mDNS is slow to notice a dead node by design (bounded by
`EXPIRY_BOUND_S`); the transport's heartbeats notice it sooner.

Why a sweep: zeroconf raises every received PTR TTL to at least 1125 s, so the browser
alone reports a node killed without a goodbye only ~19 minutes later. We therefore keep
every known peer's SRV/TXT/A records (short `RECORD_TTL_S`) fresh ourselves: when they
expire from the cache we ask once more, and a peer that does not answer is down.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ifaddr
from zeroconf import DNSQuestionType, IPVersion, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_dwarfmesh._tcp.local."
RECORD_TTL_S = 15            # TTL of our SRV/TXT/A records: how long a silent node stays cached
SWEEP_INTERVAL_S = 2.0       # how often each known peer's cached records are checked
RESOLVE_TIMEOUT_S = 3.0      # how long a query for a peer's records waits for the answer
EXPIRY_BOUND_S = RECORD_TTL_S + SWEEP_INTERVAL_S + RESOLVE_TIMEOUT_S  # killed node -> on_down
MAX_TXT_VALUE_BYTES = 200    # a TXT string ("key=value") holds at most 255 bytes
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
_NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,63}")
_TXT_KEYS = ("node_id", "name", "model", "fingerprint", "vocab", "proto", "port")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def instance_name(node_id: str) -> str:
    """The mDNS service instance name of a node: its id, which is unique per node."""
    return f"{node_id}.{SERVICE_TYPE}"


def _clip(text: str, limit: int = MAX_TXT_VALUE_BYTES) -> str:
    return text.encode()[:limit].decode(errors="ignore")


@dataclass(frozen=True)
class PeerRecord:
    """What one node advertises: enough to dial it and to judge if it can fuse with us."""

    node_id: str
    name: str
    model: str
    fingerprint: str
    vocab_size: int
    protocol_version: int
    host: str
    port: int

    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def to_txt(self) -> dict[str, str]:
        """TXT properties; `name` and `model` are clipped to fit a TXT string."""
        txt = {"node_id": self.node_id, "name": _clip(self.name), "model": _clip(self.model),
               "fingerprint": self.fingerprint, "vocab": str(self.vocab_size),
               "proto": str(self.protocol_version), "port": str(self.port)}
        for key, value in txt.items():
            if len(value.encode()) > MAX_TXT_VALUE_BYTES:
                raise ValueError(f"TXT value {key}={value[:20]!r}... is too long for mDNS")
        return txt

    @classmethod
    def from_txt(cls, txt: Mapping[str, str | None], *, host: str, port: int) -> PeerRecord:
        """Parse and validate TXT properties; ValueError says what is wrong."""
        missing = [key for key in _TXT_KEYS if not isinstance(txt.get(key), str)]
        if missing:
            raise ValueError(f"missing TXT keys {missing}")
        node_id, vocab, proto = str(txt["node_id"]), int(str(txt["vocab"])), int(str(txt["proto"]))
        if not _NODE_ID.fullmatch(node_id):
            raise ValueError(f"bad node_id {node_id!r}")
        if vocab <= 0 or proto < 0:
            raise ValueError(f"bad vocab {vocab} or proto {proto}")
        if int(str(txt["port"])) != port or not 0 < port < 65536:
            raise ValueError(f"TXT port {txt['port']} does not match SRV port {port}")
        return cls(node_id, str(txt["name"]), str(txt["model"]), str(txt["fingerprint"]),
                   vocab, proto, host, port)

    @classmethod
    def from_service_info(cls, info: ServiceInfo, *,
                          local_networks: Sequence[Network] = ()) -> PeerRecord | None:
        """The record a resolved service describes, or None (logged) if it is not ours or bad.

        Of several advertised addresses, prefer one on a network we are on (`local_networks`).
        """
        host = pick_address(info.parsed_addresses(), local_networks)
        try:
            if info.type != SERVICE_TYPE or info.port is None or host is None:
                raise ValueError("wrong type, or no port or address")
            record = cls.from_txt(info.decoded_properties, host=host, port=info.port)
            if info.name != instance_name(record.node_id):
                raise ValueError(f"instance name does not match node_id {record.node_id!r}")
        except ValueError as exc:
            log.warning("ignoring mDNS record %s: %s", info.name, exc)
            return None
        return record


def _local_ips() -> list[tuple[str, int]]:
    """(address, prefix length) of every IPv4 address on this host (this namespace)."""
    return [(str(ip.ip), ip.network_prefix) for adapter in ifaddr.get_adapters()
            for ip in adapter.ips if ip.is_IPv4]


def advertised_addresses(host: str, interfaces: Sequence[str] | None) -> list[str]:
    """Where peers should dial us: `host` if it is a concrete IP, else the chosen interfaces'
    IPs, else every non-loopback IPv4 address (loopback only when there is nothing else)."""
    if host not in _WILDCARD_HOSTS:
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            log.warning("advertising interface addresses: --host %r is not an IP", host)
    if interfaces:
        return list(interfaces)
    ips = [ip for ip, _ in _local_ips() if not ipaddress.ip_address(ip).is_loopback]
    return ips or ["127.0.0.1"]


def pick_address(addresses: Sequence[str], networks: Sequence[Network]) -> str | None:
    """The address to dial: IPv4 before IPv6; on one of `networks`, else non-loopback."""
    def rank(text: str) -> tuple[int, int, int]:
        ip = ipaddress.ip_address(text)
        return (ip.version, 0 if any(ip in net for net in networks) else 1, int(ip.is_loopback))
    return min(addresses, key=rank, default=None)


def _zeroconf(interfaces: list[str] | None) -> AsyncZeroconf:
    if interfaces:
        return AsyncZeroconf(interfaces=interfaces)  # zeroconf picks the IP version from them
    return AsyncZeroconf(ip_version=IPVersion.V4Only)


class _PeerBrowser:
    """Browses for dwarfmesh services and keeps `peers` current (shared by both users)."""

    def __init__(self, zc: AsyncZeroconf, *, on_up: Callable[[PeerRecord], None],
                 on_down: Callable[[str], None], exclude: str | None = None) -> None:
        self._zc, self._on_up, self._on_down, self._exclude = zc, on_up, on_down, exclude
        self.peers: dict[str, PeerRecord] = {}
        self._networks: list[Network] = []
        self._browser: AsyncServiceBrowser | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._jobs: dict[str, asyncio.Task[None]] = {}  # at most one job per instance name
        # Expired peers: their PTR outlives them in zeroconf's cache, so if one comes back
        # with the same records the browser reports nothing; the sweep watches the cache.
        self._silent: set[str] = set()

    def start(self) -> None:
        self._networks = [ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
                          for ip, prefix in _local_ips()]
        # QM, never QU: a unicast answer to port 5353 reaches only one of the sockets bound
        # there, often another mDNS stack on the same host (e.g. a node next to a client).
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE,
                                            handlers=[self._on_service_state_change],
                                            question_type=DNSQuestionType.QM)
        self._sweeper = asyncio.create_task(self._sweep(), name="mdns-sweep")

    async def stop(self) -> None:
        if self._browser is not None:  # first, so that no new jobs are scheduled
            await self._browser.async_cancel()
            self._browser = None
        tasks = [*self._jobs.values(), *([self._sweeper] if self._sweeper else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _on_service_state_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                                 state_change: ServiceStateChange) -> None:
        """Browser handler: only schedules; the latest event for a name wins."""
        node_id = name.removesuffix("." + SERVICE_TYPE)
        if node_id == self._exclude or service_type != SERVICE_TYPE:
            return
        if state_change is ServiceStateChange.Removed:
            self._schedule(name, self._forget(node_id, "said goodbye"))
        else:
            self._schedule(name, self._resolve(name))

    def _schedule(self, name: str, job: Coroutine[Any, Any, None]) -> None:
        previous = self._jobs.get(name)
        if previous is not None:
            previous.cancel()
        task = asyncio.create_task(job, name=f"mdns {name}")
        self._jobs[name] = task
        task.add_done_callback(lambda done: self._job_done(name, done))

    def _job_done(self, name: str, task: asyncio.Task[None]) -> None:
        if self._jobs.get(name) is task:
            del self._jobs[name]
        if not task.cancelled() and task.exception() is not None:
            log.error("mDNS job for %s failed", name, exc_info=task.exception())

    async def _resolve(self, name: str) -> None:
        """Read the peer's records from the cache, or ask for them; report what changed."""
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        # QM (see start): answers are multicast, so one query refreshes every cache.
        answered = await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_S * 1000,
                                            question_type=DNSQuestionType.QM)
        node_id = name.removesuffix("." + SERVICE_TYPE)
        record = (PeerRecord.from_service_info(info, local_networks=self._networks)
                  if answered else None)
        if record is None:
            await self._forget(node_id, "records expired" if not answered else "bad record")
            if not answered:
                self._silent.add(node_id)
            return
        self._silent.discard(node_id)
        if self.peers.get(node_id) != record:
            self.peers[node_id] = record
            log.debug("mDNS: %s is up at %s", node_id, record.address())
            self._on_up(record)

    async def _forget(self, node_id: str, why: str) -> None:
        self._silent.discard(node_id)
        if self.peers.pop(node_id, None) is not None:
            log.debug("mDNS: %s is down (%s)", node_id, why)
            self._on_down(node_id)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            for node_id in [*self.peers, *self._silent]:
                name = instance_name(node_id)
                if name in self._jobs:
                    continue
                if node_id in self.peers or self._back_in_cache(name):
                    self._schedule(name, self._resolve(name))

    def _back_in_cache(self, name: str) -> bool:
        return AsyncServiceInfo(SERVICE_TYPE, name).load_from_cache(self._zc.zeroconf)


class Discovery:
    """Advertises `me` and reports the other dwarfmesh nodes on the LAN."""

    def __init__(self, me: PeerRecord, *, on_up: Callable[[PeerRecord], None],
                 on_down: Callable[[str], None], interfaces: list[str] | None = None) -> None:
        self.me = me
        self._on_up, self._on_down, self._interfaces = on_up, on_down, interfaces
        self._zc: AsyncZeroconf | None = None
        self._browser: _PeerBrowser | None = None
        self._info: AsyncServiceInfo | None = None

    async def start(self) -> None:
        """Register (probe + announce) and start browsing. NonUniqueNameException if our
        node id is already advertised by a live node; OSError if no multicast socket."""
        if self._zc is not None:
            raise RuntimeError("Discovery already started")
        addresses = advertised_addresses(self.me.host, self._interfaces)
        self._info = AsyncServiceInfo(
            SERVICE_TYPE, instance_name(self.me.node_id), port=self.me.port,
            properties=self.me.to_txt(), server=f"dwarfmesh-{self.me.node_id}.local.",
            parsed_addresses=addresses, host_ttl=RECORD_TTL_S, other_ttl=RECORD_TTL_S)
        zc = _zeroconf(self._interfaces)
        registered = False
        try:
            await (await zc.async_register_service(self._info))
            registered = True
        finally:
            if not registered:
                await zc.async_close()
        self._zc = zc
        self._browser = _PeerBrowser(zc, on_up=self._on_up, on_down=self._on_down,
                                     exclude=self.me.node_id)
        self._browser.start()
        log.info("mDNS: advertising %s at %s port %d", instance_name(self.me.node_id),
                 ", ".join(addresses), self.me.port)

    async def stop(self) -> None:
        """Send goodbyes and close; safe to call twice or before start."""
        zc, self._zc = self._zc, None
        if zc is None:
            return
        if self._browser is not None:
            await self._browser.stop()
        if self._info is not None:
            await (await zc.async_unregister_service(self._info))
        await zc.async_close()

    def peers(self) -> dict[str, PeerRecord]:
        return dict(self._browser.peers) if self._browser is not None else {}


async def browse_once(timeout: float = 2.0, *,
                      interfaces: list[str] | None = None) -> list[PeerRecord]:
    """The nodes that answer within `timeout` seconds, sorted by name (for clients)."""
    zc = _zeroconf(interfaces)
    browser = _PeerBrowser(zc, on_up=lambda record: None, on_down=lambda node_id: None)
    try:
        browser.start()
        await asyncio.sleep(timeout)
    finally:
        await browser.stop()
        await zc.async_close()
    return sorted(browser.peers.values(), key=lambda record: (record.name, record.node_id))
