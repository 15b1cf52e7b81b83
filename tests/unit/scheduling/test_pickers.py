"""Pickers: best-first order, random tie-breaks, weighted sampling."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epp.framework.scheduling import ScoredEndpoint
from epp.plugins.scheduling.max_score_picker import MaxScorePicker
from epp.plugins.scheduling.random_picker import RandomPicker
from epp.plugins.scheduling.weighted_random_picker import WeightedRandomPicker
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
    cands = scored(*scores)
    by_ep = {id(se.endpoint): se.score for se in cands}
    # exact ties only: strictly best first, then by score
    out = MaxScorePicker("m", max_num_of_endpoints=k, tie_epsilon=0.0).pick(R, cands).target_endpoints
    assert len(out) == min(k, len(scores)) == len(set(map(id, out)))
    got = [by_ep[id(e)] for e in out]
    assert got == sorted(got, reverse=True)
    assert got[0] == max(scores)
    # default: the primary is within the tie epsilon of the best, the fallbacks by score
    out = MaxScorePicker("m", max_num_of_endpoints=k).pick(R, cands).target_endpoints
    got = [by_ep[id(e)] for e in out]
    assert got[0] >= max(scores) - 0.05
    assert got[1:] == sorted(got[1:], reverse=True)


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


def test_near_ties_go_to_the_endpoint_picked_least_recently() -> None:
    from epp.framework.datalayer import Endpoint
    from epp.framework.scheduling import LLMRequest, ScoredEndpoint
    from epp.plugins.scheduling.max_score_picker import MaxScorePicker

    eps = [Endpoint(f"e{i}", "10.0.0.1", 8000 + i) for i in range(3)]
    for i, e in enumerate(eps):
        e.last_picked = 100.0 + i  # e0 picked longest ago
    picker = MaxScorePicker("p")
    req = LLMRequest("r", "m", "m")
    near = [ScoredEndpoint(eps[0], 6.99), ScoredEndpoint(eps[1], 7.0), ScoredEndpoint(eps[2], 7.0)]
    assert picker.pick(req, near).target_endpoints == [eps[0]]  # within epsilon: oldest pick wins
    clear = [ScoredEndpoint(eps[0], 6.5), ScoredEndpoint(eps[1], 7.0), ScoredEndpoint(eps[2], 6.0)]
    assert picker.pick(req, clear).target_endpoints == [eps[1]]  # a real difference still decides
    two = MaxScorePicker("p", max_num_of_endpoints=2).pick(req, clear).target_endpoints
    assert two == [eps[1], eps[0]]  # fallbacks by score


def test_round_robin_like_spread_when_every_endpoint_looks_the_same() -> None:
    import time

    from epp.framework.datalayer import Endpoint
    from epp.framework.scheduling import LLMRequest, ScoredEndpoint
    from epp.plugins.scheduling.max_score_picker import MaxScorePicker

    eps = [Endpoint(f"e{i}", "10.0.0.1", 8000 + i) for i in range(4)]
    picker = MaxScorePicker("p")
    picks = []
    for n in range(8):
        chosen = picker.pick(LLMRequest("r", "m", "m"), [ScoredEndpoint(e, 1.0) for e in eps]).target_endpoints[0]
        chosen.last_picked = time.monotonic() + n  # what the director records at pick time
        picks.append(chosen.name)
    assert sorted(picks[:4]) == sorted(picks[4:]) == ["e0", "e1", "e2", "e3"]


def test_random_tie_break_is_still_available() -> None:
    from epp.config.loader import load_config

    cfg = load_config("""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- {type: queue-scorer}
- {type: max-score-picker, parameters: {tieBreak: random}}
schedulingProfiles:
- {name: d, plugins: [{pluginRef: queue-scorer}, {pluginRef: max-score-picker}]}
""")
    assert cfg.plugin("max-score-picker").params.tie_break == "random"  # type: ignore[attr-defined]
