"""The data layer and parser the config names are the ones the picker uses.

``dataLayer`` supports one source with one extractor, so anything more is an error rather than
silently unused; the configured ``metrics-data-source`` decides what ``epp serve`` fetches (URL
and TLS verification) and the configured ``core-metrics-extractor`` decides what it reads.
The serving tests run a real picker against aiohttp model-server stand-ins on 127.0.0.1.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web

from epp.config import ConfigError, build_scheduling, load_config
from epp.datalayer.datastore import Datastore
from epp.discovery.static import StaticDiscovery
from epp.framework.datalayer import Endpoint
from epp.framework.plugin import PluginContext
from epp.runner.server import PickerServer, ServeOptions
from epp.runner.tls import self_signed
from tests.waiting import eventually

HEAD = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
WAIT = 30.0  # hang guard only (a shared, loaded machine); a scrape normally lands within 50 ms
PROFILE = "schedulingProfiles: [{name: d, plugins: [{pluginRef: queue-scorer}]}]\n"

# a vLLM page plus a series only a custom engine spec reads, and an SGLang queue gauge
PAGE = """\
vllm:num_requests_waiting{engine="0"} 1
vllm:num_requests_running{engine="0"} 2
vllm:kv_cache_usage_perc{engine="0"} 0.25
my_waiting{model="m"} 7
sglang:num_queue_reqs 5
sglang:num_running_reqs 3
sglang:token_usage 0.5
"""


def load(body: str):  # type: ignore[no-untyped-def]
    return load_config(HEAD + body)


# ---------------------------------------------------------------- one source, one extractor
ERRORS = [
    ("""
plugins: [{type: queue-scorer}, {name: a, type: metrics-data-source}, {name: b, type: metrics-data-source}]
dataLayer:
  sources: [{pluginRef: a}, {pluginRef: b}]
""", 'dataLayer.sources[1] (pluginRef "b"): only one data source is supported'),
    ("""
plugins:
- {type: queue-scorer}
- {type: metrics-data-source}
- {name: x, type: core-metrics-extractor}
- {name: y, type: core-metrics-extractor}
dataLayer:
  sources: [{pluginRef: metrics-data-source, extractors: [{pluginRef: x}, {pluginRef: y}]}]
""", 'dataLayer.sources[0].extractors[1] (pluginRef "y"): only one metrics extractor per data '
     "source is supported"),
    ("""
plugins: [{type: queue-scorer}, {name: a, type: metrics-data-source}, {name: b, type: metrics-data-source}]
dataLayer:
  sources: [{pluginRef: a}]
""", 'plugins[2] (name "b"): data source not used: the data layer reads one, "a"'),
    ("""
plugins: [{type: queue-scorer}, {name: a, type: metrics-data-source}, {name: b, type: metrics-data-source}]
""", 'plugins[2] (name "b"): data source not used: the data layer reads one, "a"'),
    ("""
plugins: [{type: queue-scorer}, {type: metrics-data-source}, {name: x, type: core-metrics-extractor}]
dataLayer:
  sources: [{pluginRef: metrics-data-source}]
""", 'plugins[2] (name "x"): metrics extractor not used'),
    ("""
plugins: [{type: queue-scorer}, {type: metrics-data-source}]
dataLayer:
  sources: [{pluginRef: metrics-data-source, extractors: [{pluginRef: metrics-data-source}]}]
""", 'dataLayer.sources[0].extractors[0].pluginRef "metrics-data-source": plugin type '
     '"metrics-data-source" is a data source, not a metrics extractor'),
    ("""
plugins: [{type: queue-scorer}]
dataLayer: {sources: []}
""", "dataLayer.sources: at least one data source is required"),
    ("""
plugins: [{type: queue-scorer}, {type: metrics-data-source}]
dataLayer: {sources: [{pluginRef: metrics-data-source, extractor: [{pluginRef: x}]}]}
""", 'dataLayer.sources[0]: unknown key "extractor"; allowed: pluginRef, extractors'),
    ("""
plugins: [{type: queue-scorer}]
parser: {pluginRef: queue-scorer}
""", 'parser.pluginRef "queue-scorer": plugin type "queue-scorer" is a scorer, not a parser'),
    ("""
plugins: [{type: queue-scorer}, {type: core-metrics-extractor, parameters: {defaultEngine: tgi}}]
""", "plugins[1].parameters: defaultEngine 'tgi' has no metrics mapping"),
    ("""
plugins:
- {type: queue-scorer}
- type: core-metrics-extractor
  parameters: {engineConfigs: [{name: vllm, queuedRequestsSpec: "a{b"}]}
""", "plugins[1].parameters: engineConfigs[vllm].queuedRequestsSpec: bad metric spec"),
]


@pytest.mark.parametrize(("body", "message"), ERRORS, ids=[m[:50] for _, m in ERRORS])
def test_what_the_data_layer_would_ignore_is_an_error(body: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(body + PROFILE)
    assert message in str(info.value)


def test_the_bundle_exposes_the_configured_source_extractor_and_parser() -> None:
    cfg = load("""
plugins:
- {type: queue-scorer}
- {name: src, type: metrics-data-source, parameters: {path: /custom-metrics}}
- {name: ext, type: core-metrics-extractor, parameters: {defaultEngine: sglang}}
- {name: my-parser, type: openai-parser}
dataLayer: {sources: [{pluginRef: src, extractors: [{pluginRef: ext}]}]}
parser: {pluginRef: my-parser}
""" + PROFILE)
    bundle = build_scheduling(cfg, PluginContext(Datastore()))
    assert bundle.data_source is bundle.plugins["src"]
    assert bundle.data_source.metrics_url(Endpoint("p", "10.0.0.1", 8000, metrics_port=9000)) == \
        "http://10.0.0.1:9000/custom-metrics"
    assert bundle.metrics_extractor is bundle.plugins["ext"]
    assert bundle.metrics_extractor.default_engine == "sglang"
    assert bundle.parser is bundle.plugins["my-parser"]


# ---------------------------------------------------------------- what `epp serve` does with them
class Pod:
    """A model server's metrics endpoint: serves PAGE on one path, 404 elsewhere."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.paths: list[str] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        if request.path != self.path:
            return web.Response(status=404)
        return web.Response(text=PAGE, content_type="text/plain")

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=tls).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., object]]:
    """``await serve(config, pod)``: a picker (plaintext, ephemeral ports) whose pool is
    ``pod``; everything started is stopped at the end."""
    started: list[PickerServer | Pod] = []

    async def start(config: str, pod: Pod, tls: ssl.SSLContext | None = None) -> PickerServer:
        await pod.start(tls)
        started.append(pod)
        server = PickerServer(ServeOptions(
            discovery=StaticDiscovery.from_endpoints_flag(f"127.0.0.1:{pod.port}"),
            grpc_port=0, grpc_health_port=0, metrics_port=-1, bind_address="127.0.0.1",
            secure_serving=False, config_text=HEAD + config, refresh_metrics_interval=0.02,
        ))
        await server.start()
        started.append(server)
        return server

    yield start
    for part in reversed(started):
        await part.stop()


def only_endpoint(server: PickerServer) -> Endpoint:
    (ep,) = server.datastore.endpoints()
    return ep


async def test_serve_fetches_the_configured_path(serve) -> None:  # type: ignore[no-untyped-def]
    pod = Pod("/custom-metrics")
    server = await serve("""
plugins: [{type: queue-scorer}, {type: metrics-data-source, parameters: {path: /custom-metrics}}]
dataLayer: {sources: [{pluginRef: metrics-data-source}]}
""" + PROFILE, pod)
    ep = only_endpoint(server)
    await eventually(lambda: ep.metrics.updated_at > 0, timeout=WAIT, what="a successful scrape")
    assert (ep.metrics.waiting_queue_size, ep.metrics.running_requests_size) == (1, 2)
    assert set(pod.paths) == {"/custom-metrics"}


@pytest.mark.parametrize(("extractor", "queue"), [
    ("{type: core-metrics-extractor}", 1),
    ("""
  type: core-metrics-extractor
  parameters:
    engineConfigs:
    - name: vllm
      queuedRequestsSpec: my_waiting
      runningRequestsSpec: vllm:num_requests_running
      kvUsageSpec: vllm:kv_cache_usage_perc""", 7),
    ("{type: core-metrics-extractor, parameters: {defaultEngine: sglang}}", 5),
], ids=["built-in vllm", "engineConfigs", "defaultEngine"])
async def test_serve_reads_what_the_configured_extractor_says(serve, extractor: str, queue: int) -> None:  # type: ignore[no-untyped-def]
    pod = Pod("/metrics")
    server = await serve(f"""
plugins:
- {{type: queue-scorer}}
- {{type: metrics-data-source}}
- {extractor.strip()}
""" + PROFILE, pod)
    ep = only_endpoint(server)
    await eventually(lambda: ep.metrics.updated_at > 0, timeout=WAIT, what="a successful scrape")
    assert ep.metrics.waiting_queue_size == queue


@pytest.mark.parametrize("skip_verify", [True, False])
async def test_serve_verifies_tls_as_the_source_says(serve, tmp_path: Path, skip_verify: bool) -> None:  # type: ignore[no-untyped-def]
    cert, key = self_signed(("127.0.0.1",))
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    pod = Pod("/metrics")
    server = await serve(f"""
plugins:
- {{type: queue-scorer}}
- {{type: metrics-data-source, parameters: {{scheme: https, insecureSkipVerify: {str(skip_verify).lower()}}}}}
""" + PROFILE, pod, tls)
    ep = only_endpoint(server)

    def errors() -> float:
        return server.metrics.registry.get_sample_value(
            "epp_metrics_scrape_errors_total", {"endpoint": ep.key}) or 0.0

    if skip_verify:
        await eventually(lambda: ep.metrics.updated_at > 0, timeout=WAIT, what="a successful scrape")
        assert ep.metrics.waiting_queue_size == 1
    else:  # the self-signed certificate is refused: scrapes fail, the page is never read
        await eventually(lambda: errors() >= 2, timeout=WAIT, what="two failed scrapes")
        assert ep.metrics.updated_at == 0
        assert pod.paths == []  # refused during the handshake, before any request


async def test_serve_hands_the_configured_parser_to_the_director(serve) -> None:  # type: ignore[no-untyped-def]
    server = await serve("""
plugins: [{type: queue-scorer}, {name: my-parser, type: openai-parser}]
parser: {pluginRef: my-parser}
""" + PROFILE, Pod("/metrics"))
    assert server.director is not None
    assert server.director.parser.name == "my-parser"
