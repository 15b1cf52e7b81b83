"""Scorer math: what each built-in scorer returns for the loads a user would see."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epp.plugins.scheduling.active_request_scorer import ActiveRequestScorer
from epp.plugins.scheduling.kv_cache_utilization_scorer import KVCacheUtilizationScorer
from epp.plugins.scheduling.lora_affinity_scorer import LoraAffinityScorer
from epp.plugins.scheduling.queue_scorer import QueueScorer, effective_queue
from epp.plugins.scheduling.running_requests_size_scorer import RunningRequestsSizeScorer
from epp.plugins.scheduling.token_load_scorer import TokenLoadScorer
from tests.unit.scheduling._helpers import ep, req

R = req()


# ---- queue-scorer ----
def test_queue_scorer_min_max():
    eps = [ep(waiting=0), ep(waiting=5), ep(waiting=10)]
    assert QueueScorer("q").score(R, eps) == [1.0, 0.5, 0.0]


def test_queue_scorer_all_equal_scores_one():
    assert QueueScorer("q").score(R, [ep(waiting=3), ep(waiting=3)]) == [1.0, 1.0]
    assert QueueScorer("q").score(R, [ep(waiting=7)]) == [1.0]
    assert QueueScorer("q").score(R, []) == []


def test_queue_scorer_counts_requests_the_scrape_has_not_seen():
    # Both scraped idle; the picker has since sent 3 requests to the first one.
    busy, idle = ep(waiting=0, running=0, inflight=3), ep(waiting=0, running=0)
    assert effective_queue(busy) == 3
    assert QueueScorer("q").score(R, [busy, idle]) == [0.0, 1.0]


def test_queue_scorer_inflight_already_seen_is_not_double_counted():
    # 4 in flight, the scrape already shows 2 running + 2 waiting: nothing unseen.
    e = ep(waiting=2, running=2, inflight=4)
    assert effective_queue(e) == 2
    # Fewer in flight than the server reports (other clients): no negative correction.
    assert effective_queue(ep(waiting=2, running=5, inflight=1)) == 2
    assert effective_queue(ep(waiting=1, running=1, inflight=5)) == 1 + 3


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=20))
def test_queue_scorer_range_and_order(queues):
    eps = [ep(waiting=q) for q in queues]
    scores = QueueScorer("q").score(R, eps)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores[queues.index(min(queues))] == 1.0
    for a, sa in zip(queues, scores, strict=True):
        for b, sb in zip(queues, scores, strict=True):
            if a < b:
                assert sa > sb


# ---- kv-cache-utilization-scorer ----
def test_kv_scorer():
    eps = [ep(kv=0.0), ep(kv=0.25), ep(kv=1.0), ep(kv=1.5), ep(kv=-0.2)]
    assert KVCacheUtilizationScorer("kv").score(R, eps) == [1.0, 0.75, 0.0, 0.0, 1.0]


# ---- running-requests-size-scorer ----
def test_running_scorer():
    s = RunningRequestsSizeScorer("r")
    assert s.score(R, [ep(running=2), ep(running=6), ep(running=4)]) == [1.0, 0.0, 0.5]
    assert s.score(R, [ep(running=2), ep(running=2)]) == [1.0, 1.0]


# ---- token-load-scorer ----
def test_token_load_scorer():
    s = TokenLoadScorer("t", queue_threshold_tokens=1000)
    eps = [ep(inflight_tokens=0), ep(inflight_tokens=250), ep(inflight_tokens=1000),
           ep(inflight_tokens=5000)]
    assert s.score(R, eps) == [1.0, 0.75, 0.0, 0.0]
    assert TokenLoadScorer("t").threshold == 4_194_304


# ---- active-request-scorer ----
def test_active_request_scorer():
    s = ActiveRequestScorer("a")
    assert s.score(R, [ep(inflight=0), ep(inflight=2), ep(inflight=4)]) == [1.0, 0.5, 0.0]
    assert s.score(R, [ep(inflight=0), ep(inflight=0)]) == [1.0, 1.0]


def test_active_request_scorer_idle_threshold_and_max_busy():
    s = ActiveRequestScorer("a", idle_threshold=1, max_busy_score=0.5)
    assert s.score(R, [ep(inflight=1), ep(inflight=2), ep(inflight=4)]) == [1.0, 0.25, 0.0]


# ---- lora-affinity-scorer ----
def test_lora_tiers():
    s = LoraAffinityScorer("l")
    eps = [
        ep(active=frozenset({"ad"}), max_adapters=1),  # active → 1.0
        ep(active=frozenset({"x"}), max_adapters=2),  # free slot → 0.8
        ep(active=frozenset({"x"}), waiting_adapters=frozenset({"ad"}), max_adapters=2),  # waiting
        ep(active=frozenset({"x", "y"}), max_adapters=2),  # full → 0
    ]
    assert s.score(req(model="ad"), eps) == [1.0, 0.8, 0.6, 0.0]


def test_lora_free_slot_beats_waiting():
    # GIE order: a free slot (0.8) is checked before "adapter waiting" (0.6).
    e = ep(waiting_adapters=frozenset({"ad"}), max_adapters=4)
    assert LoraAffinityScorer("l").score(req(model="ad"), [e]) == [0.8]


def test_lora_neutral_without_lora_pool_or_for_base_models():
    plain = [ep(), ep()]
    assert LoraAffinityScorer("l").score(req(model="ad"), plain) == [1.0, 1.0]
    lora = [ep(active=frozenset({"x"}), max_adapters=1), ep(max_adapters=1)]
    s = LoraAffinityScorer("l", base_models=["llama"])
    assert s.score(req(model="llama"), lora) == [1.0, 1.0]
    assert s.score(req(model="cold-adapter"), lora) == [0.0, 0.8]


@pytest.mark.parametrize("cls", [QueueScorer, KVCacheUtilizationScorer, RunningRequestsSizeScorer,
                                 TokenLoadScorer, ActiveRequestScorer, LoraAffinityScorer])
def test_scores_one_per_endpoint_in_range(cls):
    eps = [ep(waiting=i, running=3 * i, kv=i / 10, inflight=i, inflight_tokens=i * 10**6)
           for i in range(6)]
    scores = cls(cls.type_name).score(R, eps)
    assert len(scores) == len(eps)
    assert all(0.0 <= s <= 1.0 for s in scores)
