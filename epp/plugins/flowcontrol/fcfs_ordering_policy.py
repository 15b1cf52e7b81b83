"""``fcfs-ordering-policy`` (GIE's default): requests of one flow leave in arrival order."""

from __future__ import annotations

from collections import deque

from epp.framework.flowcontrol import FlowQueue, OrderingPolicy, QueuedItem


class _FifoQueue(FlowQueue):
    __slots__ = ("_q",)

    def __init__(self) -> None:
        self._q: deque[QueuedItem] = deque()

    def push(self, item: QueuedItem) -> None:
        self._q.append(item)

    def peek(self) -> QueuedItem | None:
        q = self._q
        while q and not q[0].pending:
            q.popleft()
        return q[0] if q else None

    def pop(self) -> QueuedItem | None:
        item = self.peek()
        if item is not None:
            self._q.popleft()
        return item


class FcfsOrderingPolicy(OrderingPolicy):
    """First come, first served (GIE's default)."""

    type_name = "fcfs-ordering-policy"

    def new_queue(self) -> FlowQueue:
        return _FifoQueue()
