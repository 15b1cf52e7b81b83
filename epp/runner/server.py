"""Wiring of ``epp serve``: build every part from options, start, stop.

Start order matters: metrics → config and plugins (fail fast on a bad config) → discovery's
first full sync → metric scraping → gRPC servers. Readiness (gRPC health on 9003) turns
SERVING only after discovery synced, so Envoy's health check keeps traffic away from a
picker that does not know its pool yet. On stop: readiness NOT_SERVING first, then the
picker keeps serving until it is drained (``epp.runner.drain``), then queued requests get 503,
the servers stop and background tasks stop. ``stop()`` alone (tests, start-up failures) skips
the drain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

import epp
from epp.config.loader import build_scheduling, load_config
from epp.datalayer.datastore import Datastore
from epp.datalayer.pool_metrics import PoolMetricsRefresher
from epp.datalayer.scraper import MetricsScraper
from epp.discovery.base import Discovery
from epp.flowcontrol.hold import HoldingAdmission
from epp.flowcontrol.keda import KedaScaler, start_scaler_server
from epp.framework.plugin import Lifecycle, Plugin, PluginContext
from epp.handlers.extproc import ExtProcServicer
from epp.metrics import EppMetrics
from epp.placement import DemandWithHeld, ModelPlacement, PlacementConfig
from epp.requestcontrol.director import Director
from epp.requestcontrol.tenants import TenantSource
from epp.requestcontrol.tracing import RequestTracer
from epp.requestcontrol.usage import UsageRecorder
from epp.runner import tls
from epp.runner.admission import build_admission
from epp.runner.drain import CountingExtProc, Drain, StreamTracker
from epp.runner.metrics_http import start_metrics_server
from epp.runner.placement import build_placement
from epp.runner.runtime_metrics import register_runtime_metrics
from epp.runner.tenants import tier_names
from epp.runner.workers import report_started

if TYPE_CHECKING:
    from epp.discovery.leader import LeaderElector

log = logging.getLogger(__name__)


EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
READINESS_SERVICES = ("readiness", EXT_PROC_SERVICE, "", "inference-extension")


@dataclass(slots=True)
class ServeOptions:
    """Everything ``epp serve`` is configured with (flags map 1:1, see ``epp.runner.cli``)."""

    discovery: Discovery
    grpc_port: int = 9002
    grpc_health_port: int = 9003
    metrics_port: int = 9090
    bind_address: str = "0.0.0.0"
    secure_serving: bool = True
    cert_path: str | None = None
    config_text: str | None = None
    refresh_metrics_interval: float = 0.05
    refresh_prometheus_metrics_interval: float = 5.0
    metrics_staleness_threshold: float = 2.0
    metrics_scrape_timeout: float = 1.0
    disable_endpoint_subset_filter: bool = False
    max_request_body_bytes: int = 10 * 1024 * 1024
    #: which response bodies to ask Envoy for (``--response-processing``: auto | full | none)
    response_processing: str = "auto"
    #: one of several ``--workers``: bind the gRPC ports with SO_REUSEPORT
    reuse_port: bool = False
    #: where /metrics listens when not ``bind_address`` (a worker: 127.0.0.1 for its supervisor)
    metrics_bind_address: str | None = None
    #: SIGTERM: keep answering new and running streams (readiness NOT_SERVING) until idle or
    #: this many seconds (``--shutdown-grace``); streams shorter than it are never cut
    shutdown_grace: float = 120.0
    #: the drain ends early once no stream is open and none started for this long
    shutdown_idle: float = 2.0
    #: after the drain (or in a plain ``stop()``), how long streams still open may finish
    grace_period: float = 2.0
    seed: int | None = None
    #: hold requests this long while the pool has no endpoint (scale from zero); 0 = fail fast
    empty_pool_wait: float = 120.0
    #: KEDA external scaler gRPC port; None = the default 9004, skipped with a warning if busy
    #: KEDA external scaler port; off (-1) unless asked for (several pickers share hosts)
    keda_scaler_port: int = -1
    #: active-passive HA (``--ha-enable-leader-election``): ready only while leader
    leader_election: LeaderElector | None = None
    #: /metrics callers must pass a TokenReview + SubjectAccessReview (``--metrics-endpoint-auth``)
    metrics_endpoint_auth: bool = False
    #: GIE conformance test hooks (``--enable-conformance-hooks``)
    conformance_hooks: bool = False
    #: an OpenTelemetry SDK TracerProvider (``epp.runner.tracing``); None = tracing off
    tracer_provider: Any = None
    #: model placement (``--model-placement``; None: off) and this replica's peer URL
    placement: PlacementConfig | None = None
    placement_self: str | None = None
    #: where tenants and tiers come from (``--tenant-*``; default: the client's fairness header)
    tenants: TenantSource = field(default_factory=TenantSource)
    #: tenants with their own usage label values before the rest fold into "other"
    usage_max_tenants: int = 100


@dataclass(slots=True)
class PickerServer:
    #: bound on the teardown after the gRPC server stopped (parts stop concurrently)
    TEARDOWN_TIMEOUT: ClassVar[float] = 5.0
    options: ServeOptions
    metrics: EppMetrics = field(default_factory=EppMetrics)
    datastore: Datastore = field(default_factory=Datastore)
    director: Director | None = None
    bound_ports: dict[str, int] = field(default_factory=dict)
    _grpc: grpc.aio.Server | None = None
    _servicer: ExtProcServicer | None = None
    _health: Any = None
    _http: Any = None
    _scraper: MetricsScraper | None = None
    _pool_metrics: PoolMetricsRefresher | None = None
    _plugins: dict[str, Plugin] = field(default_factory=dict)
    _readiness_task: asyncio.Task[None] | None = None
    _ready: bool = False
    _admission: Any = None  # epp.runner.admission.AdmissionSetup
    _keda_server: grpc.aio.Server | None = None
    _placement: ModelPlacement | None = None
    #: open ext_proc streams (what the drain waits for)
    streams: StreamTracker = field(default_factory=StreamTracker)
    _drain: Drain | None = None
    _started: bool = False
    _leader_stopped: bool = False

    async def start(self) -> None:
        opts = self.options
        self.metrics.info.labels(commit="", build_ref=epp.__version__).set(1)
        register_runtime_metrics(self.metrics.registry, asyncio.get_running_loop(), self.streams)
        cfg = load_config(opts.config_text)
        ctx = PluginContext(
            datastore=self.datastore, metrics=self.metrics, staleness_threshold=opts.metrics_staleness_threshold
        )
        bundle = build_scheduling(cfg, ctx)
        self._plugins = dict(bundle.plugins)
        self._admission = build_admission(cfg, bundle, ctx, self.datastore, self.metrics, opts.empty_pool_wait)
        self._placement = build_placement(opts.placement, opts.placement_self, opts.bind_address,
                                          self.datastore, self.metrics, opts.leader_election)
        self.director = Director(
            datastore=self.datastore,
            scheduler=bundle.scheduler,
            metrics=self.metrics,
            pre_request=tuple(bundle.pre_request),
            prepare_request=tuple(bundle.prepare_request),
            response_complete=tuple(bundle.response_complete),
            admission=self._admission.admission,
            parser=bundle.parser,
            max_body_bytes=opts.max_request_body_bytes,
            response_processing=opts.response_processing,
            disable_subset_filter=opts.disable_endpoint_subset_filter,
            staleness=opts.metrics_staleness_threshold,
            rng=random.Random(opts.seed),
            conformance_hooks=opts.conformance_hooks,
            tracer=RequestTracer(opts.tracer_provider) if opts.tracer_provider is not None else None,
            placement=self._placement,
            tenants=dataclasses.replace(opts.tenants, tiers=tier_names(self._plugins.values())),
            usage=UsageRecorder(self.metrics, lambda: self.datastore.pool.name, opts.usage_max_tenants),
        )

        # One gRPC server for both ports: a second grpc.aio server in the process costs ~10 %
        # of ext_proc throughput (measured, benchmarks/overhead). Health is served first,
        # NOT_SERVING until discovery synced, so probes get an answer during the sync.
        self._health = health_aio.HealthServicer()
        await self._health.set("liveness", health_pb2.HealthCheckResponse.SERVING)
        for svc in READINESS_SERVICES:
            await self._health.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._grpc = grpc.aio.server(
            options=[("grpc.so_reuseport", 1 if opts.reuse_port else 0),
                     ("grpc.max_receive_message_length", 16 * 1024 * 1024)]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        self.bound_ports["health"] = self._grpc.add_insecure_port(f"{opts.bind_address}:{opts.grpc_health_port}")
        # The ext_proc service is registered now but answers only once started below.
        self._servicer = ExtProcServicer(self.director, require_tls=opts.secure_serving)
        pb_grpc.add_ExternalProcessorServicer_to_server(CountingExtProc(self._servicer, self.streams), self._grpc)
        addr = f"{opts.bind_address}:{opts.grpc_port}"
        if opts.secure_serving:
            if opts.cert_path:
                cert, key = tls.load_cert_dir(opts.cert_path)
            else:
                cert, key = tls.self_signed()
            creds = grpc.ssl_server_credentials([(key, cert)])
            self.bound_ports["grpc"] = self._grpc.add_secure_port(addr, creds)
        else:
            self.bound_ports["grpc"] = self._grpc.add_insecure_port(addr)
        await self._grpc.start()

        if opts.leader_election is not None:  # campaign while syncing: a standby stays warm
            await opts.leader_election.start()

        if opts.metrics_port >= 0:
            auth = None
            if opts.metrics_endpoint_auth:
                from epp.runner.auth import load_metrics_auth

                auth = await asyncio.to_thread(load_metrics_auth)
            self._http, _ = start_metrics_server(self.metrics.registry, opts.metrics_port,
                                                 opts.metrics_bind_address or opts.bind_address, auth)
            self.bound_ports["metrics"] = self._http.server_port

        await opts.discovery.start(self.datastore)
        # Plugins with background work (e.g. KV-event subscribers) start once the pool is known.
        for plugin in self._plugins.values():
            if isinstance(plugin, Lifecycle):
                await plugin.start()
        # the configured dataLayer source and extractor decide URL, TLS and metric mappings
        self._scraper = MetricsScraper(
            self.datastore,
            source=bundle.data_source,
            extractor=bundle.metrics_extractor,
            interval=opts.refresh_metrics_interval,
            timeout=opts.metrics_scrape_timeout,
            metrics=self.metrics,
        )
        await self._scraper.start()
        self._pool_metrics = PoolMetricsRefresher(
            self.datastore,
            self.metrics,
            interval=opts.refresh_prometheus_metrics_interval,
            staleness=opts.metrics_staleness_threshold,
        )
        await self._pool_metrics.start()
        if self._placement is not None:
            await self._placement.start()
        if self._admission.controller is not None:
            await self._admission.controller.start()
        await self._start_keda()

        await self.set_ready(self._should_be_ready())
        self._readiness_task = asyncio.get_running_loop().create_task(self._follow_readiness())
        self._started = True
        report_started(self.bound_ports)  # a --workers worker tells its supervisor its ports
        log.info(
            "picker started",
            extra={
                "ports": self.bound_ports,
                "discovery": opts.discovery.description,
                "endpoints": len(self.datastore.endpoints()),
                "tls": opts.secure_serving,
            },
        )

    def _should_be_ready(self) -> bool:
        """Synced (a deleted InferencePool un-syncs) and, with leader election, the leader."""
        le = self.options.leader_election
        return self.datastore.synced and (le is None or le.is_leader)

    async def _start_keda(self) -> None:
        """Demand gauges (for KEDA's prometheus trigger) and the KEDA external scaler."""
        demand = self._admission.demand
        if self._placement is not None:  # requests held for a load are pool demand too
            demand = DemandWithHeld(demand, self._placement)
        pool = self.datastore.pool.name
        self.metrics.fc_demand.labels(pool, "queued").set_function(lambda: demand.queued)
        self.metrics.fc_demand.labels(pool, "inflight").set_function(lambda: demand.inflight)
        opts = self.options
        port = opts.keda_scaler_port
        if port < 0:
            return
        try:
            scaler = KedaScaler(demand, lambda: self.datastore.pool.name, models=self._placement)
            self._keda_server, self.bound_ports["keda"] = await start_scaler_server(scaler, opts.bind_address, port)
        except (RuntimeError, OSError) as exc:
            raise OSError(f"--keda-scaler-port {port}: {exc}") from None

    async def _follow_readiness(self) -> None:
        """Readiness tracks ``_should_be_ready`` (sync state and leadership)."""
        while True:
            await asyncio.sleep(0.5)
            ready = self._should_be_ready()
            if ready != self._ready:
                await self.set_ready(ready)
                le = self.options.leader_election
                log.info("readiness changed", extra={
                    "ready": ready, "synced": self.datastore.synced,
                    "leader": None if le is None else le.is_leader})

    async def set_ready(self, ready: bool) -> None:
        self._ready = ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for svc in READINESS_SERVICES:
            await self._health.set(svc, status)

    async def drain(self) -> str:
        """SIGTERM: readiness NOT_SERVING (and the Lease released), then keep answering new and
        running streams until idle, ``shutdown_grace`` or ``cut_drain()``; returns which ended
        it. Call ``stop()`` afterwards. A picker that never finished starting has nothing to
        drain."""
        opts = self.options
        await self._not_ready()
        if not self._started or self._grpc is None:
            return "not started"
        drain = self._drain = self._drain or Drain(opts.shutdown_grace, opts.shutdown_idle)
        log.info("draining: readiness NOT_SERVING, %d ext_proc streams open; serving until idle for "
                 "%.1fs or %.0fs have passed (a second signal stops at once)", self.streams.open,
                 opts.shutdown_idle, opts.shutdown_grace, extra={"open_streams": self.streams.open})
        if opts.leader_election is not None:  # a standby takes over while we drain
            self._leader_stopped = True
            await self._bounded("leader election", opts.leader_election.stop(), self.TEARDOWN_TIMEOUT)
        why = await drain.wait(self.streams)
        log.info("drain ended (%s): %d streams open, %d served since start", why, self.streams.open,
                 self.streams.started, extra={"open_streams": self.streams.open,
                                              "streams_served": self.streams.started, "reason": why})
        return why

    def cut_drain(self) -> None:
        """End a drain now (a second SIGTERM/SIGINT)."""
        if self._drain is None:
            self._drain = Drain(self.options.shutdown_grace, self.options.shutdown_idle)
        self._drain.cut.set()

    async def _not_ready(self) -> None:
        if self._readiness_task is not None:
            self._readiness_task.cancel()
            self._readiness_task = None
        if self._health is not None:
            await self.set_ready(False)

    async def stop(self) -> None:
        """Readiness off, queued requests 503, the servers stop (streams still open get
        ``grace_period``), then every other part. Bounded: a part that does not stop in time is
        logged and left behind, so SIGTERM always ends the process within the pod's grace
        period instead of waiting for SIGKILL."""
        await self._not_ready()
        opts = self.options
        if opts.leader_election is not None and not self._leader_stopped:  # release the Lease
            self._leader_stopped = True
            await self._bounded("leader election", opts.leader_election.stop(), self.TEARDOWN_TIMEOUT)
        # Queued / held requests are answered (503 JSON) while their streams are still up.
        admission = self._admission
        if admission is not None and admission.controller is not None:
            await self._bounded("flow control", admission.controller.stop(), self.TEARDOWN_TIMEOUT)
        elif admission is not None and isinstance(admission.admission, HoldingAdmission):
            admission.admission.close()
        if self._grpc is not None:
            await self._bounded("gRPC server", self._grpc.stop(opts.grace_period),
                                opts.grace_period + self.TEARDOWN_TIMEOUT)
        steps: list[tuple[str, Any]] = []
        if self._keda_server is not None:
            steps.append(("KEDA scaler", self._keda_server.stop(0)))
        steps.append(("discovery", opts.discovery.stop()))
        if self._scraper is not None:
            steps.append(("metrics scraper", self._scraper.stop()))
        if self._placement is not None:
            steps.append(("model placement", self._placement.close()))
        if self._pool_metrics is not None:
            steps.append(("pool metrics", self._pool_metrics.stop()))
        if self._http is not None:
            steps.append(("metrics HTTP server", asyncio.to_thread(self._http.shutdown)))
        if self.options.tracer_provider is not None:  # export the spans still batched
            steps.append(("tracing", asyncio.to_thread(self.options.tracer_provider.shutdown)))
        for plugin in reversed(self._plugins.values()):
            if isinstance(plugin, Lifecycle):
                steps.append((f"plugin {plugin.name}", plugin.close()))
        await asyncio.gather(*(self._bounded(what, coro, self.TEARDOWN_TIMEOUT) for what, coro in steps))
        if self._http is not None:
            self._http.server_close()

    @staticmethod
    async def _bounded(what: str, coro: Any, limit: float) -> None:
        try:
            async with asyncio.timeout(limit):
                await coro
        except TimeoutError:
            log.warning("shutdown step timed out; continuing", extra={"step": what})
        except Exception:
            log.exception("shutdown step failed; continuing", extra={"step": what})
