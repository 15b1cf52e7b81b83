"""Time for flow control: a ``Clock`` protocol, the real one, and a manual one for tests.

Every deadline flow control keeps (request TTLs, the empty-pool wait budget, the dispatcher's
saturation re-check) is measured and slept on through one injected ``Clock``, so a test can
move time forward deterministically instead of sleeping for real: ``ManualClock.advance(5)``
wakes exactly the sleepers whose deadline has passed, in deadline order, and nothing else.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from typing import Protocol


class Clock(Protocol):
    """Monotonic seconds, and a way to sleep until a point on that same scale."""

    def now(self) -> float: ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline`` (at once if it already is)."""
        ...


class MonotonicClock:
    """The real clock: ``time.monotonic``, which is also what the asyncio loop runs on."""

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


class ManualClock:
    """A clock that only moves when told to (``advance``); the test double for timers.

    Sleepers wait on futures; ``advance`` resolves those whose deadline is reached, earliest
    first. The woken coroutines run on the loop's next turns, so a test advances and then lets
    the loop run (``await asyncio.sleep(0)`` a few times) before it asserts.
    """

    __slots__ = ("_now", "_seq", "_sleepers")

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._seq = 0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    @property
    def sleepers(self) -> int:
        """Sleepers still waiting (cancelled ones are not counted)."""
        return sum(1 for _, _, fut in self._sleepers if not fut.done())

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            await asyncio.sleep(0)  # still a suspension point, like a real zero-length sleep
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._sleepers, (deadline, self._seq, fut))
        await fut  # a cancelled sleeper's future is cancelled too and dropped when popped

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` (>= 0) and wake every sleeper now due."""
        if seconds < 0:
            raise ValueError("a monotonic clock cannot go back")
        self._now += seconds
        sleepers = self._sleepers
        while sleepers and sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(sleepers)
            if not fut.done():
                fut.set_result(None)
