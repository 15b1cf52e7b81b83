"""Data-layer plugin types (GIE §3.4): ``metrics-data-source`` and ``core-metrics-extractor``.

They do no scheduling; they exist so an ``EndpointPickerConfig`` naming them validates, and
so their parsed parameters reach the metrics scraper (``PickerConfig.metrics_source`` /
``PickerConfig.metrics_extractor``). The scraping itself lives in ``epp/datalayer``.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, Field, field_validator

from epp.scheduling.framework import Plugin, PluginContext
from epp.scheduling.params import PluginParams

DEFAULT_ENGINE_LABEL = "inference.networking.k8s.io/engine-type"


class MetricsDataSourceParams(PluginParams):
    scheme: Literal["http", "https"] = "http"
    path: str = "/metrics"
    insecure_skip_verify: bool = True

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("path must start with '/'")
        return v


class EngineMetricSpecs(PluginParams):
    """PromQL-style instant selectors (``name{label=value}``) for one engine type.

    ``None`` = keep the built-in spec; ``""`` = disable that metric.
    """

    name: str = Field(min_length=1)
    queued_requests_spec: str | None = None
    running_requests_spec: str | None = None
    kv_usage_spec: str | None = None
    lora_spec: str | None = None
    cache_info_spec: str | None = None


#: Built-in specs per engine (GIE §3.4 table). An engineConfigs entry with the same name
#: replaces the whole entry.
BUILTIN_ENGINE_SPECS: dict[str, EngineMetricSpecs] = {
    "vllm": EngineMetricSpecs(
        name="vllm",
        queued_requests_spec="vllm:num_requests_waiting",
        running_requests_spec="vllm:num_requests_running",
        kv_usage_spec="vllm:kv_cache_usage_perc",
        lora_spec="vllm:lora_requests_info",
        cache_info_spec="vllm:cache_config_info",
    ),
    "sglang": EngineMetricSpecs(
        name="sglang",
        queued_requests_spec="sglang:num_queue_reqs",
        running_requests_spec="sglang:num_running_reqs",
        kv_usage_spec="sglang:token_usage",
        lora_spec="",
        cache_info_spec="sglang:cache_config_info",
    ),
    "trtllm-serve": EngineMetricSpecs(
        name="trtllm-serve",
        queued_requests_spec="trtllm_num_requests_waiting",
        running_requests_spec="trtllm_num_requests_running",
        kv_usage_spec="trtllm_kv_cache_utilization",
        lora_spec="",
        cache_info_spec="",
    ),
    "triton-tensorrt-llm": EngineMetricSpecs(
        name="triton-tensorrt-llm",
        queued_requests_spec="nv_trt_llm_request_metrics{request_type=waiting}",
        running_requests_spec="nv_trt_llm_request_metrics{request_type=scheduled}",
        kv_usage_spec="nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}",
        lora_spec="",
        cache_info_spec="",
    ),
}


class CoreMetricsExtractorParams(PluginParams):
    #: pod label choosing the engine's metric names
    engine_label_key: str = DEFAULT_ENGINE_LABEL
    #: engine assumed when the label is absent
    default_engine: str = "vllm"
    engine_configs: tuple[EngineMetricSpecs, ...] = ()

    @field_validator("engine_configs")
    @classmethod
    def _unique(cls, v: tuple[EngineMetricSpecs, ...]) -> tuple[EngineMetricSpecs, ...]:
        seen: set[str] = set()
        for spec in v:
            if spec.name in seen:
                raise ValueError(f"duplicate engine config name {spec.name!r}")
            seen.add(spec.name)
        return v

    def engine_specs(self) -> dict[str, EngineMetricSpecs]:
        """Built-in specs with ``engineConfigs`` applied (same name → whole entry replaced)."""
        specs = dict(BUILTIN_ENGINE_SPECS)
        for spec in self.engine_configs:
            specs[spec.name] = spec
        return specs


class MetricsDataSource(Plugin):
    """Scrapes ``scheme://podIP:port/path`` per endpoint (done by ``epp/datalayer``)."""

    type_name = "metrics-data-source"
    Params = MetricsDataSourceParams

    def __init__(self, name: str, params: MetricsDataSourceParams | None = None) -> None:
        super().__init__(name)
        self.params = params or MetricsDataSourceParams()

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        assert isinstance(params, MetricsDataSourceParams)
        return cls(name, params)


class CoreMetricsExtractor(Plugin):
    """Maps the Prometheus text of a model server to ``EndpointMetrics`` fields."""

    type_name = "core-metrics-extractor"
    Params = CoreMetricsExtractorParams

    def __init__(self, name: str, params: CoreMetricsExtractorParams | None = None) -> None:
        super().__init__(name)
        self.params = params or CoreMetricsExtractorParams()

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        assert isinstance(params, CoreMetricsExtractorParams)
        return cls(name, params)
