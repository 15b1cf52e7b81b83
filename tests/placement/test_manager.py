"""ModelPlacement in process against simulated pods over real HTTP (no Envoy): the request
path's holding, the loads and unloads it causes, its errors. End-to-end through Envoy and
picker processes: tests/placement/test_e2e.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from epp.datalayer.datastore import CatalogueModel, Datastore
from epp.framework.datalayer import Endpoint
from epp.framework.errors import RequestError
from epp.framework.scheduling import LLMRequest
from epp.placement import ModelPlacement, parse_placement_config
from epp.sim import SimConfig, SimPool
from tests.waiting import eventually


def adapter_dir(root: Path, name: str) -> str:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text("{}")
    return str(d)


@pytest.fixture
async def pool() -> AsyncIterator[SimPool]:
    cfg = SimConfig(time_scale=0.1, num_gpu_blocks=2000, histogram_refresh=0.0, enable_lora=True, max_loras=2,
                    lora_load_time=2.0)  # a load takes 0.2 s
    async with SimPool(cfg, replicas=2) as p:
        yield p


def make(pool: SimPool, tmp_path: Path, config: str = "") -> tuple[ModelPlacement, Datastore]:
    ds = Datastore()
    ds.replace_endpoints(Endpoint(f"pod{i}", "127.0.0.1", pod.port) for i, pod in enumerate(pool.pods))
    ds.catalogue = {n: CatalogueModel(n, adapter_dir(tmp_path, n), "sim-model") for n in ("a", "b", "c", "d", "e")}
    ds.catalogue["broken"] = CatalogueModel("broken", str(tmp_path / "nothing-here"))
    cfg = parse_placement_config("slotsPerPod: 2\nmodelsRefreshInterval: 100ms\nreconcileInterval: 50ms\n"
                                 "minChurnAge: 0s\nholdTimeout: 5s\n" + config)
    return ModelPlacement(cfg, ds), ds


def req(model: str) -> LLMRequest:
    return LLMRequest(request_id=model, target_model=model, incoming_model=model)


async def loaded_on(pool: SimPool, model: str) -> list[int]:
    out = []
    async with aiohttp.ClientSession() as s:
        for i, pod in enumerate(pool.pods):
            doc = await (await s.get(f"{pod.url}/v1/models")).json()
            if any(m["id"] == model for m in doc["data"]):
                out.append(i)
    return out


async def test_concurrent_requests_for_a_cold_adapter_share_one_load(pool: SimPool, tmp_path: Path) -> None:
    placement, ds = make(pool, tmp_path)
    await placement.start()
    try:
        await eventually(placement.fleet.all_reported, what="every pod reported its models")
        reqs = [req("a") for _ in range(5)]
        await asyncio.gather(*(placement.ensure(r) for r in reqs))
        assert len(await loaded_on(pool, "a")) == 1
        assert sum(p.engine.lora.disk_reads for p in pool.pods if p.engine) == 1
        eps = placement.candidates(reqs[0], ds.endpoints())
        assert [ep.port for ep in eps] == [pool.pods[(await loaded_on(pool, "a"))[0]].port]
        assert placement.models["a"].inflight == 5 and placement.models["a"].held == 0
        for r in reqs:
            placement.release(r, None)
        assert placement.models["a"].inflight == 0
    finally:
        await placement.close()


async def test_unknown_models_get_404_known_base_models_pass(pool: SimPool, tmp_path: Path) -> None:
    placement, _ = make(pool, tmp_path)
    await placement.start()
    try:
        await eventually(placement.fleet.all_reported)
        with pytest.raises(RequestError) as exc:
            await placement.ensure(req("no-such-model"))
        assert exc.value.status == 404 and "no-such-model" in exc.value.message
        r = req("sim-model")
        await placement.ensure(r)  # every pod serves the base model: no wait
        placement.release(r, None)
    finally:
        await placement.close()


async def test_a_load_that_fails_answers_503_with_the_pods_reason_and_fails_fast_after(
    pool: SimPool, tmp_path: Path
) -> None:
    placement, _ = make(pool, tmp_path)
    await placement.start()
    try:
        await eventually(placement.fleet.all_reported)
        with pytest.raises(RequestError) as exc:
            await placement.ensure(req("broken"))
        assert exc.value.status == 503 and "No adapter found" in exc.value.message
        with pytest.raises(RequestError) as again:
            await placement.ensure(req("broken"))
        assert again.value.status == 503
        assert placement.models["broken"].inflight == 0  # nothing leaked
    finally:
        await placement.close()


async def test_a_full_pool_evicts_the_least_recently_used_adapter(pool: SimPool, tmp_path: Path) -> None:
    placement, _ = make(pool, tmp_path)
    await placement.start()
    try:
        await eventually(placement.fleet.all_reported)
        for m in ("a", "b", "c", "d"):  # 2 pods x 2 slots: full
            r = req(m)
            await placement.ensure(r)
            placement.release(r, None)
        assert [len(await loaded_on(pool, m)) for m in "abcd"] == [1, 1, 1, 1]
        r = req("e")
        await placement.ensure(r)  # no free slot: "a", used longest ago, makes room
        placement.release(r, None)
        assert len(await loaded_on(pool, "e")) == 1
        assert [len(await loaded_on(pool, m)) for m in "abcd"] == [0, 1, 1, 1]
    finally:
        await placement.close()


async def test_an_idle_adapter_is_unloaded_after_the_idle_time(pool: SimPool, tmp_path: Path) -> None:
    placement, _ = make(pool, tmp_path, "idleUnloadAfter: 500ms\n")
    await placement.start()
    try:
        await eventually(placement.fleet.all_reported)
        r = req("a")
        await placement.ensure(r)
        placement.routed(r, next(ep for ep in placement.datastore.endpoints()
                                 if ep.key in placement.fleet.holders["a"]))
        assert len(await loaded_on(pool, "a")) == 1
        placement.reconcile()
        assert placement.fleet.holders.get("a")  # in use: never idle
        placement.release(r, None)
        await eventually(lambda: not placement.fleet.holders.get("a"), what="a unloaded once idle")
        assert await loaded_on(pool, "a") == []
    finally:
        await placement.close()
