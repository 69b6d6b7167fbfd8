"""Fusion math against hand-computed cases, and the election's agreement property."""

import math

import numpy as np
import pytest

from dwarfmesh.fusion import pools
from dwarfmesh.mesh.membership import Member, Membership, elect_leader, fusion_group

pytestmark = pytest.mark.timeout(30)

V = 10


def lp(*ps):
    return np.log(np.array(ps, dtype=np.float64)).astype(np.float16)


def test_linear_pool_hand_computed():
    # member A: top-2 {3: .6, 5: .3}, rest .1 over 8 tokens -> floor .0125
    # member B: top-2 {5: .5, 7: .4}, rest .1 -> floor .0125
    ids = [np.array([3, 5]), np.array([5, 7])]
    lps = [lp(0.6, 0.3), lp(0.5, 0.4)]
    f = pools.fuse(ids, lps, [0.1, 0.1], np.array([0.5, 0.5]), V, "linear")
    assert list(f.ids) == [3, 5, 7]
    expect = {3: 0.5 * 0.6 + 0.5 * 0.0125, 5: 0.5 * 0.3 + 0.5 * 0.5, 7: 0.5 * 0.0125 + 0.5 * 0.4}
    for t, p in zip(f.ids, f.probs):
        assert math.isclose(p, expect[int(t)], rel_tol=2e-3)
    assert pools.choose(f, temperature=0, top_p=1, rng=None) == 5
    assert list(f.member_top) == [3, 5]


def test_weights_change_the_winner():
    ids = [np.array([3, 5]), np.array([5, 7])]
    lps = [lp(0.6, 0.3), lp(0.5, 0.4)]
    f = pools.fuse(ids, lps, [0.1, 0.1], np.array([0.9, 0.1]), V, "linear")
    assert pools.choose(f, temperature=0, top_p=1, rng=None) == 3   # .54+ vs .32


def test_loglinear_pool_hand_computed():
    ids = [np.array([3, 5]), np.array([5, 7])]
    lps = [lp(0.6, 0.3), lp(0.5, 0.4)]
    f = pools.fuse(ids, lps, [0.1, 0.1], np.array([0.5, 0.5]), V, "loglinear")
    raw = {3: math.sqrt(0.6 * 0.0125), 5: math.sqrt(0.3 * 0.5), 7: math.sqrt(0.0125 * 0.4)}
    z = sum(raw.values())
    for t, p in zip(f.ids, f.probs):
        assert math.isclose(p, raw[int(t)] / z, rel_tol=2e-3)
    assert math.isclose(f.probs.sum(), 1.0)


def test_identical_members_tie_break_to_first_member_rank():
    # float16 makes .3000 and .3001 equal; the member ranked 7 first, so 7 must win.
    ids = [np.array([7, 2]), np.array([7, 2])]
    lps = [np.log(np.array([0.3001, 0.3])).astype(np.float16)] * 2
    assert lps[0][0] == lps[0][1]
    f = pools.fuse(ids, lps, [0.4, 0.4], np.array([1.0, 1.0]), V)
    assert pools.choose(f, temperature=0, top_p=1, rng=None) == 7


def test_seeded_sampling_is_reproducible_and_respects_top_p():
    ids = [np.array([1, 2, 3])]
    f = pools.fuse(ids, [lp(0.7, 0.2, 0.1)], [0.0], np.array([1.0]), V)
    a = [pools.choose(f, temperature=1.0, top_p=1.0, rng=np.random.default_rng(5))
         for _ in range(3)]
    b = [pools.choose(f, temperature=1.0, top_p=1.0, rng=np.random.default_rng(5))
         for _ in range(3)]
    assert a == b
    rng = np.random.default_rng(1)
    picks = {pools.choose(f, temperature=1.0, top_p=0.6, rng=rng) for _ in range(200)}
    assert picks == {1}
    picks = {pools.choose(f, temperature=1.0, top_p=0.85, rng=rng) for _ in range(400)}
    assert picks == {1, 2}           # smallest set with mass >= .85: {.7, .2}


def test_perplexity_weights_and_online_fixed_share():
    w = pools.perplexity_weights([1.0, 2.0], tau=1.0)
    assert math.isclose(w[0], math.e / (math.e + 1), rel_tol=1e-9)
    ow = pools.OnlineWeights(np.array([0.5, 0.5]), eta=1.0, alpha=0.1)
    w = ow.update(np.log(np.array([0.8, 0.2])))
    # Bayes: (.8, .2); fixed share: .9 * (.8, .2) + .05
    assert np.allclose(w, [0.77, 0.23])
    for _ in range(200):
        w = ow.update(np.log(np.array([0.01, 0.9])))
    assert w[0] >= 0.05 - 1e-12          # fixed share keeps a floor of alpha/N
    assert w[1] > 0.9


def member(nid, fp="f"):
    return Member(nid, f"name-{nid}", "m", fp, 100, f"h:{nid}")


def test_election_same_view_same_leader_and_spread():
    members = [member(f"n{i}") for i in range(5)]
    leaders = {elect_leader(f"s{j}", members).node_id for j in range(200)}
    assert len(leaders) == 5                      # leadership spreads over the mesh
    for j in range(50):
        s = f"s{j}"
        views = [elect_leader(s, list(reversed(members))), elect_leader(s, members)]
        assert views[0] == views[1]
        # a node that is not the leader leaving does not move the leadership
        lead = views[0]
        others = [m for m in members if m != lead]
        assert elect_leader(s, [lead, *others[1:]]) == lead


def test_fusion_group_prefers_largest_tokenizer_group():
    ms = [member("a", "x"), member("b", "y"), member("c", "y")]
    group, out = fusion_group(ms)
    assert [m.node_id for m in group] == ["b", "c"]
    assert out[0][0].node_id == "a" and "different tokenizer" in out[0][1]


def test_membership_expiry():
    mem = Membership(me=member("me"), liveness_s=3.0)
    assert mem.peer_up(member("p"), now=0.0)
    assert not mem.peer_up(member("p"), now=1.0)
    mem.heard_from("p", now=2.0, leading=["s1"])
    assert mem.expire(now=4.0) == []
    assert mem.peers["p"].leading == ("s1",)
    assert [m.node_id for m in mem.expire(now=5.5)] == ["p"]
    assert [m.node_id for m in mem.alive()] == ["me"]
