"""Fixtures for the Kubernetes tests (and for anyone who needs a fake API server).

``fake_k8s`` yields a started :class:`tests.k8s.fakeapi.FakeKube` (``.url``,
``.api_client()``, ``.add()/.update()/.delete()``, ``.set_pod_ready()``, ``.restart()``, ...).
Other test packages can use it with ``from tests.k8s.conftest import fake_k8s  # noqa: F401``
or by importing FakeKube directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from tests.k8s.fakeapi import FakeKube


@pytest.fixture
def fake_k8s() -> Iterator[FakeKube]:
    kube = FakeKube(bookmark_interval=0.5).start()
    try:
        yield kube
    finally:
        kube.stop()


async def eventually(pred: Callable[[], Any], timeout: float = 5.0, what: str = "") -> None:  # noqa: ASYNC109
    """Poll ``pred`` until truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def discoveries() -> AsyncIterator[list[Any]]:
    """Collects started discoveries and stops them at teardown (even on failure)."""
    started: list[Any] = []
    yield started
    for d in started:
        await d.stop()
