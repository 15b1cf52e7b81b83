"""A pod that has not published ``vllm:lora_requests_info`` yet still gets adapter loads.

A real vLLM 0.32 declares the family but publishes no sample until its first request has
run (checked on the real-vLLM tier, tests/placement/test_vllm.py). The placement manager used
to read that as "0 adapter slots": on a new idle pool a request for a catalogue adapter was
held for a load that never came and answered 503 after ``holdTimeout``.
"""

from __future__ import annotations

from epp.datalayer.datastore import Datastore
from epp.framework.datalayer import Endpoint
from epp.placement import ModelPlacement, parse_placement_config
from epp.placement.manager import UNREPORTED_SLOTS


def placement(*endpoints: Endpoint, config: str = "") -> ModelPlacement:
    ds = Datastore()
    ds.replace_endpoints(endpoints)
    return ModelPlacement(parse_placement_config(config), ds)


async def test_a_pod_that_has_not_reported_its_lora_slots_can_take_a_load() -> None:
    fresh, reported = Endpoint("fresh", "127.0.0.1", 8000), Endpoint("reported", "127.0.0.1", 8001)
    reported.metrics.max_adapters, reported.metrics.adapters_at = 4, 1.7e9
    reported.metrics.updated_at = fresh.metrics.updated_at = 1.0  # both scraped once
    p = placement(fresh, reported)
    p.reconcile()
    assert p.fleet.pods[fresh.key].slots == UNREPORTED_SLOTS >= 1
    assert p.fleet.pods[reported.key].slots == 4
    fresh.metrics.max_adapters, fresh.metrics.adapters_at = 2, 1.7e9  # its first report wins
    p.reconcile()
    assert p.fleet.pods[fresh.key].slots == 2


async def test_a_pod_not_scraped_yet_gets_no_guessed_slots() -> None:
    """Before the first scrape the real ``max_lora`` is a moment away: a guessed 1 slot would
    evict an adapter that the pod had room for."""
    p = placement(Endpoint("new", "127.0.0.1", 8000))
    p.reconcile()
    assert p.fleet.pods["127.0.0.1:8000"].slots == 0


async def test_configured_slots_win_over_everything() -> None:
    fresh = Endpoint("fresh", "127.0.0.1", 8000)
    p = placement(fresh, config="slotsPerPod: 3\n")
    p.reconcile()
    assert p.fleet.pods[fresh.key].slots == 3
