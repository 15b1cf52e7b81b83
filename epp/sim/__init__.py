"""A vLLM simulator light enough to run a pool of pods in one process (``epp sim``).

What a router can observe is modelled on vLLM 0.32: OpenAI routes and SSE framing, prefix-cache
timing, a block KV cache with LRU eviction and preemption, ``/metrics`` with vLLM's names and
label sets, KV events on ZMQ in vLLM's wire format (same block hashes for the same token ids),
P/D ``kv_transfer_params``, LoRA adapters, failure injection.

Programmatic use (tests, benchmarks)::

    from epp.sim import SimConfig, SimPool
    async with SimPool(SimConfig(time_scale=0.1), replicas=2, kv_events_base_port=0) as pool:
        pool.pods[0].url, pool.pods[0].engine.kv.usage
"""

from epp.sim.config import DEFAULT_MODEL, LoraModule, SimConfig, parse_lora_module
from epp.sim.pool import SimPod, SimPool

__all__ = ["DEFAULT_MODEL", "LoraModule", "SimConfig", "SimPod", "SimPool", "parse_lora_module"]
