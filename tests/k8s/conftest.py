"""Fixtures for the Kubernetes tests (and for anyone who needs a fake API server).

``fake_k8s`` yields a started :class:`tests.k8s.fakeapi.FakeKube` (``.url``,
``.api_client()``, ``.add()/.update()/.delete()``, ``.set_pod_ready()``, ``.restart()``, ...).
Other test packages can use it with ``from tests.k8s.conftest import fake_k8s  # noqa: F401``
or by importing FakeKube directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.k8s.fakeapi import FakeKube
from tests.waiting import eventually  # noqa: F401  (the k8s tests import it from here)


@pytest.fixture
def fake_k8s() -> Iterator[FakeKube]:
    kube = FakeKube(bookmark_interval=0.5).start()
    try:
        yield kube
    finally:
        kube.stop()


@pytest.fixture
async def discoveries() -> AsyncIterator[list[Any]]:
    """Collects started discoveries and stops them at teardown (even on failure)."""
    started: list[Any] = []
    yield started
    for d in started:
        await d.stop()
