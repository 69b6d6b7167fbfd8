"""The worth policy (`fusion.worth`): who votes, when the anchor's choice stands, which
whole answer is kept. Pure functions: no model, no network."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dwarfmesh.fusion import worth

pytestmark = pytest.mark.timeout(10)


def test_the_gate_benches_a_member_far_weaker_on_the_prompt():
    g = worth.gate({"a": 0.40, "b": 0.50, "c": 1.30}, ["a", "b", "c"], ratio=0.5)
    assert g.voters == ("a", "b") and g.anchor == "a"
    assert set(g.benched) == {"c"} and "above the strongest" in g.benched["c"]


def test_the_gate_orders_voters_strongest_first_and_keeps_the_unmeasured():
    g = worth.gate({"a": 0.5, "b": None, "c": 0.3}, ["a", "b", "c"], ratio=1.0)
    assert g.voters == ("c", "a", "b")           # b reported nothing: votes, never anchors
    assert worth.gate({"a": None, "b": None}, ["a", "b"]).voters == ("a", "b")


def test_a_nonsense_claim_counts_as_no_claim():
    g = worth.gate({"a": float("nan"), "b": -1.0, "c": 0.5}, ["a", "b", "c"])
    assert g.anchor == "c" and set(g.voters) == {"a", "b", "c"}


def test_select_keeps_the_answer_whose_worst_judge_likes_it_best():
    # judge 0 loves candidate 1 (its own), judge 1 finds it awful; candidate 0 is fine
    # for both.
    nll = np.array([[20.0, 5.0], [22.0, 90.0]])
    s = worth.select_answer(nll, [100, 100])
    assert s.best == 0 and s.margin == pytest.approx(0.9 - 0.22)
    assert s.worst_per_byte.tolist() == pytest.approx([0.22, 0.9])


def test_select_normalises_by_length_and_breaks_ties_to_the_first():
    nll = np.array([[10.0, 20.0]])
    assert worth.select_answer(nll, [10, 20]).best == 0
    assert worth.select_answer(np.array([[1.0]]), [4]).margin == math.inf
    # a judge whose score is not finite counts as the worst possible
    assert worth.select_answer(np.array([[np.nan, 5.0]]), [10, 10]).best == 1
