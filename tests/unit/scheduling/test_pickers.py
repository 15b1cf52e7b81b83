"""Pickers: best-first order, random tie-breaks, weighted sampling."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epp.scheduling.plugins.max_score_picker import MaxScorePicker
from epp.scheduling.plugins.random_picker import RandomPicker
from epp.scheduling.plugins.weighted_random_picker import WeightedRandomPicker
from epp.scheduling.types import ScoredEndpoint
from tests.unit.scheduling._helpers import ep, req

R = req()


def scored(*scores: float) -> list[ScoredEndpoint]:
    return [ScoredEndpoint(ep(f"e{i}"), s) for i, s in enumerate(scores)]


def names(result) -> list[str]:
    return [e.name for e in result.target_endpoints]


def test_max_score_picks_the_best():
    assert names(MaxScorePicker("m").pick(R, scored(0.1, 0.9, 0.5))) == ["e1"]


def test_max_score_breaks_ties_at_random():
    picker = MaxScorePicker("m", rng=random.Random(7))
    cands = scored(0.5, 0.9, 0.9, 0.9, 0.2)
    counts = Counter(names(picker.pick(R, cands))[0] for _ in range(3000))
    assert set(counts) == {"e1", "e2", "e3"}
    assert all(800 < c < 1200 for c in counts.values()), counts


def test_max_score_top_k_is_ordered_best_first():
    picker = MaxScorePicker("m", max_num_of_endpoints=3, rng=random.Random(1))
    assert names(picker.pick(R, scored(0.2, 0.9, 0.5, 0.7, 0.1))) == ["e1", "e3", "e2"]
    # k larger than the candidates: all of them, best first
    big = MaxScorePicker("m", max_num_of_endpoints=10)
    assert names(big.pick(R, scored(0.2, 0.9))) == ["e1", "e0"]


def test_max_score_top_k_tie_break_is_random_too():
    picker = MaxScorePicker("m", max_num_of_endpoints=2, rng=random.Random(3))
    cands = scored(1.0, 0.5, 0.5, 0.5)
    seconds = Counter(names(picker.pick(R, cands))[1] for _ in range(1500))
    assert names(picker.pick(R, cands))[0] == "e0"
    assert set(seconds) == {"e1", "e2", "e3"}


@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=12), st.integers(1, 12))
def test_max_score_returns_k_distinct_sorted(scores, k):
    picker = MaxScorePicker("m", max_num_of_endpoints=k)
    cands = scored(*scores)
    out = picker.pick(R, cands).target_endpoints
    assert len(out) == min(k, len(scores)) == len(set(map(id, out)))
    by_ep = {id(se.endpoint): se.score for se in cands}
    got = [by_ep[id(e)] for e in out]
    assert got == sorted(got, reverse=True)
    assert got[0] == max(scores)


def test_empty_candidates_give_empty_result():
    for p in (MaxScorePicker("m"), RandomPicker("r"), WeightedRandomPicker("w")):
        assert p.pick(R, []).target_endpoints == []


def test_random_picker_is_uniform_and_distinct():
    picker = RandomPicker("r", max_num_of_endpoints=2, rng=random.Random(5))
    cands = scored(0.0, 1.0, 0.5)
    counts: Counter[str] = Counter()
    for _ in range(3000):
        got = names(picker.pick(R, cands))
        assert len(set(got)) == 2
        counts.update(got)
    assert all(1800 < c < 2200 for c in counts.values()), counts


def test_weighted_random_follows_scores():
    picker = WeightedRandomPicker("w", rng=random.Random(11))
    cands = scored(3.0, 1.0, 0.0)
    counts = Counter(names(picker.pick(R, cands))[0] for _ in range(8000))
    assert counts["e2"] == 0  # a zero score is never chosen while a positive one exists
    assert counts["e0"] / counts["e1"] == pytest.approx(3.0, rel=0.15)


def test_weighted_random_all_zero_is_uniform():
    picker = WeightedRandomPicker("w", rng=random.Random(2))
    cands = scored(0.0, 0.0, -1.0)
    counts = Counter(names(picker.pick(R, cands))[0] for _ in range(3000))
    assert all(800 < c < 1200 for c in counts.values()), counts


def test_weighted_random_k_takes_non_positive_last():
    picker = WeightedRandomPicker("w", max_num_of_endpoints=3, rng=random.Random(4))
    for _ in range(200):
        got = names(picker.pick(R, scored(0.0, 2.0, 1.0)))
        assert set(got[:2]) == {"e1", "e2"} and got[2] == "e0"
