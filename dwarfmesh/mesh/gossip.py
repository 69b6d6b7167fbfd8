"""Which addresses a node dials because someone told it to: gossip and Hello senders.

Every address a Hello names (its sender's, and the peers it gossips) costs a DEALER
socket and its file descriptors, so a stranger must not be able to make a node dial
thousands of them. `DialPolicy` admits a learned address only while fewer than
`MAX_LEARNED` learned addresses are dialed, and at most `NEW_PER_S` new ones a second;
when full, a learned address that has not become a live peer within `GRACE_S` makes
room. Addresses the user gave (`--peer`) or mDNS found are never counted or evicted.

Pure bookkeeping with an explicit clock: the node owns the sockets and hangs up what
this evicts. It does not validate addresses (`bounds.parse_address` did, on decode).
"""

from __future__ import annotations

MAX_LEARNED = 64        # learned addresses dialed at once
NEW_PER_S = 16          # new learned addresses admitted per second
GRACE_S = 10.0          # a learned address not live by then may be evicted for a new one


class DialPolicy:
    def __init__(self, *, most: int = MAX_LEARNED, per_s: int = NEW_PER_S,
                 grace_s: float = GRACE_S) -> None:
        self.most, self.per_s, self.grace_s = most, per_s, grace_s
        self._since: dict[str, float] = {}      # learned address -> when it was admitted
        self._second, self._admitted = -1, 0
        self.refused = 0

    def admit(self, address: str, targets: dict[str, str], live: set[str],
              now: float) -> tuple[bool, list[str]]:
        """May `address` be dialed as a learned target? Returns (yes, addresses to hang
        up to make room). `targets`: address -> how the node knows it; `live`: addresses
        of live peers."""
        for addr in [a for a in self._since if targets.get(a) != "learned"]:
            del self._since[addr]                  # the node dropped or re-labelled it
        second = int(now)
        if second != self._second:
            self._second, self._admitted = second, 0
        if self._admitted >= self.per_s:
            self.refused += 1
            return False, []
        evicted: list[str] = []
        learned = [a for a, how in targets.items() if how == "learned"]
        if len(learned) >= self.most:
            stale = sorted((t, a) for a, t in self._since.items()
                           if a not in live and now - t > self.grace_s)
            if len(learned) - len(stale) >= self.most:
                self.refused += 1
                return False, []
            evicted = [a for _, a in stale[: len(learned) - self.most + 1]]
            for a in evicted:
                del self._since[a]
        self._admitted += 1
        self._since[address] = now
        return True, evicted
