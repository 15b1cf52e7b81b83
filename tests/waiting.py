"""Waiting in tests: poll a condition until it holds, or fail at a deadline.

Tests never sleep "long enough" for something to happen: on a loaded machine any fixed sleep
is too short, and on an idle one it is wasted time. They wait for the condition itself,
bounded by a generous deadline, and fail with a message saying what they were waiting for.
The deadline is a hang guard, not a performance goal: how fast something happens is measured
in ``benchmarks/``.

"Nothing happened" cannot be waited for; a test that must show something did *not* happen
waits for a later event that is ordered after it (the same watch stream, the same
connection, a response that could only come afterwards) and then asserts.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

DEFAULT_TIMEOUT = 10.0


Why = str | Callable[[], object]
"""What was awaited, for the failure message: text, or a callable evaluated only on failure
(e.g. a child process's log tail)."""


def _timed_out(timeout: float, what: Why, predicate: object) -> AssertionError:
    text = what() if callable(what) else what
    return AssertionError(f"timed out after {timeout}s waiting for {text or predicate}")


async def eventually(predicate: Callable[[], object | Awaitable[object]],
                     timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (a deadline, not a cancel scope)
                     interval: float = 0.02, what: Why = "") -> None:
    """Poll ``predicate`` (sync, or returning an awaitable) on the running loop until it is
    truthy; ``AssertionError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise _timed_out(timeout, what, predicate)
        await asyncio.sleep(interval)


def wait_until(predicate: Callable[[], object], timeout: float = DEFAULT_TIMEOUT, interval: float = 0.05,
               what: Why = "") -> None:
    """:func:`eventually` for synchronous tests (child processes, threads)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise _timed_out(timeout, what, predicate)
        time.sleep(interval)
