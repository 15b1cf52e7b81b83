"""vLLM's ``/metrics`` page, rendered cheaply.

The picker scrapes every pod every 50 ms, so a pool of 16 pods means ~300 scrapes/s in the
simulator's one process. prometheus_client's registry walk would cost milliseconds per page;
here the page is text assembled from pre-rendered pieces: HELP/TYPE headers, label strings and
``_created`` lines are built once, gauges and counters are formatted per scrape (a few dozen
lines), and the ~330 histogram lines are re-rendered only when something was observed and at
most every ``histogram_refresh`` seconds (they feed dashboards, not routing).

Names, types, HELP texts, label keys (sorted, as vLLM's multiprocess collector emits them),
bucket bounds and the ``_created`` companions follow a real vLLM 0.32 page
(``tests/data/vllm_metrics_sample.txt``).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from epp.sim.sequence import Sequence

_REQ_LAT_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_TOKEN_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
_ITER_BUCKETS = (1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0)
_N_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0)
_PREEMPT_BUCKETS = (1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0)

FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")


def format_value(v: float) -> str:
    """A sample value as Prometheus' Python client prints it (Go float formatting)."""
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    if v != v:
        return "NaN"
    s = repr(float(v))
    dot = s.find(".")
    if v > 0 and dot > 6 and "e" not in s:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0").rstrip(".")
        return f"{mantissa}e+0{dot - 1}"
    return s


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def labels(pairs: dict[str, str]) -> str:
    """``{k="v",...}`` with keys sorted, the order vLLM's page uses."""
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(pairs.items())) + "}"


@dataclass(slots=True)
class Histogram:
    """Fixed buckets, per-bucket (non-cumulative) counts: an observation is a bisect + 3 adds."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, v: float, times: int = 1) -> None:
        self.counts[bisect_left(self.bounds, v)] += times
        self.total += v * times
        self.n += times


@dataclass(slots=True)
class EngineStats:
    """Counters and histograms the engine updates; gauges are read live from the engine."""

    prefix_queries: int = 0
    prefix_hits: int = 0
    external_queries: int = 0
    external_hits: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0
    prompt_local_compute: int = 0
    prompt_local_cache_hit: int = 0
    prompt_external: int = 0
    generation_tokens: int = 0
    success: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISHED_REASONS, 0))
    dirty: bool = False
    h_prompt_tokens: Histogram = field(default_factory=lambda: Histogram(_TOKEN_BUCKETS))
    h_generation_tokens: Histogram = field(default_factory=lambda: Histogram(_TOKEN_BUCKETS))
    h_iteration_tokens: Histogram = field(default_factory=lambda: Histogram(_ITER_BUCKETS))
    h_max_gen_tokens: Histogram = field(default_factory=lambda: Histogram(_TOKEN_BUCKETS))
    h_params_n: Histogram = field(default_factory=lambda: Histogram(_N_BUCKETS))
    h_params_max_tokens: Histogram = field(default_factory=lambda: Histogram(_TOKEN_BUCKETS))
    h_ttft: Histogram = field(default_factory=lambda: Histogram(_TTFT_BUCKETS))
    h_itl: Histogram = field(default_factory=lambda: Histogram(_ITL_BUCKETS))
    h_tpot: Histogram = field(default_factory=lambda: Histogram(_ITL_BUCKETS))
    h_e2e: Histogram = field(default_factory=lambda: Histogram(_REQ_LAT_BUCKETS))
    h_queue: Histogram = field(default_factory=lambda: Histogram(_REQ_LAT_BUCKETS))
    h_inference: Histogram = field(default_factory=lambda: Histogram(_REQ_LAT_BUCKETS))
    h_prefill: Histogram = field(default_factory=lambda: Histogram(_REQ_LAT_BUCKETS))
    h_decode: Histogram = field(default_factory=lambda: Histogram(_REQ_LAT_BUCKETS))
    h_num_preemptions: Histogram = field(default_factory=lambda: Histogram(_PREEMPT_BUCKETS))
    h_prefill_computed: Histogram = field(default_factory=lambda: Histogram(_TOKEN_BUCKETS))

    def record_finished(self, seq: Sequence, reason: str, now: float) -> None:
        """A request finished (``reason`` as vLLM's ``finished_reason``): count it and observe
        its per-request histograms, as vLLM does once per finished request."""
        self.success[reason] = self.success.get(reason, 0) + 1
        self.h_e2e.observe(now - seq.arrival)
        self.h_queue.observe(seq.scheduled_at - seq.arrival)
        self.h_inference.observe(now - seq.scheduled_at)
        self.h_prefill.observe(seq.first_token_at - seq.scheduled_at)
        decode = now - seq.first_token_at
        self.h_decode.observe(decode)
        if seq.generated > 1:
            self.h_tpot.observe(decode / (seq.generated - 1))
        self.h_prompt_tokens.observe(float(seq.prompt_len))
        self.h_generation_tokens.observe(float(seq.generated))
        self.h_max_gen_tokens.observe(float(seq.max_tokens))
        self.h_params_max_tokens.observe(float(seq.max_tokens))
        self.h_params_n.observe(1.0)
        self.h_num_preemptions.observe(float(seq.preemptions))
        self.h_prefill_computed.observe(float(seq.prompt_len - max(seq.cached_tokens, 0)))


# (attribute on EngineStats, family name, HELP) in the order of vLLM's page.
_HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("h_prompt_tokens", "vllm:request_prompt_tokens", "Number of prefill tokens processed."),
    ("h_generation_tokens", "vllm:request_generation_tokens", "Number of generation tokens processed."),
    ("h_iteration_tokens", "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step."),
    ("h_max_gen_tokens", "vllm:request_max_num_generation_tokens",
     "Histogram of maximum number of requested generation tokens."),
    ("h_params_n", "vllm:request_params_n", "Histogram of the n request parameter."),
    ("h_params_max_tokens", "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter."),
    ("h_ttft", "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds."),
    ("h_itl", "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds."),
    ("h_tpot", "vllm:request_time_per_output_token_seconds",
     "Histogram of time_per_output_token_seconds per request."),
    ("h_e2e", "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds."),
    ("h_queue", "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request."),
    ("h_inference", "vllm:request_inference_time_seconds",
     "Histogram of time spent in RUNNING phase for request."),
    ("h_prefill", "vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request."),
    ("h_decode", "vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request."),
    ("h_num_preemptions", "vllm:request_num_preemptions",
     "Histogram of the number of times a request was preempted."),
    ("h_prefill_computed", "vllm:request_prefill_kv_computed_tokens",
     "Histogram of new KV tokens computed during prefill (excluding cached tokens)."),
)


def _head(name: str, kind: str, help_text: str) -> str:
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


@dataclass(slots=True)
class Gauges:
    """Live values read from the engine at scrape time."""

    running: int
    waiting: int
    waiting_deferred: int
    kv_usage: float
    lora_series: list[tuple[str, float]]  # (label string, timestamp), only when LoRA is enabled


@dataclass(slots=True)
class MetricsPage:
    """Renders one pod's page; everything constant is prepared in ``__post_init__``."""

    model_name: str
    cache_info: dict[str, str]
    histogram_refresh: float = 0.25
    _base: str = ""
    _lbl: str = ""
    _created: dict[str, str] = field(default_factory=dict)
    _hist_text: str = ""
    _hist_at: float = -1.0
    _start: float = 0.0

    def __post_init__(self) -> None:
        self._start = time.time()
        self._base = f'engine="0",model_name="{_escape(self.model_name)}"'
        self._lbl = "{" + self._base + "}"

    def _created_block(self, name: str, help_text: str, suffixes: list[str]) -> str:
        key = name
        got = self._created.get(key)
        if got is None:
            cname = f"{name}_created"
            lines = [_head(cname, "gauge", help_text)]
            ts = format_value(self._start)
            for lbl in suffixes:
                lines.append(f"{cname}{lbl} {ts}\n")
            got = "".join(lines)
            self._created[key] = got
        return got

    def _counter(self, out: list[str], base: str, help_text: str, value: float) -> None:
        out.append(_head(base + "_total", "counter", help_text))
        out.append(f"{base}_total{self._lbl} {format_value(float(value))}\n")
        out.append(self._created_block(base, help_text, [self._lbl]))

    def _labelled_counter(
        self, out: list[str], base: str, help_text: str, key: str, values: dict[str, int]
    ) -> None:
        out.append(_head(base + "_total", "counter", help_text))
        lbls = [labels({"engine": "0", "model_name": self.model_name, key: k}) for k in values]
        for lbl, v in zip(lbls, values.values(), strict=True):
            out.append(f"{base}_total{lbl} {format_value(float(v))}\n")
        out.append(self._created_block(base, help_text, lbls))

    def _render_histograms(self, stats: EngineStats) -> str:
        out: list[str] = []
        base = self._base
        for attr, name, help_text in _HISTOGRAMS:
            h: Histogram = getattr(stats, attr)
            out.append(_head(name, "histogram", help_text))
            cum = 0
            for bound, c in zip(h.bounds, h.counts, strict=False):
                cum += c
                out.append(f'{name}_bucket{{engine="0",le="{format_value(bound)}",'
                           f'{base[11:]}}} {format_value(float(cum))}\n')
            out.append(f'{name}_bucket{{engine="0",le="+Inf",{base[11:]}}} {format_value(float(h.n))}\n')
            out.append(f"{name}_count{self._lbl} {format_value(float(h.n))}\n")
            out.append(f"{name}_sum{self._lbl} {format_value(float(h.total))}\n")
            out.append(self._created_block(name, help_text, [self._lbl]))
        return "".join(out)

    def render(self, g: Gauges, stats: EngineStats) -> bytes:
        """The whole page as UTF-8 bytes (Prometheus text format 0.0.4)."""
        lbl = self._lbl
        mn = self.model_name
        out: list[str] = [
            _head("vllm:num_requests_running", "gauge", "Number of requests in model execution batches."),
            f"vllm:num_requests_running{lbl} {format_value(float(g.running))}\n",
            _head("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed."),
            f"vllm:num_requests_waiting{lbl} {format_value(float(g.waiting))}\n",
            _head("vllm:num_requests_waiting_by_reason", "gauge",
                  "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling "
                  "capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked "
                  "status). Sum of all reasons equals vllm:num_requests_waiting."),
            f"vllm:num_requests_waiting_by_reason{labels({'engine': '0', 'model_name': mn, 'reason': 'capacity'})}"
            f" {format_value(float(g.waiting - g.waiting_deferred))}\n",
            f"vllm:num_requests_waiting_by_reason{labels({'engine': '0', 'model_name': mn, 'reason': 'deferred'})}"
            f" {format_value(float(g.waiting_deferred))}\n",
            _head("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage."),
            f"vllm:kv_cache_usage_perc{lbl} {format_value(g.kv_usage)}\n",
        ]
        s = stats
        self._counter(out, "vllm:prefix_cache_queries",
                      "Prefix cache queries, in terms of number of queried tokens.", s.prefix_queries)
        self._counter(out, "vllm:prefix_cache_hits",
                      "Prefix cache hits, in terms of number of cached tokens.", s.prefix_hits)
        self._counter(out, "vllm:external_prefix_cache_queries",
                      "External prefix cache queries from KV connector cross-instance cache sharing, in terms "
                      "of number of queried tokens.", s.external_queries)
        self._counter(out, "vllm:external_prefix_cache_hits",
                      "External prefix cache hits from KV connector cross-instance cache sharing, in terms of "
                      "number of cached tokens.", s.external_hits)
        self._counter(out, "vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                      s.preemptions)
        self._counter(out, "vllm:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens)
        self._labelled_counter(out, "vllm:prompt_tokens_by_source", "Number of prompt tokens by source.",
                               "source", {"local_compute": s.prompt_local_compute,
                                          "local_cache_hit": s.prompt_local_cache_hit,
                                          "external_kv_transfer": s.prompt_external})
        self._counter(out, "vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external).",
                      s.prompt_local_cache_hit + s.prompt_external)
        self._counter(out, "vllm:generation_tokens", "Number of generation tokens processed.",
                      s.generation_tokens)
        self._labelled_counter(out, "vllm:request_success", "Count of successfully processed requests.",
                               "finished_reason", s.success)
        now = time.monotonic()
        if not self._hist_text or (s.dirty and now - self._hist_at >= self.histogram_refresh):
            self._hist_text = self._render_histograms(s)
            self._hist_at = now
            s.dirty = False
        out.append(self._hist_text)
        if g.lora_series:
            out.append(_head("vllm:lora_requests_info", "gauge", "Running stats on lora requests."))
            for lbls, ts in g.lora_series:
                out.append(f"vllm:lora_requests_info{lbls} {format_value(ts)}\n")
        out.append(self._static_tail())
        return "".join(out).encode()

    def _static_tail(self) -> str:
        got = self._created.get("__tail__")
        if got is None:
            info = dict(self.cache_info)
            info["engine"] = "0"
            got = (_head("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig")
                   + f"vllm:cache_config_info{labels(info)} 1.0\n")
            self._created["__tail__"] = got
        return got


def cache_config_labels(
    block_size: int, num_gpu_blocks: int, enable_prefix_caching: bool, gpu_memory_utilization: float,
    max_model_len: int, kv_bytes_per_token: int,
) -> dict[str, str]:
    """The ``vllm:cache_config_info`` label set (every key a vLLM 0.32 page carries)."""
    tokens = num_gpu_blocks * block_size
    return {
        "_block_size_resolved": "True",
        "block_size": str(block_size),
        "cache_dtype": "auto",
        "cache_hit_alignment_tokens": "None",
        "effective_attention_block_size": str(block_size),
        "enable_mamba_shared_prefix_checkpoint": "False",
        "enable_prefix_caching": str(enable_prefix_caching),
        "gpu_memory_utilization": str(gpu_memory_utilization),
        "hash_block_size": "None",
        "is_attention_free": "False",
        "kv_cache_dtype_skip_layers": "[]",
        "kv_cache_layout": "None",
        "kv_cache_max_concurrency": str(round(tokens / max_model_len, 2)),
        "kv_cache_memory_bytes": str(tokens * kv_bytes_per_token),
        "kv_cache_size_tokens": str(tokens),
        "kv_offloading_backend": "native",
        "kv_offloading_size": "None",
        "kv_sharing_fast_prefill": "False",
        "mamba_block_size": "None",
        "mamba_cache_dtype": "auto",
        "mamba_cache_mode": "none",
        "mamba_page_size_padded": "None",
        "mamba_ssm_cache_dtype": "float32",
        "num_cpu_blocks": "None",
        "num_gpu_blocks": str(num_gpu_blocks),
        "num_gpu_blocks_override": str(num_gpu_blocks),
        "prefix_cache_retention_interval": "0",
        "prefix_caching_hash_algo": "sha256",
        "prefix_match_unit": "None",
        "replayssm_buffer_len": "16",
        "skip_page_size_padded": "None",
        "sliding_window": "None",
        "swa_bounded_replay": "True",
        "use_kda_recoverssm": "False",
        "use_replayssm": "False",
        "user_specified_block_size": "True",
    }
