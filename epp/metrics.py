"""The picker's own Prometheus metrics, with GIE's names so existing dashboards work.

One ``EppMetrics`` object owns a private ``CollectorRegistry`` (no module-level globals),
created by the runner and handed to whatever records. Label sets follow gie.md §6:
M = {model_name, target_model_name}, P = {name} (the pool).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from epp.usage import series as usage_series

_LATENCY_BUCKETS = (
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
)
_REQUEST_BUCKETS = (
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20,
    30, 45, 60, 120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600,
)
_TOKEN_BUCKETS = tuple(float(2**i) for i in range(0, 20))
_SIZE_BUCKETS = tuple(float(64 * 4**i) for i in range(0, 12))
_M = ("model_name", "target_model_name")


class EppMetrics:
    """Every metric the picker exports (one instance per process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # --- per objective / model (request control) ---
        self.request_total = Counter(
            "inference_objective_request_total", "Requests received, by model and priority.",
            (*_M, "priority"), registry=r)
        self.request_error_total = Counter(
            "inference_objective_request_error_total", "Requests that ended in an error.",
            (*_M, "error_code"), registry=r)
        self.request_duration = Histogram(
            "inference_objective_request_duration_seconds",
            "Time from the picker receiving the request to the response completing.",
            _M, buckets=_REQUEST_BUCKETS, registry=r)
        self.request_sizes = Histogram(
            "inference_objective_request_sizes", "Request body sizes in bytes.",
            _M, buckets=_SIZE_BUCKETS, registry=r)
        self.response_sizes = Histogram(
            "inference_objective_response_sizes", "Response body sizes in bytes.",
            _M, buckets=_SIZE_BUCKETS, registry=r)
        self.input_tokens = Histogram(
            "inference_objective_input_tokens", "Prompt tokens (from the response usage).",
            _M, buckets=_TOKEN_BUCKETS, registry=r)
        self.output_tokens = Histogram(
            "inference_objective_output_tokens", "Completion tokens (from the response usage).",
            _M, buckets=_TOKEN_BUCKETS, registry=r)
        self.prompt_cached_tokens = Histogram(
            "inference_objective_prompt_cached_tokens",
            "Cached prompt tokens (usage.prompt_tokens_details.cached_tokens).",
            _M, buckets=_TOKEN_BUCKETS, registry=r)
        self.running_requests = Gauge(
            "inference_objective_running_requests", "Requests in flight through the picker.",
            ("model_name",), registry=r)
        self.normalized_tpot = Histogram(
            "inference_objective_normalized_time_per_output_token_seconds",
            "Request latency divided by output tokens.", _M,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
            registry=r)
        # --- pool (refreshed by a background task) ---
        self.pool_avg_kv = Gauge(
            "inference_pool_average_kv_cache_utilization",
            "Mean KV-cache utilization of the pool's endpoints with fresh metrics.", ("name",),
            registry=r)
        self.pool_avg_queue = Gauge(
            "inference_pool_average_queue_size",
            "Mean waiting-queue size of the pool's endpoints with fresh metrics.", ("name",),
            registry=r)
        self.pool_avg_running = Gauge(
            "inference_pool_average_running_requests",
            "Mean running requests of the pool's endpoints with fresh metrics.", ("name",),
            registry=r)
        self.pool_ready_pods = Gauge(
            "inference_pool_ready_pods", "Endpoints with fresh metrics.", ("name",), registry=r)
        self.pool_per_pod_queue = Gauge(
            "inference_pool_per_pod_queue_size", "Waiting-queue size per endpoint.",
            ("name", "model_server_pod"), registry=r)
        # --- scheduler / extension ---
        self.info = Gauge(
            "inference_extension_info", "Build information.", ("commit", "build_ref"), registry=r)
        self.scheduler_e2e = Histogram(
            "inference_extension_scheduler_e2e_duration_seconds",
            "Time spent in one scheduling cycle.", buckets=_LATENCY_BUCKETS, registry=r)
        self.scheduler_attempts = Counter(
            "inference_extension_scheduler_attempts_total", "Scheduling attempts by outcome.",
            ("status", "target_model_name", "pod_name", "namespace", "port"), registry=r)
        self.plugin_duration = Histogram(
            "inference_extension_plugin_duration_seconds", "Time spent in each plugin.",
            ("extension_point", "plugin_type", "plugin_name"), buckets=_LATENCY_BUCKETS,
            registry=r)
        self.prefix_indexer_size = Gauge(
            "inference_extension_prefix_indexer_size", "Entries in the approximate prefix index.",
            registry=r)
        self.prefix_indexer_hit_ratio = Histogram(
            "inference_extension_prefix_indexer_hit_ratio",
            "Matched prefix blocks / request blocks, for the chosen endpoint.",
            buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        self.prefix_indexer_hit_bytes = Histogram(
            "inference_extension_prefix_indexer_hit_bytes",
            "Matched prefix length in bytes, for the chosen endpoint.",
            buckets=_SIZE_BUCKETS, registry=r)
        self.model_rewrite_decisions = Counter(
            "inference_extension_model_rewrite_decisions_total", "Model rewrite decisions.",
            ("model_rewrite_name", "model_name", "target_model"), registry=r)
        # --- protocol-level (ours; no GIE equivalent) ---
        self.served_endpoint_total = Counter(
            "epp_served_endpoint_total",
            "Responses by the endpoint the gateway reports as served, and whether it was the "
            "picker's primary choice.", ("endpoint", "matched_pick"), registry=r)
        self.extproc_protocol_errors = Counter(
            "epp_extproc_protocol_errors_total",
            "ext_proc streams the picker ended (gRPC INVALID_ARGUMENT) because a message came out "
            "of order, by the message type that broke the order.", ("message",), registry=r)
        self.scrape_errors = Counter(
            "epp_metrics_scrape_errors_total", "Failed model-server metric scrapes.",
            ("endpoint",), registry=r)
        # --- precise prefix-cache index (KV events; epp/datalayer/kvevents) ---
        self.precise_index_entries = Gauge(
            "epp_precise_prefix_index_entries",
            "(block, endpoint) entries in the precise prefix index (from KV events).", registry=r)
        self.precise_index_keys = Gauge(
            "epp_precise_prefix_index_blocks", "Distinct block keys in the precise prefix index.",
            registry=r)
        self.precise_speculative_entries = Gauge(
            "epp_precise_prefix_speculative_entries",
            "Speculative (picked, not yet confirmed by events) entries in the precise index.",
            registry=r)
        self.precise_hit_ratio = Histogram(
            "epp_precise_prefix_hit_ratio",
            "Matched prefix blocks / request blocks in the precise index, for the chosen endpoint.",
            buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        self.kv_events = Counter(
            "epp_kv_events_total", "KV-cache events applied to the precise index, by type.",
            ("type",), registry=r)
        self.kv_events_gaps = Counter(
            "epp_kv_events_gaps_total", "Sequence gaps seen in KV-event streams.", registry=r)
        self.kv_events_replays = Counter(
            "epp_kv_events_replays_total", "Replay requests to engines' replay sockets, by outcome.",
            ("outcome",), registry=r)
        self.kv_events_resyncs = Counter(
            "epp_kv_events_resyncs_total",
            "Endpoints whose index entries were dropped to resync (gap without replay, restart).",
            ("reason",), registry=r)
        self.kv_events_decode_errors = Counter(
            "epp_kv_events_decode_errors_total", "KV-event messages that could not be decoded.",
            registry=r)
        self.kv_event_subscribers = Gauge(
            "epp_kv_event_subscribers", "Endpoints with a KV-event subscription.", registry=r)
        # precise index recovery and tokenization (issue 12; docs/precise-prefix.md)
        self.kv_events_orphans = Counter(
            "epp_kv_events_orphan_blocks_total",
            "Stored blocks whose parent the precise index did not know, by outcome: anchored "
            "(re-keyed from a routed request, engine hashes verified), anchored_unverified, dropped "
            "(never anchored).", ("outcome",), registry=r)
        self.kv_events_orphans_pending = Gauge(
            "epp_kv_events_orphan_blocks_pending", "Orphan blocks waiting for a request to anchor them.",
            registry=r)
        self.precise_tokenizer_checks = Counter(
            "epp_precise_prefix_tokenizer_checks_total",
            "Picks whose first block the engine reported under the picker's key (match) or not "
            "(mismatch: the picker's tokenizer is not the engine's).", ("outcome",), registry=r)
        self.precise_tokenizations = Counter(
            "epp_precise_prefix_tokenizations_total",
            "Request tokenizations for the precise scorer, by outcome: cached, encoded (worker "
            "pool), server (model server /tokenize), failed, overloaded, skipped.", ("outcome",), registry=r)
        # --- flow control (GIE names, gie.md §6; epp/flowcontrol) ---
        _FC = ("fairness_id", "priority", "inference_pool", *_M)
        self.fc_queue_duration = Histogram(
            "inference_extension_flow_control_request_queue_duration_seconds",
            "Time a request spent in the flow-control queue, by outcome (Dispatched, "
            "RejectedCapacity, RejectedSheddable, EvictedTTL, EvictedNoEndpoints, "
            "EvictedContextCancelled, EvictedOther).",
            (*_FC, "outcome"), buckets=_REQUEST_BUCKETS, registry=r)
        self.fc_queue_size = Gauge(
            "inference_extension_flow_control_queue_size", "Requests waiting in flow control.",
            _FC, registry=r)
        self.fc_queue_bytes = Gauge(
            "inference_extension_flow_control_queue_bytes", "Bytes of requests waiting in flow control.",
            _FC, registry=r)
        self.fc_pool_saturation = Gauge(
            "inference_extension_flow_control_pool_saturation",
            "Saturation the dispatcher last saw (>= 1 holds requests back).", ("inference_pool",), registry=r)
        self.fc_dispatch_cycle = Histogram(
            "inference_extension_flow_control_dispatch_cycle_duration_seconds",
            "Time of one dispatch cycle.", buckets=_LATENCY_BUCKETS, registry=r)
        # ours: tokens served per tenant (real usage), and demand for autoscalers (KEDA)
        self.fc_tokens_served = Counter(
            "epp_flow_control_tokens_served_total",
            "Tokens served per fairness id, from the response usage; type is prompt (uncached), "
            "cached or completion.", ("fairness_id", "priority", "inference_pool", "type"), registry=r)
        self.fc_demand = Gauge(
            "epp_pool_demand_requests",
            "Requests the picker holds (state=queued, incl. those waiting for an empty pool to "
            "scale up) or has in flight (state=inflight): the KEDA scaling signal.",
            ("inference_pool", "state"), registry=r)
        # --- per-tenant usage (epp/requestcontrol/usage.py; names shared with `epp usage`) ---
        _T = ("inference_pool", "tenant", "tier")
        self.tenant_requests = Counter(
            usage_series.REQUESTS,
            "Requests per tenant and tier: outcome=served (routed to a pod) or rejected (429/503 by the "
            "picker). Tenants beyond --usage-max-tenants are counted as 'other'.",
            (*_T, "outcome"), registry=r)
        self.tenant_tokens = Counter(
            usage_series.TOKENS,
            "Tokens per tenant and tier from the response usage; type is prompt (uncached), cached or "
            "completion.", (*_T, "type"), registry=r)
        self.tenant_queue_seconds = Counter(
            usage_series.QUEUE_SECONDS,
            "Seconds served requests waited in admission (flow-control queue, empty-pool hold), summed "
            "per tenant and tier.", _T, registry=r)
        # --- P/D disaggregation (disagg-profile-handler) ---
        self.pd_decisions = Counter(
            "epp_pd_decisions_total",
            "P/D decisions: decision is disaggregated|aggregated, reason why (decider or handler).",
            ("decision", "reason"), registry=r)
        self.pd_prefill_endpoint = Counter(
            "epp_pd_prefill_endpoint_total",
            "Disaggregated requests by the prefill endpoint chosen (ip:port).",
            ("endpoint",), registry=r)


class ModelSeries:
    """The per-(model, target model) metric children, resolved once and reused.

    ``Metric.labels(...)`` costs a few µs per call (it validates and hashes the label
    values); a request records about ten of them, so the request path looks them up here
    instead: one dict lookup per request. ``remove`` takes the children out of the registry
    again (label values that are gone must not stay exported forever).
    """

    __slots__ = (
        "_errors", "_metrics", "_priorities", "cached_tokens", "duration", "input_tokens", "labels",
        "output_tokens", "request_sizes", "response_sizes", "running", "tpot",
    )

    def __init__(self, metrics: EppMetrics, model: str, target: str) -> None:
        self._metrics = metrics
        self.labels = (model, target)
        self.request_sizes = metrics.request_sizes.labels(model, target)
        self.response_sizes = metrics.response_sizes.labels(model, target)
        self.duration = metrics.request_duration.labels(model, target)
        self.input_tokens = metrics.input_tokens.labels(model, target)
        self.output_tokens = metrics.output_tokens.labels(model, target)
        self.cached_tokens = metrics.prompt_cached_tokens.labels(model, target)
        self.tpot = metrics.normalized_tpot.labels(model, target)
        self.running = metrics.running_requests.labels(model)
        self._priorities: dict[int, Counter] = {}
        self._errors: dict[str, Counter] = {}

    def requests(self, priority: int) -> Counter:
        c = self._priorities.get(priority)
        if c is None:
            c = self._priorities[priority] = self._metrics.request_total.labels(*self.labels, str(priority))
        return c

    def errors(self, code: str) -> Counter:
        c = self._errors.get(code)
        if c is None:
            c = self._errors[code] = self._metrics.request_error_total.labels(*self.labels, code)
        return c

    def remove(self) -> None:
        """Drop this series' children from the registry (``running`` is keyed by the model
        alone and shared with other targets: the cache removes it once per model)."""
        m = self._metrics
        for metric in (m.request_sizes, m.response_sizes, m.request_duration, m.input_tokens,
                       m.output_tokens, m.prompt_cached_tokens, m.normalized_tpot):
            _remove(metric, *self.labels)
        for priority in self._priorities:
            _remove(m.request_total, *self.labels, str(priority))
        for code in self._errors:
            _remove(m.request_error_total, *self.labels, code)


def _remove(metric: Counter | Gauge | Histogram, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:  # already gone
        pass


class ModelSeriesCache:
    """``ModelSeries`` by (model, target).

    Bounded twice: request control folds model names the pool does not serve into one label
    value (``epp.requestcontrol.modellabels``), and past ``max_entries`` the cache is cleared,
    children and all. A request still running keeps its (now detached) children, so the
    exported running gauge can undercount briefly but never goes below zero.
    """

    def __init__(self, metrics: EppMetrics, max_entries: int = 1024) -> None:
        self.metrics = metrics
        self.max_entries = max_entries
        self._series: dict[tuple[str, str], ModelSeries] = {}

    def get(self, model: str, target: str) -> ModelSeries:
        key = (model, target)
        s = self._series.get(key)
        if s is None:
            if len(self._series) >= self.max_entries:
                self.clear()  # rare: rebuild lazily rather than track recency on the hot path
            s = self._series[key] = ModelSeries(self.metrics, model, target)
        return s

    def clear(self) -> None:
        """Forget every series and remove its children from the registry."""
        models = set()
        for s in self._series.values():
            s.remove()
            models.add(s.labels[0])
        for model in models:
            _remove(self.metrics.running_requests, model)
        self._series.clear()

    def __len__(self) -> int:
        return len(self._series)
