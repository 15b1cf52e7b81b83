"""Pool-level gauges (``inference_pool_*``), refreshed in the background.

Why a periodic flush rather than updating on every scrape: scrapes run every 50 ms per pod;
dashboards read every 15-30 s. GIE flushes every ``--refresh-prometheus-metrics-interval``
(5 s) and so do we.

Only endpoints whose metrics are fresher than ``--metrics-staleness-threshold`` (2 s) count:
a pod that stopped answering must not keep pulling the pool averages toward its last value.
Such an endpoint also drops out of ``inference_pool_per_pod_queue_size`` (its series is
removed), as does an endpoint that left the pool, so a scaled-down pool does not leave
series behind forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from epp.datalayer.datastore import Datastore
    from epp.metrics import EppMetrics

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class PoolSnapshot:
    """What one refresh computed (returned for tests and debugging)."""

    pool: str
    ready_pods: int
    average_kv_cache_utilization: float
    average_queue_size: float
    average_running_requests: float
    per_pod_queue: tuple[tuple[str, int], ...]  # (endpoint name, queue) for fresh endpoints


class PoolMetricsRefresher:
    """Writes the pool gauges of ``metrics`` from ``datastore`` every ``interval`` seconds."""

    def __init__(
        self,
        datastore: Datastore,
        metrics: EppMetrics,
        *,
        interval: float = 5.0,
        staleness: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.datastore = datastore
        self.metrics = metrics
        self.interval = interval
        self.staleness = staleness
        self.clock = clock
        self._pool_label: str | None = None
        self._per_pod_series: set[tuple[str, str]] = set()
        self._task: asyncio.Task[None] | None = None

    def refresh(self) -> PoolSnapshot:
        """Recompute every pool gauge now."""
        now = self.clock()
        pool = self.datastore.pool.name
        m = self.metrics
        if self._pool_label is not None and self._pool_label != pool:
            for g in (m.pool_avg_kv, m.pool_avg_queue, m.pool_avg_running, m.pool_ready_pods):
                with contextlib.suppress(KeyError):
                    g.remove(self._pool_label)
        self._pool_label = pool

        fresh = [ep for ep in self.datastore.endpoints() if ep.is_fresh(now, self.staleness)]
        n = len(fresh)
        kv = queue = running = 0.0
        per_pod: list[tuple[str, int]] = []
        for ep in fresh:
            em = ep.metrics  # one read: the scraper replaces the object, never mutates it
            kv += em.kv_cache_usage
            queue += em.waiting_queue_size
            running += em.running_requests_size
            per_pod.append((ep.name, em.waiting_queue_size))
        avg_kv = kv / n if n else 0.0
        avg_queue = queue / n if n else 0.0
        avg_running = running / n if n else 0.0
        m.pool_avg_kv.labels(name=pool).set(avg_kv)
        m.pool_avg_queue.labels(name=pool).set(avg_queue)
        m.pool_avg_running.labels(name=pool).set(avg_running)
        m.pool_ready_pods.labels(name=pool).set(n)

        series = {(pool, name) for name, _ in per_pod}
        for stale in self._per_pod_series - series:
            with contextlib.suppress(KeyError):
                m.pool_per_pod_queue.remove(*stale)
        for name, q in per_pod:
            m.pool_per_pod_queue.labels(name=pool, model_server_pod=name).set(q)
        self._per_pod_series = series
        return PoolSnapshot(pool, n, avg_kv, avg_queue, avg_running, tuple(per_pod))

    async def start(self) -> None:
        """Refresh once now, then every ``interval`` in a background task."""
        if self._task is not None and not self._task.done():
            return
        self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pool-metrics")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.refresh()
            except Exception:  # never let a gauge bug kill the loop
                log.exception("pool metrics refresh failed")
