"""The KEDA external scaler (``externalscaler.ExternalScaler``), served by the picker.

The picker sees demand before anything else does: requests it queues (flow control), holds
for a pool scaled to zero, or has in flight. Serving KEDA's external scaler API from it
turns that into scaling decisions without a Prometheus hop:

* ``IsActive``: demand (queued + in flight) > ``activationThreshold`` (metadata, default 0).
* ``StreamIsActive`` (trigger ``external-push``): sends the state on open, then every change
  as it happens: the first request held by an empty pool is pushed within one event-loop turn
  (well under 100 ms), so KEDA scales 0 → 1 without waiting for its polling interval. The
  state is re-sent every ``keepalive`` seconds so a stalled stream is noticed.
* ``GetMetricSpec`` / ``GetMetrics``: one metric, the pool's demand, with the target per
  replica from the trigger metadata ``targetRequestsPerReplica`` (default 10): HPA then runs
  ceil(demand / target) replicas.

Trigger metadata keys (all optional): ``pool`` (must name this picker's pool; a mismatch is
NOT_FOUND so a wrong scalerAddress fails loudly), ``model`` (demand for one model only, with
model placement on: ``queued`` = requests held for its load, ``inflight`` = the others between
arrival and response end; a model the pool does not know is NOT_FOUND), ``metric`` (``demand``
= queued + in flight, ``queued``, ``inflight``), ``targetRequestsPerReplica``,
``activationThreshold``. A pool dedicated to one base model scales on its model's demand and
goes to zero when nobody asks for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from epp.flowcontrol import keda_proto
from epp.framework.requestcontrol import Demand, ModelDemand

log = logging.getLogger(__name__)

DEFAULT_TARGET = 10.0
METRICS = ("demand", "queued", "inflight")


class _BadMetadata(ValueError):
    pass


class KedaScaler:
    """Implements the servicer methods; ``server()`` wraps it in a gRPC aio server."""

    def __init__(self, demand: Demand, pool_name: Callable[[], str], keepalive: float = 10.0,
                 models: ModelDemand | None = None) -> None:
        self.demand = demand
        self.pool_name = pool_name
        self.keepalive = keepalive
        #: per-model demand (model placement); None: metadata ``model`` is refused
        self.models = models
        self.pb2, self.pb2_grpc = keda_proto.load()
        self._streams: set[asyncio.Event] = set()
        demand.add_activity_listener(self._changed)
        if models is not None:
            models.add_activity_listener(self._changed)

    def _changed(self) -> None:
        for ev in self._streams:
            ev.set()

    # ---- metadata
    def _meta(self, ref: Any) -> tuple[str, float, float, str | None]:
        md = dict(ref.scalerMetadata)
        pool = md.get("pool") or md.get("inferencePool")
        if pool and pool != self.pool_name():
            raise LookupError(f"this endpoint picker serves pool {self.pool_name()!r}, not {pool!r}")
        model = md.get("model") or None
        if model is not None:
            if self.models is None:
                raise _BadMetadata("metadata model needs model placement (epp serve --model-placement)")
            if self.models.model_demand(model) is None:
                raise LookupError(f"pool {self.pool_name()!r} does not know model {model!r}")
        metric = md.get("metric", "demand")
        if metric not in METRICS:
            raise _BadMetadata(f"metadata metric {metric!r}: expected one of {', '.join(METRICS)}")
        try:
            target = float(md.get("targetRequestsPerReplica", DEFAULT_TARGET))
            activation = float(md.get("activationThreshold", 0))
        except ValueError as exc:
            raise _BadMetadata(f"metadata: {exc}") from None
        if not target > 0:
            raise _BadMetadata("metadata targetRequestsPerReplica must be > 0")
        return metric, target, activation, model

    def value(self, metric: str = "demand", model: str | None = None) -> int:
        if model is not None and self.models is not None:
            queued, total = self.models.model_demand(model) or (0, 0)
            inflight = total - queued
        else:
            queued, inflight = self.demand.queued, self.demand.inflight
        if metric == "queued":
            return queued
        if metric == "inflight":
            return inflight
        return queued + inflight

    def active(self, activation: float = 0.0, model: str | None = None) -> bool:
        return self.value("demand", model) > activation

    def metric_name(self, metric: str, model: str | None = None) -> str:
        return f"epp-{metric}-{self.pool_name()}" + (f"-{model}" if model else "")

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        code = grpc.StatusCode.NOT_FOUND if isinstance(exc, LookupError) else grpc.StatusCode.INVALID_ARGUMENT
        await context.abort(code, str(exc))

    # ---- RPCs
    async def IsActive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _, _, activation, model = self._meta(request)
        except (LookupError, _BadMetadata) as exc:
            await self._abort(context, exc)
        return self.pb2.IsActiveResponse(result=self.active(activation, model))

    async def StreamIsActive(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            _, _, activation, model = self._meta(request)
        except (LookupError, _BadMetadata) as exc:
            await self._abort(context, exc)
        ev = asyncio.Event()
        self._streams.add(ev)
        try:
            last = self.active(activation, model)
            yield self.pb2.IsActiveResponse(result=last)
            while True:
                timed_out = False
                try:
                    async with asyncio.timeout(self.keepalive):
                        await ev.wait()
                except TimeoutError:
                    timed_out = True
                ev.clear()
                now = self.active(activation, model)
                if now != last or timed_out:
                    last = now
                    yield self.pb2.IsActiveResponse(result=now)
        finally:
            self._streams.discard(ev)

    async def GetMetricSpec(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            metric, target, _, model = self._meta(request)
        except (LookupError, _BadMetadata) as exc:
            await self._abort(context, exc)
        spec = self.pb2.MetricSpec(metricName=self.metric_name(metric, model), targetSize=max(1, round(target)),
                                   targetSizeFloat=target)
        return self.pb2.GetMetricSpecResponse(metricSpecs=[spec])

    async def GetMetrics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            metric, _, _, model = self._meta(request.scaledObjectRef)
        except (LookupError, _BadMetadata) as exc:
            await self._abort(context, exc)
        v = self.value(metric, model)
        name = request.metricName or self.metric_name(metric, model)
        return self.pb2.GetMetricsResponse(
            metricValues=[self.pb2.MetricValue(metricName=name, metricValue=v, metricValueFloat=float(v))]
        )

    # ---- server
    def add_to_server(self, server: grpc.aio.Server) -> None:
        # grpc.aio dispatches on the handler kind (coroutine / async generator function), so
        # the servicer's methods must be real ``async def``s, not wrappers.
        scaler = self

        class Servicer(self.pb2_grpc.ExternalScalerServicer):  # type: ignore[name-defined]
            async def IsActive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await scaler.IsActive(request, context)

            async def StreamIsActive(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for msg in scaler.StreamIsActive(request, context):
                    yield msg

            async def GetMetricSpec(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await scaler.GetMetricSpec(request, context)

            async def GetMetrics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await scaler.GetMetrics(request, context)

        self.pb2_grpc.add_ExternalScalerServicer_to_server(Servicer(), server)


async def start_scaler_server(scaler: KedaScaler, address: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Start a plaintext gRPC server for the scaler (KEDA connects in-cluster; put TLS in a
    mesh or use KEDA's ``enableTLS`` with a sidecar if required). Returns (server, port)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    scaler.add_to_server(server)
    try:
        bound = server.add_insecure_port(f"{address}:{port}")
    except RuntimeError:
        await server.stop(None)  # release the never-started server before reporting the clash
        raise
    await server.start()
    return server, bound
