"""``edf-ordering-policy``: earliest deadline first within a flow.

A request's deadline is its arrival plus *its own* TTL: the ``x-llm-d-inference-ttl`` header
(llm-d's; capped at ``defaultRequestTTL``), else ``defaultRequestTTL``
(``epp.flowcontrol.queues.request_ttl``). So a request with a tight TTL overtakes older
requests with a loose one; requests without a TTL go last, in arrival order. With one TTL for
every request the order is arrival order, i.e. FCFS.
"""

from __future__ import annotations

import heapq

from epp.framework.flowcontrol import FlowQueue, OrderingPolicy, QueuedItem


class _EdfQueue(FlowQueue):
    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h: list[tuple[float, int, QueuedItem]] = []

    def push(self, item: QueuedItem) -> None:
        heapq.heappush(self._h, (item.deadline, item.seq, item))

    def peek(self) -> QueuedItem | None:
        h = self._h
        while h and not h[0][2].pending:
            heapq.heappop(h)
        return h[0][2] if h else None

    def pop(self) -> QueuedItem | None:
        item = self.peek()
        if item is not None:
            heapq.heappop(self._h)
        return item


class EdfOrderingPolicy(OrderingPolicy):
    """Earliest deadline first (arrival + TTL; requests without a TTL go last, FCFS)."""

    type_name = "edf-ordering-policy"

    def new_queue(self) -> FlowQueue:
        return _EdfQueue()
