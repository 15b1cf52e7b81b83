"""One heap of deadlines on an injected ``Clock``, driven by a single sleeping task.

Flow control arms a deadline per queued request (TTL, empty-pool budget) and one for the
dispatcher's periodic saturation re-check. Arming them with ``loop.call_at`` ties them to the
loop's real time, which a test cannot move; here every deadline lives in one heap and a single
"alarm" task sleeps on the clock until the earliest one, runs what is due, and sleeps again.

Cancelling is lazy (a flag; the entry is dropped when it reaches the top, or when cancelled
entries outnumber live ones), so cancel is O(1) on the hot path. The alarm task is only
replaced when a deadline earlier than the one it sleeps for is armed; an alarm that wakes
early (its timer was cancelled) just finds nothing due and sleeps again.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
from collections.abc import Callable
from typing import Any

from epp.flowcontrol.clock import Clock

log = logging.getLogger(__name__)


class Timer:
    """A handle on an armed deadline (``Timers.cancel`` makes sure its callback never runs)."""

    __slots__ = ("args", "callback", "cancelled", "due")

    def __init__(self, due: float, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.due = due
        self.callback = callback
        self.args = args
        self.cancelled = False


class Timers:
    """Deadlines (``call_at``) run on ``clock``; ``close`` cancels them all."""

    __slots__ = ("_alarm", "_alarm_at", "_cancelled", "_firing", "_heap", "_seq", "clock")

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = 0
        self._cancelled = 0  # approximate count of cancelled entries still in the heap
        self._alarm: asyncio.Task[None] | None = None
        self._alarm_at = math.inf
        self._firing = False

    def __len__(self) -> int:
        return len(self._heap)

    def call_at(self, due: float, callback: Callable[..., None], *args: Any) -> Timer:
        """Run ``callback(*args)`` once ``clock.now() >= due``. Needs a running loop."""
        timer = Timer(due, callback, args)
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, timer))
        if not self._firing and due < self._alarm_at:
            self._arm(due)
        return timer

    def cancel(self, timer: Timer) -> None:
        """Cancel ``timer`` and compact the heap when most of it is dead entries."""
        if timer.cancelled:
            return
        timer.cancelled = True
        self._cancelled += 1
        heap = self._heap
        if self._cancelled > 64 and self._cancelled * 2 > len(heap):
            self._heap = [e for e in heap if not e[2].cancelled]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def close(self) -> None:
        """Drop every deadline and stop the alarm (the owner is shutting down)."""
        for _, _, timer in self._heap:
            timer.cancelled = True
        self._heap.clear()
        self._cancelled = 0
        if self._alarm is not None:
            self._alarm.cancel()
            self._alarm = None
        self._alarm_at = math.inf

    # ------------------------------------------------------------------ the alarm
    def _arm(self, due: float) -> None:
        if self._alarm is not None:
            self._alarm.cancel()
        self._alarm_at = due
        self._alarm = asyncio.get_running_loop().create_task(self._sleep(due), name="flow-control-timers")

    async def _sleep(self, due: float) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self.clock.sleep_until(due)
            self._alarm = None
            self._alarm_at = math.inf
            self._fire()

    def _fire(self) -> None:
        now = self.clock.now()
        heap = self._heap
        self._firing = True
        try:
            while heap and heap[0][0] <= now:
                _, _, timer = heapq.heappop(heap)
                if timer.cancelled:
                    self._cancelled = max(0, self._cancelled - 1)
                    continue
                timer.cancelled = True  # fired: a late cancel() is a no-op
                try:
                    timer.callback(*timer.args)
                except Exception:  # pragma: no cover - callbacks are ours; one bug must not stop the rest
                    log.exception("flow-control timer callback failed")
        finally:
            self._firing = False
        if heap:
            self._arm(heap[0][0])
