"""Cross-vocabulary alignment (textfuse) and the session plan, against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dwarfmesh.fusion import text as tf
from dwarfmesh.mesh.membership import Member, plan_session
from dwarfmesh.wire.protocol import GenParams

pytestmark = pytest.mark.timeout(30)


def frame(pairs: dict[str, float], eos: float, rest: float, vocab: int) -> tf.TextTopK:
    return tf.TextTopK(list(pairs), np.log(np.array(list(pairs.values()))), math.log(eos),
                       rest, vocab)


# --- where a proposal ends ------------------------------------------------------------------


@pytest.mark.parametrize("text, done, cut", [
    ("\n    if len", False, None),          # no boundary yet: keep generating
    ("\n    if len", True, 7),              # done: cut before the last word's space
    ("\n    if x:\n        return", False, 10),   # a newline after content ends it
    ("    return xs\n", True, 13),
    ("quicksort", True, 9),                 # one word outlasts the budget: take it all
    ("   ", False, None),
    ("   ", True, 3),                       # only whitespace, budget spent: take it
    ("", True, None),
    (" a  b", True, 2),                     # before a run of spaces, not inside it
])
def test_proposal_cut(text, done, cut):
    assert tf.proposal_cut(text, done=done) == cut


@pytest.mark.timeout(10)
def test_stop_at_is_the_earliest_start_of_any_stop_reaching_into_the_new_text():
    from dwarfmesh.fusion.textcut import stop_at

    text = "a = 1\n# note\ndef g():"
    assert stop_at(text, len(text), ["\ndef ", "\n#"]) == text.index("\n#")   # not list order
    assert stop_at(text, len(text), ["zz", ""]) is None
    assert stop_at(text, 4, ["\ndef "]) is None              # all before the new tail: seen
    assert stop_at(text, 8, ["\ndef "]) == text.index("\ndef ")   # spans old and new text
    assert stop_at("xy", 1, ["xy"]) == 0 and stop_at("xy", 0, ["xy"]) is None


def test_complete_text_drops_a_trailing_incomplete_character():
    assert tf.complete_text("ab\ufffd\ufffd") == "ab"
    assert tf.complete_text("a\ufffdb") == "a\ufffdb"


def test_units_count_utf8_bytes_and_end_of_text():
    assert tf.units("héllo", False) == 6
    assert tf.units("", True) == 1
    assert tf.units("ab", True) == 3


def test_text_hash_chains_and_tells_texts_apart():
    h = tf.text_hash(tf.TEXT_HASH_START, "def")
    assert h == tf.text_hash(tf.TEXT_HASH_START, "def")
    assert tf.text_hash(h, " f") != tf.text_hash(h, " g")
    assert 0 <= h < 1 << 64


# --- rank mode --------------------------------------------------------------------------------


def test_unique_candidates_keep_first_seen_order_and_skip_empty_ones():
    cands, index = tf.unique_candidates([(" a", False), ("", False), (" b", False),
                                         (" a", False), ("", True)])
    assert cands == [(" a", False), (" b", False), ("", True)]
    assert index == [0, -1, 1, 0, 2]


def test_choose_candidate_by_weighted_nll_per_byte():
    # member 0 weight 0.75, member 1 weight 0.25 (given unnormalised as 3 : 1)
    nll = np.array([[8.0, 3.0, 2.0],
                    [4.0, 9.0, 0.5]])
    cands = [("abcd", False), ("ab", False), ("", True)]
    best, per_unit = tf.choose_candidate(nll, np.array([3.0, 1.0]), cands)
    # (0.75*8 + 0.25*4)/4 = 1.75 ; (0.75*3 + 0.25*9)/2 = 2.25 ; (0.75*2 + 0.25*0.5)/1 = 1.625
    assert per_unit == pytest.approx([1.75, 2.25, 1.625])
    assert best == 2


def test_choose_candidate_ties_go_to_the_first():
    best, _ = tf.choose_candidate(np.array([[2.0, 2.0]]), np.array([1.0]),
                                  [("ab", False), ("cd", False)])
    assert best == 0


# --- fuse mode: union of top-k by string ------------------------------------------------------


def test_member_text_prob_exact_then_longest_prefix_then_floor():
    table = {" q": 0.1, " qu": 0.3, "x": 0.2}
    assert tf.member_text_prob(" q", table, 0.001) == 0.1              # exact
    assert tf.member_text_prob(" quick", table, 0.001) == 0.3          # longest prefix " qu"
    assert tf.member_text_prob(" qa", table, 0.001) == 0.1             # prefix " q"
    assert tf.member_text_prob(" z", table, 0.001) == 0.001            # floor
    assert tf.member_text_prob("y", table, 0.001) == 0.001


def test_align_two_vocabularies_by_hand():
    a = frame({" quick": 0.5, " qu": 0.2}, eos=0.1, rest=0.2, vocab=10)
    b = frame({" qu": 0.6, "ick": 0.1}, eos=0.05, rest=0.25, vocab=20)
    cands, probs, top = tf.align_texts([a, b])
    assert cands == [(" quick", False), (" qu", False), ("ick", False), ("", True)]
    floor_a = 0.2 / (10 - 2 - 1)      # rest / (V - k - 1): k strings and EOS
    assert probs[0] == pytest.approx([0.5, 0.2, floor_a, 0.1])
    # b has no " quick": its longest top-k prefix is " qu"; no "ick" prefix in a: floor
    assert probs[1] == pytest.approx([0.6, 0.6, 0.1, 0.05])
    assert list(top) == [0, 1]
    fused = tf.fuse_texts([a, b], np.array([1.0, 1.0]), "linear")
    assert fused.probs == pytest.approx([0.55, 0.4, (floor_a + 0.1) / 2, 0.075])
    assert fused.candidates[int(np.argmax(fused.probs))] == (" quick", False)


def test_loglinear_pool_over_aligned_strings():
    a = frame({"x": 0.5, "y": 0.25}, eos=0.25, rest=0.0, vocab=4)
    b = frame({"y": 0.5, "x": 0.25}, eos=0.25, rest=0.0, vocab=4)
    fused = tf.fuse_texts([a, b], np.array([0.5, 0.5]), "loglinear")
    # geometric means: x, y = sqrt(0.125), eos = 0.25; normalised over the candidates
    g = np.array([math.sqrt(0.125), math.sqrt(0.125), 0.25])
    assert fused.probs == pytest.approx(g / g.sum())


def test_duplicate_strings_are_summed_and_eos_can_be_a_members_top():
    m = tf.TextTopK(["a", "a", "b"], np.log(np.array([0.2, 0.1, 0.05])), math.log(0.6),
                    0.05, 100)
    cands, probs, top = tf.align_texts([m])
    assert cands == [("a", False), ("b", False), ("", True)]
    assert probs[0] == pytest.approx([0.3, 0.05, 0.6])
    assert top[0] == 2


def test_unknown_method_is_refused():
    with pytest.raises(ValueError):
        tf.fuse_texts([frame({"a": 1.0}, 1e-9, 0.0, 2)], np.ones(1), "max")


# --- which path a session takes --------------------------------------------------------------


def member(i: int, fp: str) -> Member:
    return Member(f"id{i}", f"n{i}", f"model{fp}", fp, 100, f":{i}")


@pytest.mark.parametrize("mode, fps, kind, n", [
    ("auto", "aaa", "select", 3),         # two members or more: whole answers, selected
    ("auto", "aab", "select", 3),
    ("auto", "a", "fuse-ids", 1),         # alone: the member itself, streamed
    ("select", "a", "select", 1),
    ("stream", "aaa", "fuse-ids", 3),     # one tokenizer: the id path
    ("fuse", "aaa", "fuse-ids", 3),
    ("rank", "aaa", "rank", 3),
    ("stream", "aab", "rank", 3),         # mixed: everyone, ranked by text
    ("fuse", "aab", "fuse-text", 3),
    ("rank", "abc", "rank", 3),
])
def test_plan_session(mode, fps, kind, n):
    plan = plan_session(GenParams(mode=mode), [member(i, fp) for i, fp in enumerate(fps)])
    assert plan.kind == kind and len(plan.group) == n and plan.excluded == []


def test_auto_keeps_the_id_path_when_the_request_speculates():
    plan = plan_session(GenParams(speculate=4), [member(i, "a") for i in range(2)])
    assert plan.kind == "fuse-ids"
