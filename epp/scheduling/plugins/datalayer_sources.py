"""Data-layer plugin types (GIE §3.4): ``metrics-data-source`` and ``core-metrics-extractor``.

They do no scheduling; they exist so an ``EndpointPickerConfig`` naming them validates, and
so their parsed parameters reach the metrics scraper (``PickerConfig.metrics_source`` /
``PickerConfig.metrics_extractor``). The scraping itself lives in ``epp/datalayer``.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, Field, field_validator

from epp.datalayer.metrics_parser import DEFAULT_ENGINE_TYPE, ENGINE_TYPE_LABEL
from epp.scheduling.framework import Plugin, PluginContext
from epp.scheduling.params import PluginParams


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


class CoreMetricsExtractorParams(PluginParams):
    #: pod label choosing the engine's metric names
    engine_label_key: str = ENGINE_TYPE_LABEL
    #: engine assumed when the label is absent
    default_engine: str = DEFAULT_ENGINE_TYPE
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

    def engine_overrides(self) -> dict[str, dict[str, str]] | None:
        """``engineConfigs`` in the data layer's form (``epp.datalayer.metrics_parser``
        ``build_mappings``): each entry replaces the whole built-in entry of the same engine,
        as in GIE; a spec left unset is disabled. The built-ins live in the data layer only."""
        if not self.engine_configs:
            return None
        return {
            spec.name: spec.model_dump(by_alias=True, exclude={"name"}, exclude_none=True)
            for spec in self.engine_configs
        }


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
