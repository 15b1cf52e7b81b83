"""``metrics-data-source`` (GIE): scrape ``scheme://podIP:port/path`` per endpoint.

The scraper (``epp.datalayer.scraper``) asks this plugin for each endpoint's URL and whether
to verify TLS; the metrics port is the endpoint's ``metricsPort`` when the pool gives one
(a P/D sidecar in front of the engine), else its serving port.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, field_validator

from epp.framework.datalayer import DataSource, Endpoint, format_hostport
from epp.framework.plugin import PluginContext, PluginParams


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


class MetricsDataSource(DataSource):
    type_name = "metrics-data-source"
    Params = MetricsDataSourceParams

    def __init__(self, name: str, params: MetricsDataSourceParams | None = None) -> None:
        super().__init__(name)
        self.params = params or MetricsDataSourceParams()

    @classmethod
    def from_config(cls, name: str, params: BaseModel, ctx: PluginContext) -> Self:
        assert isinstance(params, MetricsDataSourceParams)
        return cls(name, params)

    def metrics_url(self, endpoint: Endpoint) -> str:
        host = endpoint.metrics_host or endpoint.address
        port = endpoint.metrics_port or endpoint.port
        return f"{self.params.scheme}://{format_hostport(host, port)}{self.params.path}"

    @property
    def verify_tls(self) -> bool:
        return not self.params.insecure_skip_verify
