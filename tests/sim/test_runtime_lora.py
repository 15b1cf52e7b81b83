"""The simulator's runtime LoRA API against what a real vLLM 0.32 answered
(``tests/data/vllm_runtime_lora.json``), and the disk → CPU → GPU costs placement relies on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from epp.sim import LoraModule, SimConfig, SimPool

from .conftest import DATA

RECORDED = json.loads((DATA / "vllm_runtime_lora.json").read_text())


def make_adapter(root: Path, name: str) -> str:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text('{"r": 8, "peft_type": "LORA"}')
    return str(d)


def _subst(value: Any, subs: dict[str, str]) -> Any:
    if isinstance(value, str):
        for k, v in subs.items():
            value = value.replace(k, v)
        return value
    if isinstance(value, dict):
        return {k: _subst(v, subs) for k, v in value.items()}
    return value


def _contains(got: Any, want: Any) -> bool:
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and _contains(got[k], v) for k, v in want.items())
    return bool(got == want)


async def test_every_recorded_call_gets_vllms_status_and_body(
    fast_config: SimConfig, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The recorded cases run in their recorded order (load, duplicate, bad path, missing
    field, unload, unknown unload, completion for the unloaded adapter) with the same status
    and the same body; ``/v1/models`` lists a loaded adapter as vLLM does."""
    subs = {"<dir>": make_adapter(tmp_path, "dept-a"), "<base>": fast_config.model_name}
    async with SimPool(fast_config.replace(enable_lora=True, max_loras=2), replicas=1) as pool:
        url = pool.pods[0].url
        for case in RECORDED["cases"]:
            r = await http.post(url + case["path"], json=_subst(case["request"], subs))
            assert r.status == case["status"], case["name"]
            if "text" in case:
                assert await r.text() == _subst(case["text"], subs), case["name"]
            elif "json" in case:
                assert r.content_type == "application/json", case["name"]
                assert await r.json() == _subst(case["json"], subs), case["name"]
            else:
                assert _contains(await r.json(), _subst(case["json_subset"], subs)), case["name"]
        r = await http.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "dept-b", "lora_path": subs["<dir>"]})
        assert r.status == 200
        models = (await (await http.get(f"{url}/v1/models")).json())["data"]
        entry = next(m for m in models if m["id"] == "dept-b")
        want = {k: v for k, v in _subst(RECORDED["models_entry"], subs).items() if not k.startswith("_")}
        assert _contains(entry, want)


async def test_load_inplace_reloads_a_registered_adapter(
    fast_config: SimConfig, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = make_adapter(tmp_path, "v2")
    async with SimPool(fast_config.replace(enable_lora=True), replicas=1) as pool:
        url = pool.pods[0].url
        for body in ({"lora_name": "a", "lora_path": path},
                     {"lora_name": "a", "lora_path": path, "load_inplace": True}):
            r = await http.post(f"{url}/v1/load_lora_adapter", json=body)
            assert r.status == 200, await r.text()


async def test_a_load_takes_its_time_and_the_adapter_serves_only_afterwards(
    fast_config: SimConfig, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """While the load runs the adapter is not served (404), like vLLM, whose registry gets
    the name only once the weights are read; then requests for it succeed."""
    cfg = fast_config.replace(enable_lora=True, lora_load_time=20.0)  # 2 s at time_scale 0.1
    async with SimPool(cfg, replicas=1) as pool:
        url = pool.pods[0].url
        load = asyncio.create_task(http.post(f"{url}/v1/load_lora_adapter",
                                             json={"lora_name": "slow", "lora_path": make_adapter(tmp_path, "s")}))
        r = await http.post(f"{url}/v1/completions", json={"model": "slow", "prompt": "x", "max_tokens": 1})
        assert r.status == 404
        assert not load.done()
        assert (await load).status == 200
        r = await http.post(f"{url}/v1/completions", json={"model": "slow", "prompt": "x", "max_tokens": 1})
        assert r.status == 200


@pytest.mark.parametrize("cpu_slots, reads", [(0, 4), (2, 0)])
async def test_adapters_beyond_the_cpu_cache_are_read_from_disk_again(
    fast_config: SimConfig, http: aiohttp.ClientSession, cpu_slots: int, reads: int
) -> None:
    """Two adapters on a pod with one GPU slot: alternating requests swap the GPU slot every
    time; with the CPU cache at its default (= max_loras = 1) each use also re-reads the
    adapter from disk, with room for both in CPU memory none does."""
    cfg = fast_config.replace(lora_modules=[LoraModule("a", "/a"), LoraModule("b", "/b")], max_loras=1,
                              max_cpu_loras=cpu_slots)
    async with SimPool(cfg, replicas=1) as pool:
        url = pool.pods[0].url
        engine = pool.pods[0].engine
        assert engine is not None
        before = engine.lora.disk_reads
        for model in ("a", "b", "a", "b"):
            r = await http.post(f"{url}/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1})
            assert r.status == 200
        assert engine.lora.gpu_loads == 4
        assert engine.lora.disk_reads - before == reads


def test_cpu_cache_smaller_than_the_gpu_slots_is_a_config_error(fast_config: SimConfig) -> None:
    with pytest.raises(ValueError, match="max_cpu_loras"):
        fast_config.replace(max_loras=4, max_cpu_loras=2).validate()


async def test_sim_stats_count_disk_reads(fast_config: SimConfig, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """``GET /sim/stats`` (simulator only) counts adapter reads from disk, for benchmarks."""
    async with SimPool(fast_config.replace(enable_lora=True), replicas=1) as pool:
        url = pool.pods[0].url
        body = {"lora_name": "a", "lora_path": make_adapter(tmp_path, "a")}
        r = await http.post(f"{url}/v1/load_lora_adapter", json=body)
        assert r.status == 200
        stats = await (await http.get(f"{url}/sim/stats")).json()
        assert stats == {"lora_disk_reads": 1, "lora_gpu_loads": 0, "lora_registered": 1}
