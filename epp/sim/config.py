"""Every knob of a simulated vLLM pod, in one dataclass.

Defaults model Llama-3.1-8B-Instruct (bf16) on one H100-80GB with vLLM's defaults, so a pool of
simulated pods behaves like the deployments the picker is built for:

* Timing: llm-d-inference-sim's ``manifests/latency-profiles/8b-h100-balanced-per-token.yaml``
  profile (GIE/llm-d use that simulator for the same purpose): inter-token latency 12 ms,
  prefill overhead 30 ms, prefill 250 µs per uncached prompt token, KV transfer 3 µs per token
  (P/D), latencies scaled up to x2.0 ("time factor under load") at ``max_num_seqs`` running,
  max-num-seqs 16. How the engine combines them per step is in ``epp/sim/engine.py``.
* KV cache: 26,000 blocks of 16 tokens (416k tokens). Estimate for 8B on H100 at vLLM's
  ``gpu_memory_utilization=0.9``: 72 GB - 16 GB weights - ~3 GB activations/graphs ≈ 53 GB; one
  token of KV = 2 (K,V) x 32 layers x 8 KV heads x 128 dims x 2 bytes = 128 KiB → ≈ 410k tokens.
* Chunked prefill budget 8192 tokens per step (vLLM's V1 default for an OpenAI server on a
  large GPU), max model length 131072 (Llama 3.1), ``max_loras`` 1 (vLLM's default).

``time_scale`` multiplies every simulated duration (0.1 runs ten times faster) so tests can use
large, unambiguous differences without waiting for them.

The served model name defaults to ``"sim-model"``: neutral, and obviously not a real model in logs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import orjson

DEFAULT_MODEL = "sim-model"


@dataclass(slots=True, frozen=True)
class LoraModule:
    """A LoRA adapter the pod can serve: its served name and the server-side path.

    The path matters beyond display: vLLM mixes it into the block hash of LoRA requests.
    """

    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(spec: str) -> LoraModule:
    """Parse one ``--lora-modules`` entry in either of vLLM's forms: ``name=path`` or JSON."""
    spec = spec.strip()
    if spec.startswith("{"):
        obj = orjson.loads(spec)
        if not isinstance(obj, dict) or "name" not in obj or "path" not in obj:
            raise ValueError(f"--lora-modules JSON needs 'name' and 'path': {spec}")
        return LoraModule(str(obj["name"]), str(obj["path"]), obj.get("base_model_name"))
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules entry must be name=path or JSON: {spec!r}")
    return LoraModule(name, path)


@dataclass(slots=True)
class SimConfig:
    """All model, engine, timing, KV-event and failure-injection settings of one pod.

    One config is shared by every pod of a ``SimPool``; per-pod values (ports, names) are not
    here. Durations are seconds of simulated time, multiplied by ``time_scale`` when slept.
    """

    # -- model / tokenizer
    served_model_names: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    model_path: str = ""  # shown as "root" in /v1/models; defaults to the first served name
    tokenizer: str | None = None  # directory with tokenizer.json (+ tokenizer_config.json)
    max_model_len: int = 131072
    default_max_tokens: int = 16  # output length when a request gives no max_tokens

    # -- engine
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 8192
    max_waiting_queue_length: int = 10000  # beyond: 429, as an overloaded server would

    # -- KV cache
    block_size: int = 16
    num_gpu_blocks: int = 26000
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9

    # -- timing (simulated seconds)
    time_scale: float = 1.0
    prefill_overhead: float = 0.030
    prefill_time_per_token: float = 0.000250
    inter_token_latency: float = 0.012
    time_factor_under_load: float = 2.0
    kv_transfer_time_per_token: float = 0.000003
    kv_transfer_overhead: float = 0.0

    # -- LoRA
    lora_modules: list[LoraModule] = field(default_factory=list)
    enable_lora: bool = False  # also implied by lora_modules
    max_loras: int = 1
    lora_load_delay: float = 0.010  # paid when an adapter enters a GPU slot
    #: disk read of an adapter: a runtime load (``/v1/load_lora_adapter``) takes this long and
    #: pauses the engine's steps meanwhile (vLLM's engine core runs the load between steps);
    #: an adapter evicted from the CPU cache pays it again in the step that uses it
    lora_load_time: float = 0.0
    max_cpu_loras: int = 0  # adapters whose weights stay in CPU memory; 0 = max_loras (vLLM's default)

    # -- P/D (NIXL-shaped kv_transfer_params)
    kv_side_channel_host: str = "127.0.0.1"
    kv_side_channel_port: int = 5600

    # -- KV events (ZMQ PUB, vLLM wire format; ports are per pod, given to SimPool)
    kv_events_topic: str = "kv@{host}:{port}@{model}"  # {host} {port} {model} {pod} substituted
    kv_events_buffer_steps: int = 10000

    # -- pod identity (response headers)
    namespace: str = "default"
    pod_name_prefix: str = "sim-"

    # -- failure injection
    failure_injection_rate: float = 0.0  # percent of requests (0..100) answered with an error
    failure_types: list[str] = field(default_factory=lambda: ["server_error"])
    added_latency: float = 0.0  # seconds before any completion is processed (not time-scaled)
    seed: int = 0

    # -- metrics
    histogram_refresh: float = 0.25  # re-render histogram text at most this often (seconds)

    @property
    def model_name(self) -> str:
        """The name vLLM puts in the ``model_name`` metric label: the first served name."""
        return self.served_model_names[0]

    @property
    def cpu_lora_slots(self) -> int:
        """Adapters kept in CPU memory (``max_cpu_loras``, default ``max_loras``)."""
        return self.max_cpu_loras or self.max_loras

    @property
    def lora_enabled(self) -> bool:
        return self.enable_lora or bool(self.lora_modules)

    def validate(self) -> None:
        """Fail at start with a message naming the field, never mid-request."""
        if not self.served_model_names:
            raise ValueError("served_model_names: at least one name is required")
        if self.block_size not in (1, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size: {self.block_size} is not one vLLM accepts (1, 8, 16, 32, 64, 128)")
        if self.num_gpu_blocks < 2:
            raise ValueError("num_gpu_blocks must be at least 2 (vLLM reserves one null block)")
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive")
        if self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_batched_tokens must be positive")
        if self.time_scale <= 0:
            raise ValueError("time_scale must be positive")
        if self.time_factor_under_load < 1.0:
            raise ValueError("time_factor_under_load must be >= 1.0")
        if not 0.0 <= self.failure_injection_rate <= 100.0:
            raise ValueError("failure_injection_rate must be within 0..100 (percent)")
        if self.max_loras <= 0:
            raise ValueError("max_loras must be positive")
        if self.max_cpu_loras and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}), "
                             "as vLLM requires (0 = max_loras)")
        if self.lora_load_time < 0 or self.lora_load_delay < 0:
            raise ValueError("lora_load_time and lora_load_delay must be >= 0")
        from epp.sim.errors import FAILURE_TYPES  # local: errors imports nothing of config

        for t in self.failure_types:
            if t not in FAILURE_TYPES:
                raise ValueError(f"failure_types: unknown {t!r}; known: {sorted(FAILURE_TYPES)}")

    def replace(self, **changes: object) -> SimConfig:
        """A copy with some fields changed (tests tweak one knob at a time)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
