"""Every wait on a session path, its bound, and when the waiter asks again.

A session never waits on a peer without a bound, and never waits *silently*: what a live
peer may have lost is asked for again (the Paranoid Pirate way: resend, don't just wait),
so one lost message costs one resend interval, not a timeout. The bounds, with L the
liveness window (`HEARTBEAT_INTERVAL_S * LIVENESS`, 3 s) and R the resend interval:

- leader, step 0: every member's first frame (prefill). Asks again: `Open` every
  `OPEN_RESEND_S`. Gives up: `prefill_bound`, 16 x the leader's own prefill (at least
  `MIN_PREFILL_WAIT_S`, at most `PREFILL_TIMEOUT_S`), or at once when the member dies.
- leader, step s: every member's frame for s. Asks again: `Token(s-1)` every R. Gives
  up: `reply_bound`, L + R + 4 x the session's slowest forward (or `--step-timeout`).
- leader, after a takeover: every survivor's frame. Asks again: `Resume` every R; a
  member behind is sent the Tokens it lacks. Gives up: `reply_bound`.
- text leader, each round: every member's Proposal / Scores / TextFrame. Asks again:
  its trigger every R. Gives up: `reply_bound` (step 0: `PREFILL_TIMEOUT_S`).
- member: the next message from its leader. Asks nothing (the leader resends, also to
  members that answered, so a live leader is heard). Gives up: `MEMBER_IDLE_S`, then it
  frees the session (its leader is gone with no one to take over, or never meant it).
- origin: the leader's acknowledgement of `Start` (sent on receipt, before prefill).
  Asks again: `Start` every `OPEN_RESEND_S`; to the next leader by rank once the first
  is dead or has not acknowledged within `START_ACK_S` (one lost Start and its resend).
  Gives up: `FAILOVER_GRACE_S` after the last candidate died, or when no candidate
  acknowledged.
- origin: the leader's next Token or End. Asks again: `Attach` from the first piece it
  lacks after every `ORIGIN_PROBE_S` of silence (a lost last Token or End is replayed,
  from the leader's finished answers once it is done; during a long prefill the leader
  has nothing to replay and the probe costs one small message). Gives up:
  `PREFILL_TIMEOUT_S` of silence from a live leader.
- origin: a new leader after the old one died. Asks nothing (members elect one and it
  sends `Resume`). Gives up: `FAILOVER_GRACE_S`.
- client: any message from its node. Asks again: a probe every `PROBE_AFTER_S`, then
  the next node it knows. Gives up: `CLIENT_TIMEOUT_S` for the whole answer.

A peer is dead only when the mesh's own heartbeats say so (silent past L), and a wait
never counts the time this node itself was not running (SIGSTOP, a suspended laptop, a
starved CPU: `own_stall`): a node that wakes after L would otherwise find every peer
"silent" and every wait expired, though their messages sit unread in its sockets. A takeover
is refused by members and the origin while they still hear from the current leader
(within `LEASE_S`, L/2): the claimer was the one cut off. An mDNS
goodbye or expiry is a hint to check, never a death certificate.

Owns: the bounds and resend intervals (named constants and pure functions). Does not:
wait itself (`round.Round`, the tables and the client do).
"""

from __future__ import annotations

from dwarfmesh.config import (
    HEARTBEAT_INTERVAL_S,
    LIVENESS,
    OPEN_RESEND_S,
    PREFILL_TIMEOUT_S,
    STEP_TIMEOUT_S,
)

LIVENESS_S = HEARTBEAT_INTERVAL_S * LIVENESS
RESEND_S = HEARTBEAT_INTERVAL_S       # a silent member is asked again this often
LEASE_S = LIVENESS_S / 2              # a leader heard from this recently is not replaced
START_ACK_S = LIVENESS_S + OPEN_RESEND_S   # a leader that never acknowledges is passed over
ORIGIN_PROBE_S = LIVENESS_S + RESEND_S     # an origin this long without a piece asks
STRAGGLER_FACTOR = 4.0                # a frame this many forwards late is not coming
MEMBER_IDLE_S = 30.0                  # a member frees a session its leader left this long
MIN_PREFILL_WAIT_S = 15.0             # the least a leader waits for a member's first frame
PREFILL_FACTOR = 16.0                 # ... or this many times its own prefill
STALL_S = HEARTBEAT_INTERVAL_S        # woken this much later than asked: this node stalled


def own_stall(expected: float, now: float) -> float:
    """How long this node was not running, if it woke at `now` from a timer due at
    `expected` (0 for ordinary scheduling jitter): waits extend by it."""
    late = now - expected
    return late if late > STALL_S else 0.0


def reply_bound(slowest_forward_s: float, cap_s: float | None = None) -> float:
    """How long a leader waits for a live member's reply before leaving it out.

    A live member answers within its forward time once the trigger reached it; a lost
    trigger is resent every `RESEND_S`; a dead one is declared dead within `LIVENESS_S`.
    So the liveness window plus one resend plus a few forwards (the member's machine may
    be busy with other sessions) bounds any single fault. `cap_s` (`--step-timeout`)
    overrides it.
    """
    if cap_s is not None:
        return cap_s
    return min(LIVENESS_S + RESEND_S + STRAGGLER_FACTOR * max(slowest_forward_s, 0.0),
               STEP_TIMEOUT_S)


def prefill_bound(own_prefill_s: float) -> float:
    """How long a leader waits for a member's first frame: prefill time grows with the
    prompt, so it is measured by the leader's own prefill of the same prompt; a member
    many times slower than the leader (a bigger model of the family, a slower machine)
    still fits, and a peer that says Hello but never answers costs at most this."""
    return min(max(MIN_PREFILL_WAIT_S, PREFILL_FACTOR * own_prefill_s), PREFILL_TIMEOUT_S)


def resend_interval(slowest_forward_s: float) -> float:
    """How often a missing reply is asked for again: not before a member could answer,
    and often enough that every member of a live session hears from its leader well
    within `MEMBER_IDLE_S`."""
    return min(max(RESEND_S, 2.0 * max(slowest_forward_s, 0.0)), MEMBER_IDLE_S / 3)
