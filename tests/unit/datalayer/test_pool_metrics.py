"""Pool gauges: averages over fresh endpoints, ready count, per-pod series lifecycle."""

from __future__ import annotations

import asyncio

from epp.datalayer.datastore import Datastore, PoolInfo
from epp.datalayer.pool_metrics import PoolMetricsRefresher
from epp.framework.datalayer import Endpoint, EndpointMetrics
from epp.metrics import EppMetrics


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ep(name: str, port: int, *, queue: int, running: int, kv: float, at: float) -> Endpoint:
    e = Endpoint(name=name, address="10.0.0.1", port=port)
    e.metrics = EndpointMetrics(waiting_queue_size=queue, running_requests_size=running,
                                kv_cache_usage=kv, updated_at=at)
    return e


def gauge(m: EppMetrics, metric: str, /, **labels: str) -> float | None:
    return m.registry.get_sample_value(metric, labels)


def test_averages_count_only_fresh_endpoints() -> None:
    clock = Clock()
    ds = Datastore(pool=PoolInfo(name="my-pool"))
    a = ep("a", 1, queue=2, running=4, kv=0.2, at=999.5)
    b = ep("b", 2, queue=6, running=0, kv=0.6, at=999.0)
    stale = ep("c", 3, queue=100, running=100, kv=1.0, at=990.0)  # 10 s old
    never = Endpoint(name="d", address="10.0.0.1", port=4)  # never scraped
    ds.replace_endpoints([a, b, stale, never])
    m = EppMetrics()
    snap = PoolMetricsRefresher(ds, m, staleness=2.0, clock=clock).refresh()
    assert snap.ready_pods == 2
    assert gauge(m, "inference_pool_ready_pods", name="my-pool") == 2
    assert gauge(m, "inference_pool_average_queue_size", name="my-pool") == 4.0
    assert gauge(m, "inference_pool_average_running_requests", name="my-pool") == 2.0
    assert abs(gauge(m, "inference_pool_average_kv_cache_utilization", name="my-pool") - 0.4) < 1e-9  # type: ignore[operator]
    assert gauge(m, "inference_pool_per_pod_queue_size", name="my-pool", model_server_pod="a") == 2
    assert gauge(m, "inference_pool_per_pod_queue_size", name="my-pool", model_server_pod="b") == 6
    assert gauge(m, "inference_pool_per_pod_queue_size", name="my-pool", model_server_pod="c") is None


def test_empty_pool_is_zero_not_nan() -> None:
    ds = Datastore()
    m = EppMetrics()
    PoolMetricsRefresher(ds, m, clock=Clock()).refresh()
    assert gauge(m, "inference_pool_ready_pods", name="default") == 0
    assert gauge(m, "inference_pool_average_kv_cache_utilization", name="default") == 0.0
    assert gauge(m, "inference_pool_average_queue_size", name="default") == 0.0


def test_series_of_departed_and_stale_endpoints_are_removed() -> None:
    clock = Clock()
    ds = Datastore(pool=PoolInfo(name="p"))
    a = ep("a", 1, queue=1, running=0, kv=0.0, at=clock.now)
    b = ep("b", 2, queue=3, running=0, kv=0.0, at=clock.now)
    ds.replace_endpoints([a, b])
    m = EppMetrics()
    r = PoolMetricsRefresher(ds, m, clock=clock)
    r.refresh()
    assert gauge(m, "inference_pool_per_pod_queue_size", name="p", model_server_pod="b") == 3
    ds.remove_endpoint(b.key)
    r.refresh()
    assert gauge(m, "inference_pool_per_pod_queue_size", name="p", model_server_pod="b") is None
    assert gauge(m, "inference_pool_per_pod_queue_size", name="p", model_server_pod="a") == 1
    clock.now += 10  # a goes stale
    r.refresh()
    assert gauge(m, "inference_pool_per_pod_queue_size", name="p", model_server_pod="a") is None
    assert gauge(m, "inference_pool_ready_pods", name="p") == 0
    # a new scrape brings it back
    a.metrics = EndpointMetrics(waiting_queue_size=5, updated_at=clock.now)
    r.refresh()
    assert gauge(m, "inference_pool_per_pod_queue_size", name="p", model_server_pod="a") == 5
    # pool renamed: old pool-labelled series go away
    ds.pool = PoolInfo(name="q")
    r.refresh()
    assert gauge(m, "inference_pool_ready_pods", name="p") is None
    assert gauge(m, "inference_pool_per_pod_queue_size", name="p", model_server_pod="a") is None
    assert gauge(m, "inference_pool_per_pod_queue_size", name="q", model_server_pod="a") == 5


async def test_background_refresh() -> None:
    clock = Clock()
    ds = Datastore()
    m = EppMetrics()
    r = PoolMetricsRefresher(ds, m, interval=0.02, clock=clock)
    await r.start()
    try:
        assert gauge(m, "inference_pool_ready_pods", name="default") == 0  # refreshed at start
        ds.replace_endpoints([ep("a", 1, queue=1, running=1, kv=0.5, at=clock.now)])
        for _ in range(250):
            if gauge(m, "inference_pool_ready_pods", name="default") == 1:
                break
            await asyncio.sleep(0.01)
        assert gauge(m, "inference_pool_ready_pods", name="default") == 1
    finally:
        await r.stop()
    await r.stop()  # idempotent
