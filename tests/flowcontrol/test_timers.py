"""The flow-control clock and deadline heap: deadlines fire when the clock passes them, in
order, never early, never after a cancel; a ManualClock drives them without real sleeping."""

from __future__ import annotations

import asyncio

from epp.flowcontrol.clock import ManualClock, MonotonicClock
from epp.flowcontrol.timers import Timers


async def settle(turns: int = 10) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


async def test_deadlines_fire_in_order_once_the_clock_passes_them() -> None:
    clock = ManualClock()
    timers = Timers(clock)
    fired: list[str] = []
    t0 = clock.now()
    timers.call_at(t0 + 3, fired.append, "c")
    timers.call_at(t0 + 1, fired.append, "a")
    timers.call_at(t0 + 2, fired.append, "b")
    await settle()
    assert fired == []
    clock.advance(0.999)
    await settle()
    assert fired == []
    clock.advance(1.5)
    await settle()
    assert fired == ["a", "b"]
    clock.advance(10)
    await settle()
    assert fired == ["a", "b", "c"] and len(timers) == 0


async def test_an_earlier_deadline_armed_later_still_fires_first() -> None:
    clock = ManualClock()
    timers = Timers(clock)
    fired: list[str] = []
    timers.call_at(clock.now() + 60, fired.append, "late")
    await settle()  # the alarm now sleeps until +60
    timers.call_at(clock.now() + 1, fired.append, "early")
    clock.advance(1)
    await settle()
    assert fired == ["early"]
    assert clock.sleepers == 1  # one alarm, re-armed for the remaining deadline


async def test_cancelled_deadlines_never_fire_and_do_not_pile_up() -> None:
    clock = ManualClock()
    timers = Timers(clock)
    fired: list[int] = []
    handles = [timers.call_at(clock.now() + 1 + i, fired.append, i) for i in range(1000)]
    for h in handles[:-1]:
        timers.cancel(h)
    timers.cancel(handles[0])  # twice is harmless
    assert len(timers) < 200  # compacted
    clock.advance(2000)
    await settle()
    assert fired == [999]


async def test_a_callback_may_arm_a_deadline_that_is_already_due() -> None:
    clock = ManualClock()
    timers = Timers(clock)
    fired: list[str] = []

    def first() -> None:
        fired.append("first")
        timers.call_at(clock.now(), fired.append, "second")

    timers.call_at(clock.now() + 1, first)
    clock.advance(1)
    await settle()
    assert fired == ["first", "second"]


async def test_close_drops_every_deadline() -> None:
    clock = ManualClock()
    timers = Timers(clock)
    fired: list[int] = []
    timers.call_at(clock.now() + 1, fired.append, 1)
    await settle()
    timers.close()
    clock.advance(5)
    await settle()
    assert fired == [] and clock.sleepers == 0


async def test_on_the_real_clock_a_deadline_fires_by_itself() -> None:
    timers = Timers(MonotonicClock())
    done = asyncio.Event()
    timers.call_at(MonotonicClock().now() + 0.01, done.set)
    await asyncio.wait_for(done.wait(), 5)


async def test_manual_clock_wakes_sleepers_in_deadline_order() -> None:
    clock = ManualClock(start=0.0)
    woke: list[float] = []

    async def sleeper(t: float) -> None:
        await clock.sleep_until(t)
        woke.append(clock.now())

    tasks = [asyncio.ensure_future(sleeper(t)) for t in (3.0, 1.0, 2.0)]
    await settle()
    assert clock.sleepers == 3
    clock.advance(2)
    await settle()
    assert sorted(woke) == [2.0, 2.0] and clock.sleepers == 1
    tasks[0].cancel()
    await settle()
    assert clock.sleepers == 0
