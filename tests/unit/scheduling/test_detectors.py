"""Saturation detectors: pool saturation for admission, and their fail-open filters."""

from __future__ import annotations

import time

import pytest

from epp.plugins.flowcontrol.concurrency_detector import ConcurrencyDetector
from epp.plugins.flowcontrol.utilization_detector import UtilizationDetector
from tests.unit.scheduling._helpers import ep, req

R = req()


def test_utilization_per_endpoint_is_worst_of_queue_and_kv():
    d = UtilizationDetector("u")  # Q=5, K=0.8
    now = time.monotonic()
    assert d.endpoint_saturation(ep(waiting=5, kv=0.0), now) == 1.0
    assert d.endpoint_saturation(ep(waiting=1, kv=0.4), now) == pytest.approx(0.5)
    assert d.endpoint_saturation(ep(waiting=10, kv=0.4), now) == pytest.approx(2.0)


def test_utilization_pool_is_unweighted_mean():
    d = UtilizationDetector("u")
    eps = [ep(waiting=0, kv=0.0), ep(waiting=5, kv=0.0), ep(waiting=0, kv=0.4),
           ep(waiting=10, kv=0.0)]
    assert d.saturation(eps) == pytest.approx((0 + 1 + 0.5 + 2) / 4)
    assert not d.is_saturated(eps[:3])
    assert d.is_saturated(eps[1:2])


def test_stale_or_never_scraped_counts_as_saturated():
    clock = [1000.0]
    d = UtilizationDetector("u", metrics_staleness_threshold=0.2, clock=lambda: clock[0])
    e = ep(waiting=0, kv=0.0)
    e.metrics.updated_at = 1000.0
    assert d.saturation([e]) == 0.0
    clock[0] = 1000.3
    assert d.saturation([e]) == 1.0
    assert d.saturation([ep(fresh=False)]) == 1.0
    assert d.saturation([]) == 1.0


def test_utilization_filter_drops_stale_and_overloaded():
    d = UtilizationDetector("u")
    ok, queue, kv, stale = (ep("ok", waiting=5, kv=0.8), ep("q", waiting=6),
                            ep("kv", kv=0.81), ep("stale", fresh=False))
    assert d.filter(R, [ok, queue, kv, stale]) == [ok]


def test_utilization_filter_headroom():
    d = UtilizationDetector("u", headroom=0.2)  # Q limit 6, KV limit min(1, 0.96)
    a, b, c = ep(waiting=6), ep(waiting=7), ep(kv=0.95)
    assert d.filter(R, [a, b, c]) == [a, c]


def test_utilization_filter_fails_open():
    d = UtilizationDetector("u")
    eps = [ep(waiting=50), ep(fresh=False)]
    assert d.filter(R, eps) == eps


def test_concurrency_requests_mode():
    d = ConcurrencyDetector("c", max_concurrency=10)
    eps = [ep(inflight=5), ep(inflight=10), ep(inflight=0)]
    assert d.saturation(eps) == pytest.approx(15 / 30)
    assert d.filter(R, eps) == [eps[0], eps[2]]
    assert d.is_saturated([ep(inflight=10), ep(inflight=12)])


def test_concurrency_tokens_mode_and_headroom():
    d = ConcurrencyDetector("c", max_token_concurrency=1000, concurrency_mode="tokens",
                            headroom=0.5)
    eps = [ep(inflight_tokens=1400, inflight=99), ep(inflight_tokens=1500)]
    assert d.saturation(eps) == pytest.approx(2900 / 2000)
    assert d.filter(R, eps) == [eps[0]]


def test_concurrency_filter_fails_open():
    d = ConcurrencyDetector("c", max_concurrency=1)
    eps = [ep(inflight=3), ep(inflight=1)]
    assert d.filter(R, eps) == eps
    with pytest.raises(ValueError):
        ConcurrencyDetector("c", concurrency_mode="bytes")
