"""Empty-pool holding without the flowControl gate (``HoldingAdmission``): requests for a
pool scaled to zero wait for an endpoint instead of failing, up to the wait budget, which
runs on the admission's clock (a ManualClock here)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from epp.datalayer.datastore import Datastore
from epp.flowcontrol.clock import ManualClock
from epp.flowcontrol.hold import HoldingAdmission
from epp.framework import errors
from epp.framework.datalayer import Endpoint
from epp.framework.errors import RequestError
from epp.plugins.flowcontrol.concurrency_detector import ConcurrencyDetector

from .test_controller import request, settle


def holding(budget: float = 30.0, capacity: int = 100) -> tuple[HoldingAdmission, ManualClock, list[int]]:
    clock = ManualClock()
    adm = HoldingAdmission(ConcurrencyDetector("cd", max_concurrency=capacity), Datastore(), budget, clock)
    pushes: list[int] = []
    adm.add_activity_listener(lambda: pushes.append(adm.queued))
    return adm, clock, pushes


async def test_held_requests_are_all_admitted_when_the_pool_comes_up() -> None:
    adm, _clock, pushes = holding()
    ds = adm.datastore
    tasks = [asyncio.ensure_future(adm.admit(request("t", n=i), ds.endpoints)) for i in range(3)]
    await settle()
    assert adm.queued == 3 and pushes[0] == 1  # the first hold is pushed at once (KEDA)
    ep = Endpoint("pod", "10.0.0.1", 8000)
    ds.replace_endpoints([ep])
    assert [list(r) for r in await asyncio.wait_for(asyncio.gather(*tasks), 5)] == [[ep]] * 3
    assert adm.queued == 0 and pushes[-1] == 0  # and the end of demand


async def test_the_wait_budget_ends_with_a_503_scaling_message() -> None:
    adm, clock, _ = holding(budget=30)
    task = asyncio.ensure_future(adm.admit(request("t"), adm.datastore.endpoints))
    await settle()
    clock.advance(29.9)
    await settle()
    assert not task.done()
    clock.advance(0.1)
    await settle()
    with pytest.raises(RequestError) as err:
        await task
    assert err.value.status == 503 and b"scaling up from zero" in err.value.body()
    assert adm.queued == 0


async def test_a_held_sheddable_request_still_meets_the_legacy_saturation_check() -> None:
    adm, _clock, _ = holding(capacity=1)
    ds = adm.datastore
    task = asyncio.ensure_future(adm.admit(request("batch", priority=-1), ds.endpoints))
    await settle()
    busy = Endpoint("pod", "10.0.0.1", 8000)
    busy.inflight = 1  # saturated the moment it appears
    ds.replace_endpoints([busy])
    with pytest.raises(RequestError) as err:
        await asyncio.wait_for(task, 5)
    assert err.value.status == 429


async def test_a_client_that_leaves_while_held_is_no_longer_counted() -> None:
    adm, _clock, _ = holding()
    task = asyncio.ensure_future(adm.admit(request("t"), adm.datastore.endpoints))
    await settle()
    assert adm.queued == 1
    task.cancel()
    await settle()
    assert adm.queued == 0


async def test_a_subset_hint_naming_no_endpoint_of_a_live_pool_fails_at_once() -> None:
    adm, _clock, _ = holding()
    adm.datastore.replace_endpoints([Endpoint("pod", "10.0.0.1", 8000)])

    def no_match() -> Sequence[Endpoint]:
        raise errors.unavailable("failed to find endpoint candidates for the subset hint")

    with pytest.raises(RequestError) as err:
        await asyncio.wait_for(adm.admit(request("t"), no_match), 5)
    assert err.value.status == 503 and adm.queued == 0
