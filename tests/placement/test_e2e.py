"""Model placement end to end: a real Envoy, ``epp serve --model-placement manage`` processes and
simulated vLLM pods serving vLLM's runtime LoRA API (``epp sim --enable-lora``), all on
127.0.0.1. What a client and an operator see: requests for adapters loaded nowhere succeed
after exactly one load, idle adapters go, a full pod evicts its least recently used adapter,
two picker replicas load an adapter once between them, unknown models get a 404."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from epp.envoy.bootstrap import EnvoySpec
from epp.local.topology import HOST, Topology, free_port_block
from tests.promtext import value
from tests.waiting import eventually

pytestmark = pytest.mark.envoy

BASE_CONFIG = {"modelsRefreshInterval": "200ms", "reconcileInterval": "100ms", "minChurnAge": "0s",
               "holdTimeout": "20s"}


@dataclass
class Rig:
    topo: Topology
    pods: list[int]
    workdir: Path
    adapters: dict[str, str] = field(default_factory=dict)
    pickers: list[dict[str, int]] = field(default_factory=list)

    def adapter(self, name: str) -> str:
        d = self.workdir / "adapters" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
        self.adapters[name] = str(d)
        return str(d)

    def picker(self, models: list[str], config: dict[str, Any] | None = None, me: str | None = None) -> dict[str, int]:
        n = len(self.pickers)
        pool = self.workdir / f"pool{n}.yaml"
        pool.write_text(yaml.safe_dump({
            "endpoints": [{"name": f"pod{i}", "address": f"{HOST}:{p}"} for i, p in enumerate(self.pods)],
            "models": [{"name": "broken", "path": str(self.workdir / "no-adapter-here")}]
                      + [{"name": m, "path": self.adapter(m), "base": "sim-model"} for m in models],
        }))
        cfg = self.workdir / f"placement{n}.yaml"
        cfg.write_text(yaml.safe_dump({**BASE_CONFIG, **(config or {})}))
        grpc, health, metrics = (free_port_block(3) + i for i in range(3))
        extra = ["--log-format", "text", "--model-placement", "manage", "--model-placement-config", str(cfg)]
        if me is not None:
            extra += ["--model-placement-self", me]
        self.topo.start_picker(str(pool), grpc, health, metrics, extra=extra, name=f"picker{n}")
        ports = {"grpc": grpc, "metrics": metrics}
        self.pickers.append(ports)
        return ports

    def envoy(self, picker: dict[str, int]) -> int:
        listen = free_port_block(2)
        spec = EnvoySpec(pool=[(HOST, p) for p in self.pods], pickers=[(HOST, picker["grpc"])],
                         listen=(HOST, listen), admin=(HOST, listen + 1))
        self.topo.start_envoy(spec, name=f"envoy{listen}")
        return listen

    async def holders(self, model: str) -> list[int]:
        """Pods whose /v1/models lists ``model`` (the pods' own word, not the picker's)."""
        out = []
        async with aiohttp.ClientSession() as s:
            for port in self.pods:
                async with s.get(f"http://{HOST}:{port}/v1/models") as r:
                    if any(m["id"] == model for m in (await r.json())["data"]):
                        out.append(port)
        return out

    def metric(self, name: str, **labels: str) -> float:
        return sum(value(p["metrics"], name, **labels) for p in self.pickers)


@contextlib.contextmanager
def start_rig(tmp_path: Path, pods: int, max_loras: int = 2, load_time: float = 0.3) -> Iterator[Rig]:
    topo = Topology(tmp_path / "topology")
    with topo:
        base = free_port_block(pods)
        topo.start_sim(pods, base, kv_events_base_port=-1,
                       extra=("--enable-lora", "--max-loras", str(max_loras), "--lora-load-time", str(load_time)))
        yield Rig(topo, [base + i for i in range(pods)], tmp_path)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with start_rig(tmp_path, pods=2, load_time=2.0) as r:
        yield r


async def post(port: int, model: str, **kw: Any) -> tuple[int, dict[str, Any], str]:
    body = {"model": model, "prompt": "Tell me about adapters.", "max_tokens": 4, **kw}
    async with aiohttp.ClientSession() as s, s.post(
        f"http://{HOST}:{port}/v1/completions", data=orjson.dumps(body),
        headers={"content-type": "application/json"}, timeout=aiohttp.ClientTimeout(total=60),
    ) as r:
        raw = await r.read()
        return r.status, orjson.loads(raw) if raw.startswith(b"{") else {}, r.headers.get("x-inference-port", "")


async def test_an_adapter_loaded_nowhere_is_loaded_once_and_concurrent_requests_wait_for_that_load(
    rig: Rig,
) -> None:
    picker = rig.picker(["dept-a"])
    port = rig.envoy(picker)
    assert await rig.holders("dept-a") == []
    first = asyncio.ensure_future(post(port, "dept-a"))
    # the load takes 2 s: once the first request is held, five more arrive during that load
    await eventually(lambda: rig.metric("inference_extension_model_held_requests", model_name="dept-a") == 1,
                     timeout=20, what="the first request held for the load")
    rest = [asyncio.ensure_future(post(port, "dept-a")) for _ in range(5)]
    results = await asyncio.gather(first, *rest)
    assert [status for status, _, _ in results] == [200] * 6, results
    assert all(body["model"] == "dept-a" for _, body, _ in results)
    holders = await rig.holders("dept-a")
    assert len(holders) == 1
    assert {served for _, _, served in results} == {str(holders[0])}  # routed where it was loaded
    assert rig.metric("inference_extension_model_loads_total", model_name="dept-a") == 1
    assert rig.metric("inference_extension_model_loads_total", model_name="dept-a", outcome="success") == 1
    assert rig.metric("inference_extension_model_holds_total", model_name="dept-a", outcome="loaded") == 6
    # loaded now: the next request is not held and causes no load
    status, _, served = await post(port, "dept-a")
    assert status == 200 and served == str(holders[0])
    assert rig.metric("inference_extension_model_loads_total", model_name="dept-a") == 1


async def test_unknown_models_get_404_and_a_load_that_fails_gets_503(rig: Rig) -> None:
    port = rig.envoy(rig.picker(["dept-a"]))
    status, body, _ = await post(port, "sim-model")  # the base model every pod serves
    assert status == 200

    async def picker_404() -> bool:  # once every pod has reported what it serves
        status, body, _ = await post(port, "no-such-model")
        return status == 404 and "not served by this inference pool" in body["error"]["message"]

    await eventually(picker_404, timeout=20, what="the picker's own 404 for an unknown model")
    assert rig.metric("inference_extension_model_not_found_total") >= 1
    status, body, _ = await post(port, "broken")  # in the catalogue, but no adapter at its path
    assert status == 503
    assert "No adapter found" in body["error"]["message"] and body["error"]["code"] == 503
    assert rig.metric("inference_extension_model_loads_total", model_name="broken", outcome="not_found") == 1


async def test_an_idle_adapter_is_unloaded_after_the_idle_time(tmp_path: Path) -> None:
    with start_rig(tmp_path, pods=2, load_time=0.2) as rig:
        port = rig.envoy(rig.picker(["dept-a"], {"idleUnloadAfter": "1s"}))
        status, _, served = await post(port, "dept-a")
        assert status == 200 and await rig.holders("dept-a") == [int(served)]

        async def gone() -> bool:
            return await rig.holders("dept-a") == []

        await eventually(gone, timeout=20, what="dept-a unloaded once idle for 1 s")
        assert rig.metric("inference_extension_model_unloads_total", model_name="dept-a", reason="idle",
                          outcome="success") == 1
        await eventually(lambda: rig.metric("inference_extension_model_copies", model_name="dept-a") == 0,
                         what="the copies gauge following the unload")
        status, _, _ = await post(port, "dept-a")  # and comes back on demand
        assert status == 200
        assert rig.metric("inference_extension_model_loads_total", model_name="dept-a", outcome="success") == 2


async def test_a_pod_with_every_slot_taken_evicts_its_least_recently_used_adapter(tmp_path: Path) -> None:
    with start_rig(tmp_path, pods=1, max_loras=2, load_time=0.2) as rig:
        port = rig.envoy(rig.picker(["a", "b", "c"]))
        # both slots taken; "b" is now the least recently used and the least asked for (eviction
        # takes the least asked-for copy first, LRU among equals: with "a" asked for both before
        # and after "b", which of the two was asked for less depends on where the 1 s demand ticks
        # fell, so "a" is asked for only after "b" here)
        for model in ("b", "a", "a"):
            status, _, _ = await post(port, model)
            assert status == 200
        status, _, _ = await post(port, "c")
        assert status == 200
        assert [len(await rig.holders(m)) for m in ("a", "b", "c")] == [1, 0, 1]
        assert rig.metric("inference_extension_model_unloads_total", model_name="b", reason="evicted",
                          outcome="success") == 1
        assert rig.metric("inference_extension_model_unloads_total", model_name="a") == 0


async def test_two_picker_replicas_load_an_adapter_once_for_demand_they_both_see(rig: Rig) -> None:
    """Two active replicas without leader election, each behind its own Envoy: requests for a
    cold adapter arrive at both at once; the adapter's owner (rendezvous hash) loads it once,
    the other replica asks the owner and waits for the same load."""
    peers = [f"http://{HOST}:{free_port_block(1)}" for _ in range(2)]
    while peers[0] == peers[1]:
        peers[1] = f"http://{HOST}:{free_port_block(1)}"
    ports = [rig.envoy(rig.picker(["shared"], {"peers": peers}, me=me)) for me in peers]
    calls = [post(port, "shared") for port in ports for _ in range(3)]
    results = await asyncio.gather(*calls)
    assert [status for status, _, _ in results] == [200] * 6, results
    assert len(await rig.holders("shared")) == 1
    assert rig.metric("inference_extension_model_loads_total", model_name="shared") == 1
    for picker in rig.pickers:  # both replicas held requests for that one load
        assert value(picker["metrics"], "inference_extension_model_holds_total", model_name="shared",
                     outcome="loaded") >= 1
