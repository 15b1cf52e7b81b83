"""Process and event-loop gauges for the picker's /metrics: what a leak looks like.

A picker runs for weeks; memory, file descriptors or asyncio tasks that grow with the number
of requests served (a stream whose task never ends, a connection never closed) show up here
long before the pod is OOM-killed. ``process_*`` are prometheus_client's standard process
metrics (RSS, open fds, CPU seconds, ...); the two ``epp_*`` gauges are read at scrape time:

* ``epp_asyncio_tasks``: tasks alive on the picker's event loop (one per open gRPC stream
  plus a fixed set of background tasks);
* ``epp_ext_proc_streams_open``: ext_proc streams open now (what the shutdown drain waits for).

Collected in the metrics server's thread: ``asyncio.all_tasks`` tolerates a concurrently
changing task set, and the stream count is a plain int read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from epp.runner.drain import StreamTracker


class _LoopCollector(Collector):
    def __init__(self, loop: asyncio.AbstractEventLoop, streams: StreamTracker) -> None:
        self.loop = loop
        self.streams = streams

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            tasks = len(asyncio.all_tasks(self.loop))
        except RuntimeError:  # the task set kept changing under us: skip this scrape's value
            tasks = -1
        if tasks >= 0:
            yield GaugeMetricFamily("epp_asyncio_tasks", "Tasks alive on the picker's event loop.", value=tasks)
        yield GaugeMetricFamily("epp_ext_proc_streams_open", "ext_proc streams open now.",
                                value=self.streams.open)


def register_runtime_metrics(registry: CollectorRegistry, loop: asyncio.AbstractEventLoop,
                             streams: StreamTracker) -> None:
    ProcessCollector(registry=registry)
    registry.register(_LoopCollector(loop, streams))
