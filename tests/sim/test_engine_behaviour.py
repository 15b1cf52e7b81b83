"""Timing model, queueing, preemption, P/D and LoRA as a router observes them over HTTP."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from epp.sim import LoraModule, SimConfig, SimPool

from .conftest import metric_value


async def _ttft(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    async with s.post(f"{url}/v1/completions", json={**body, "stream": True}) as r:
        assert r.status == 200
        async for _ in r.content:
            t = time.perf_counter() - t0
            await r.read()
            return t
    raise AssertionError("no chunk")


async def test_shared_prefix_lowers_ttft(fast_config: SimConfig, http: aiohttp.ClientSession) -> None:
    # 3000 uncached tokens x 1 ms = 3 s simulated = 0.3 s at time_scale 0.1; a hit leaves ~0.
    cfg = fast_config.replace(prefill_time_per_token=0.001, prefill_overhead=0.01)
    async with SimPool(cfg, replicas=1) as pool:
        url = pool.pods[0].url
        prefix = list(range(10, 3010))
        cold = await _ttft(http, url, {"model": "sim-model", "prompt": [*prefix, 1, 2, 3], "max_tokens": 2})
        warm = await _ttft(http, url, {"model": "sim-model", "prompt": [*prefix, 4, 5, 6], "max_tokens": 2})
        assert cold > 0.2
        assert warm < cold / 3


async def test_queueing_beyond_max_num_seqs(fast_config: SimConfig, http: aiohttp.ClientSession) -> None:
    cfg = fast_config.replace(max_num_seqs=2)
    async with SimPool(cfg, replicas=1) as pool:
        url = pool.pods[0].url
        body = {"model": "sim-model", "prompt": "queue me", "max_tokens": 40}
        tasks = [asyncio.create_task(http.post(f"{url}/v1/completions", json=body)) for _ in range(6)]
        seen_waiting = seen_running = 0.0
        for _ in range(100):
            page = await (await http.get(f"{url}/metrics")).text()
            seen_waiting = max(seen_waiting, metric_value(page, "vllm:num_requests_waiting"))
            seen_running = max(seen_running, metric_value(page, "vllm:num_requests_running"))
            if seen_waiting > 0:
                break
            await asyncio.sleep(0.01)
        responses = await asyncio.gather(*tasks)
        assert all(r.status == 200 for r in responses)
        assert seen_waiting > 0
        assert seen_running <= 2
        page = await (await http.get(f"{url}/metrics")).text()
        assert metric_value(page, "vllm:request_success_total", finished_reason="length") == 6


async def test_preemption_when_kv_cache_full(fast_config: SimConfig, http: aiohttp.ClientSession) -> None:
    cfg = fast_config.replace(block_size=16, num_gpu_blocks=13, max_num_seqs=4)  # 12 usable blocks
    async with SimPool(cfg, replicas=1) as pool:
        url = pool.pods[0].url
        bodies = [{"model": "sim-model", "prompt": [100 * (i + 1) + j for j in range(40)], "max_tokens": 60}
                  for i in range(3)]
        rs = await asyncio.gather(*(http.post(f"{url}/v1/completions", json=b) for b in bodies))
        outs = [await r.json() for r in rs]
        assert all(o["usage"]["completion_tokens"] == 60 for o in outs)
        page = await (await http.get(f"{url}/metrics")).text()
        assert metric_value(page, "vllm:num_preemptions_total") > 0
        assert pool.pods[0].engine is not None and pool.pods[0].engine.kv.usage == 0.0


async def test_pd_round_trip(fast_config: SimConfig, http: aiohttp.ClientSession) -> None:
    async with SimPool(fast_config, replicas=2) as pool:
        prefill, decode = pool.pods
        prompt = "a long shared document " * 50
        r = await http.post(f"{prefill.url}/v1/completions", json={
            "model": "sim-model", "prompt": prompt, "max_tokens": 1, "stream": False,
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                   "remote_block_ids": None, "remote_host": None, "remote_port": None}})
        out = await r.json()
        ktp = out["kv_transfer_params"]
        assert ktp["do_remote_prefill"] is True and ktp["do_remote_decode"] is False
        assert ktp["remote_block_ids"] and ktp["remote_engine_id"] and ktp["tp_size"] == 1
        assert {"remote_host", "remote_port", "remote_request_id"} <= set(ktp)
        assert out["choices"][0]["finish_reason"] == "length"

        r = await http.post(f"{decode.url}/v1/completions", json={
            "model": "sim-model", "prompt": prompt, "max_tokens": 8, "kv_transfer_params": ktp})
        out2 = await r.json()
        assert r.headers["x-inference-pod"] == decode.name
        assert out2["usage"]["completion_tokens"] == 8
        n = out2["usage"]["prompt_tokens"]
        assert out2["usage"]["prompt_tokens_details"]["cached_tokens"] == n - 1  # all but the last token
        assert out2["kv_transfer_params"] is None
        page = await (await http.get(f"{decode.url}/metrics")).text()
        assert metric_value(page, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer") == n - 1
        assert metric_value(page, "vllm:prompt_tokens_by_source_total", source="local_compute") == 1


async def test_lora_load_unload_and_lora_requests_info(
    fast_config: SimConfig, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    cfg = fast_config.replace(lora_modules=[LoraModule("static-a", "/adapters/a")], max_loras=2)
    adapter = tmp_path / "b"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    async with SimPool(cfg, replicas=1) as pool:
        url = pool.pods[0].url
        r = await http.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "dyn-b", "lora_path": str(adapter)})
        assert r.status == 200 and "added successfully" in await r.text()
        r = await http.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "dyn-b", "lora_path": str(adapter)})
        assert r.status == 400
        ids = [m["id"] for m in (await (await http.get(f"{url}/v1/models")).json())["data"]]
        assert ids == ["sim-model", "static-a", "dyn-b"]

        task = asyncio.create_task(http.post(f"{url}/v1/completions", json={
            "model": "dyn-b", "prompt": "adapter request", "max_tokens": 100}))
        running = ""
        for _ in range(100):
            page = await (await http.get(f"{url}/metrics")).text()
            newest = max((ln for ln in page.splitlines() if ln.startswith("vllm:lora_requests_info{")),
                         key=lambda ln: float(ln.rsplit(" ", 1)[1]))
            if 'running_lora_adapters="dyn-b"' in newest:
                running = newest
                break
            await asyncio.sleep(0.01)
        assert 'max_lora="2"' in running
        r = await task
        assert (await r.json())["model"] == "dyn-b"

        r = await http.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "dyn-b"})
        assert r.status == 200
        r = await http.post(f"{url}/v1/completions", json={"model": "dyn-b", "prompt": "x", "max_tokens": 1})
        assert r.status == 404
        r = await http.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "dyn-b"})
        assert r.status == 404
        page = await (await http.get(f"{url}/metrics")).text()
        newest = max((ln for ln in page.splitlines() if ln.startswith("vllm:lora_requests_info{")),
                     key=lambda ln: float(ln.rsplit(" ", 1)[1]))
        assert 'running_lora_adapters=""' in newest


async def test_lora_blocks_hash_differently(fast_config: SimConfig, http: aiohttp.ClientSession) -> None:
    cfg = fast_config.replace(lora_modules=[LoraModule("ad", "/ad")])
    async with SimPool(cfg, replicas=1) as pool:
        url = pool.pods[0].url
        prompt = list(range(200, 300))
        await http.post(f"{url}/v1/completions", json={"model": "sim-model", "prompt": prompt, "max_tokens": 1})
        r = await http.post(f"{url}/v1/completions", json={"model": "ad", "prompt": prompt, "max_tokens": 1})
        assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        r = await http.post(f"{url}/v1/completions", json={"model": "ad", "prompt": prompt, "max_tokens": 1})
        assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
