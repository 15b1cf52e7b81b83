"""The simulator's /metrics page is shaped like a real vLLM 0.32 page (tests/data sample)."""

from __future__ import annotations

import re

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from epp.sim import SimConfig, SimPool

from .conftest import DATA, metric_value


def _families(text: str) -> dict[str, tuple[str, set[tuple[str, frozenset[str]]]]]:
    """prometheus_client view: family -> (type, {(sample name, label keys)})."""
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("vllm:"):
            out[fam.name] = (fam.type, {(s.name, frozenset(s.labels)) for s in fam.samples})
    return out


def _lines(text: str) -> tuple[dict[str, str], dict[str, set[frozenset[str]]]]:
    """A plain line parser: # TYPE per name, and the label-key sets per sample name."""
    types: dict[str, str] = {}
    keys: dict[str, set[frozenset[str]]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line and not line.startswith("#"):
            m = re.match(r"^([^{\s]+)(?:\{(.*)\})?\s+\S+$", line)
            assert m, line
            keys.setdefault(m.group(1), set()).add(frozenset(re.findall(r'(\w+)="', m.group(2) or "")))
    return types, keys


async def _sim_page(config: SimConfig) -> str:
    async with SimPool(config, replicas=1) as pool, aiohttp.ClientSession() as s:
        url = pool.pods[0].url
        r = await s.post(f"{url}/v1/completions", json={"model": "sim-model", "prompt": "hi " * 40,
                                                         "max_tokens": 4})
        assert r.status == 200
        r = await s.get(f"{url}/metrics")
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        return await r.text()


async def test_same_families_types_and_label_keys_as_real_vllm(fast_config: SimConfig) -> None:
    real_text = (DATA / "vllm_metrics_sample.txt").read_text()
    cfg = fast_config.replace(lora_modules=[], enable_lora=True, max_loras=2)
    sim_text = await _sim_page(cfg)

    real, sim = _families(real_text), _families(sim_text)
    required = {
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:lora_requests_info",
        "vllm:cache_config_info", "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds", "vllm:request_success", "vllm:num_preemptions",
        "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_queue_time_seconds",
    }
    assert required <= set(sim)
    for name, (kind, samples) in sim.items():
        assert name in real, name
        assert kind == real[name][0], name
        real_keys = {k for _, k in real[name][1]}
        for _, keys in samples:
            assert keys in real_keys, (name, sorted(keys))

    real_types, real_keys = _lines(real_text)
    sim_types, sim_keys = _lines(sim_text)
    for name, kind in sim_types.items():
        assert real_types.get(name) == kind, name
    for name, keysets in sim_keys.items():
        assert keysets <= real_keys[name], (name, keysets, real_keys[name])
    # Histogram bucket bounds are vLLM's.
    for fam in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds"):
        bounds = lambda t, f=fam: re.findall(rf'^{re.escape(f)}_bucket{{.*le="([^"]+)"', t, re.M)  # noqa: E731
        assert bounds(sim_text) == bounds(real_text)


async def test_counters_and_cache_config_values(fast_config: SimConfig) -> None:
    text = await _sim_page(fast_config.replace(block_size=32, num_gpu_blocks=48))
    assert metric_value(text, "vllm:cache_config_info", block_size="32", num_gpu_blocks="48",
                        enable_prefix_caching="True") == 1.0
    assert metric_value(text, "vllm:request_success_total", finished_reason="length") == 1.0
    assert metric_value(text, "vllm:generation_tokens_total") == 4.0
    assert metric_value(text, "vllm:prefix_cache_queries_total") == 42.0  # BOS + 40 words + trailing space
    assert metric_value(text, "vllm:time_to_first_token_seconds_count") == 1.0
    assert metric_value(text, "vllm:inter_token_latency_seconds_count") == 3.0
    assert metric_value(text, "vllm:kv_cache_usage_perc") == 0.0
    assert "vllm:lora_requests_info" not in text  # only with LoRA enabled, as vLLM
