"""``core-metrics-extractor`` (GIE): map a model server's Prometheus text to the endpoint's
queue, running requests, KV-cache use, LoRA adapters and cache geometry.

The engine is chosen per pod by a label (``engineLabelKey``, default GIE's
``inference.networking.k8s.io/engine-type``); ``engineConfigs`` replaces the built-in metric
specs of an engine (vLLM, SGLang, TGI, ...). The mappings live in
``epp.datalayer.metric_mapping``, the parsing in ``epp.datalayer.metrics_parser``.
"""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, Field, field_validator, model_validator

from epp.datalayer.metric_mapping import DEFAULT_ENGINE_TYPE, ENGINE_TYPE_LABEL, build_mappings
from epp.framework.datalayer import MetricsExtractor
from epp.framework.plugin import PluginContext, PluginParams


class EngineMetricSpecs(PluginParams):
    """PromQL-style instant selectors (``name{label=value}``) for one engine type.

    The entry replaces the engine's whole built-in entry (GIE): a spec left unset or ``""``
    is disabled.
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

    @model_validator(mode="after")
    def _compiles(self) -> Self:
        """Compile the mappings now, so a bad selector or an unknown ``defaultEngine`` fails
        when the config loads (naming the field), not when scraping starts."""
        mappings = build_mappings(self.engine_overrides())
        if self.default_engine not in mappings:
            raise ValueError(
                f"defaultEngine {self.default_engine!r} has no metrics mapping; known: "
                + ", ".join(sorted(mappings)) + " (or add it to engineConfigs)"
            )
        return self

    def engine_overrides(self) -> dict[str, dict[str, str]] | None:
        """``engineConfigs`` in the data layer's form (``epp.datalayer.metric_mapping``
        ``build_mappings``): each entry replaces the whole built-in entry of the same engine,
        as in GIE; a spec left unset is disabled. The built-ins live in the data layer only."""
        if not self.engine_configs:
            return None
        return {
            spec.name: spec.model_dump(by_alias=True, exclude={"name"}, exclude_none=True)
            for spec in self.engine_configs
        }


class CoreMetricsExtractor(MetricsExtractor):
    type_name = "core-metrics-extractor"
    Params = CoreMetricsExtractorParams

    def __init__(self, name: str, params: CoreMetricsExtractorParams | None = None) -> None:
        super().__init__(name)
        self.params = params or CoreMetricsExtractorParams()

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        assert isinstance(params, CoreMetricsExtractorParams)
        return cls(name, params)

    @property
    def engine_label_key(self) -> str:
        return self.params.engine_label_key

    @property
    def default_engine(self) -> str:
        return self.params.default_engine

    def engine_overrides(self) -> dict[str, dict[str, str]] | None:
        return self.params.engine_overrides()
