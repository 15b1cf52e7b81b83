"""The director: everything between "the request body is complete" and "here is the pick".

Order (GIE §1.2): parse the body → resolve the target model (rewrite) → resolve the
priority (objective) → locate candidates (subset hint) → admission (legacy shedding, or
flow control which may wait) → schedule → pre-request hooks → body re-serialised only if it
changed. The response side restores the client's model name, reads ``usage``, and on the
end of the response (or a stream reset) releases the picker-side in-flight count.

``complete`` releases exactly what the request took and nothing else: the context records
each acquisition (admission, endpoint in-flight, running gauge) as it happens, so a request
rejected before admission (400, 429, 503) or one whose stream breaks half-way never gives
back what it did not take (no negative gauges, no freed slots it never held).

The handler (``epp.handlers``) owns the protocol; this module never sees a protobuf.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from epp.datalayer.datastore import Datastore
from epp.flowcontrol.legacy import LegacyAdmission
from epp.framework import errors
from epp.framework.datalayer import Endpoint
from epp.framework.errors import RequestError
from epp.framework.requestcontrol import (
    Admission,
    Parser,
    Placement,
    PrepareRequest,
    PreRequest,
    ResponseComplete,
    ResponseInfo,
)
from epp.framework.scheduling import LLMRequest, SchedulingError, SchedulingResult
from epp.metrics import EppMetrics, ModelSeries, ModelSeriesCache
from epp.plugins.requestcontrol.openai_parser import OpenAIParser
from epp.requestcontrol import conformance
from epp.requestcontrol.candidates import subset_candidates
from epp.requestcontrol.modellabels import OTHER, ModelLabels
from epp.requestcontrol.objectives import resolve_priority
from epp.requestcontrol.response import BodyRewriter
from epp.requestcontrol.rewrite import resolve_target_model
from epp.requestcontrol.splice import replace_model
from epp.requestcontrol.tenants import Tenant, TenantSource
from epp.requestcontrol.tracing import RequestTrace, RequestTracer
from epp.requestcontrol.usage import UsageRecorder

# Request headers GIE defines (inputs the gateway or client sets).
OBJECTIVE_HEADER = "x-gateway-inference-objective"
REWRITE_HEADER = "x-gateway-model-name-rewrite"
SUBSET_HEADER = "x-gateway-destination-endpoint-subset"
DESTINATION_HEADER = "x-gateway-destination-endpoint"
SERVED_HEADER = "x-gateway-destination-endpoint-served"
REQUEST_ID_HEADER = "x-request-id"


class SchedulerLike(Protocol):
    def schedule(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> SchedulingResult: ...


@dataclass(slots=True)
class RoutingDecision:
    """What the handler tells the gateway for one request."""

    destination: str  # "ip:port" or an ordered fallback list "ip:port,ip:port"
    body: bytes | bytearray | None  # body to forward (None for header-only requests)
    body_mutated: bool = False
    set_headers: dict[str, str] = field(default_factory=dict)
    remove_headers: tuple[str, ...] = ()


@dataclass(slots=True)
class RequestContext:
    """One HTTP request's state across its ext_proc stream."""

    request_id: str
    headers: dict[str, str]
    path: str = "/"
    method: str = "POST"
    received_at: float = 0.0
    subset_hint: Any = None
    request: LLMRequest | None = None
    endpoint: Endpoint | None = None  # primary pick, counted in endpoint.inflight
    inflight_tokens: int = 0
    destination: str = ""
    response: ResponseInfo = field(default_factory=ResponseInfo)
    rewriter: BodyRewriter | None = None
    completed: bool = False
    series: ModelSeries | None = None  # metric children for this request's (model, target)
    admitted: bool = False  # admission.admit returned: admission.release is owed
    running: bool = False  # counted in the running-requests gauge
    placed: bool = False  # placement.ensure returned: placement.release is owed
    trace: RequestTrace | None = None  # OpenTelemetry spans (tracing on only)
    claims: Any = None  # the gateway-verified claims (dynamic metadata), when configured
    tenant: Tenant | None = None  # resolved with the body (epp.requestcontrol.tenants)
    queue_seconds: float = 0.0  # time spent waiting in admission


def estimate_prompt_tokens(prefix_text_len: int) -> int:
    """Rough token count (4 bytes per token, GIE's approximation) until a tokenizer is wired."""
    return max(1, prefix_text_len // 4)


@dataclass(slots=True)
class Director:
    datastore: Datastore
    scheduler: SchedulerLike
    metrics: EppMetrics | None = None
    pre_request: Sequence[PreRequest] = ()
    #: awaited before admission (e.g. the precise prefix scorer's tokenization)
    prepare_request: Sequence[PrepareRequest] = ()
    response_complete: Sequence[ResponseComplete] = ()
    admission: Admission = field(default_factory=lambda: LegacyAdmission(None))
    #: the configured ``parser`` plugin (GIE's openai-parser by default)
    parser: Parser = field(default_factory=lambda: OpenAIParser("openai-parser"))
    max_body_bytes: int = 10 * 1024 * 1024
    disable_subset_filter: bool = False
    #: endpoints whose metrics are older than this are treated as saturated (never chosen
    #: while a fresh endpoint exists); ``--metrics-staleness-threshold``
    staleness: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    #: model placement (``--model-placement``): the model loaded somewhere before admission
    placement: Placement | None = None
    #: GIE conformance hooks (``--enable-conformance-hooks``): see ``requestcontrol.conformance``
    conformance_hooks: bool = False
    #: OpenTelemetry spans per request; None (tracing off) costs one attribute check
    tracer: RequestTracer | None = None
    #: where a request's tenant and tier come from (``--tenant-*``; default: the client header)
    tenants: TenantSource = field(default_factory=TenantSource)
    #: per-tenant usage series (``epp usage``); None without metrics
    usage: UsageRecorder | None = None
    #: which response bodies the picker asks Envoy for when Envoy sends none by default
    #: (``--response-processing``; see ``wants_response_body``)
    response_processing: str = "auto"
    _series: ModelSeriesCache | None = None
    _served: dict[tuple[str, bool], Any] = field(default_factory=dict)
    _labels: ModelLabels | None = None

    def __post_init__(self) -> None:
        if self.metrics is not None:
            self._series = ModelSeriesCache(self.metrics)
        self._labels = ModelLabels(self.datastore)

    # ---------------------------------------------------------------- request
    def new_context(self, headers: dict[str, str], subset_hint: Any = None, claims: Any = None) -> RequestContext:
        rid = headers.get(REQUEST_ID_HEADER) or str(uuid.uuid4())
        ctx = RequestContext(
            request_id=rid,
            headers=headers,
            path=headers.get(":path", "/"),
            method=headers.get(":method", "POST"),
            received_at=time.monotonic(),
            subset_hint=subset_hint,
            claims=claims,
        )
        if self.tracer is not None:
            ctx.trace = self.tracer.start(headers)
        return ctx

    def _candidates(self, ctx: RequestContext) -> Sequence[Endpoint]:
        """Pool (or subset-hint) endpoints, preferring those with fresh metrics.

        A pod whose metrics went stale (scrapes failing: overloaded, partitioned, dying) is
        treated as saturated: it gets no traffic while any fresh endpoint exists. When none is
        fresh (just started, metrics port blocked) all are kept: fail open, not closed.
        """
        if ctx.subset_hint is not None and not self.disable_subset_filter:
            found: Sequence[Endpoint] = subset_candidates(self.datastore, ctx.subset_hint)
            if not found:
                raise errors.unavailable("failed to find endpoint candidates for the subset hint")
        else:
            found = self.datastore.endpoints()
        now = time.monotonic()
        staleness = self.staleness
        fresh = [e for e in found if e.is_fresh(now, staleness)]
        if ctx.placed and self.placement is not None and ctx.request is not None:  # pods holding the model
            return self.placement.candidates(ctx.request, fresh if fresh else found)
        return fresh if fresh else found

    def route_headers_only(self, ctx: RequestContext) -> RoutingDecision:
        """A request with no body (GET /v1/models, ...): any ready endpoint will do."""
        trace = ctx.trace
        start = time.time_ns() if trace is not None else 0
        try:
            if self.conformance_hooks and conformance.SELECTION_HEADER in ctx.headers:
                targets = conformance.selected(self.datastore, ctx.headers[conformance.SELECTION_HEADER]).targets
                ep = targets[0]
                destination = ",".join(e.key for e in targets)
            else:
                candidates = self._candidates(ctx)
                if not candidates:
                    raise errors.unavailable("no ready endpoints in the inference pool")
                ep = candidates[self.rng.randrange(len(candidates))]
                destination = ep.key
        except RequestError as exc:
            if trace is not None:
                trace.failed(exc)
            raise
        ctx.endpoint = ep
        ep.inflight += 1
        ctx.destination = destination
        decision = RoutingDecision(destination=destination, body=None, remove_headers=self.tenants.strip_headers)
        if trace is not None:
            trace.picked(start, destination, decision.set_headers, "headers-only")
        return decision

    async def route(self, ctx: RequestContext, raw: bytes | bytearray) -> RoutingDecision:
        """Choose the destination for a request whose whole body is ``raw``.

        Raises RequestError for anything the client should be told.
        """
        if ctx.trace is None:
            return await self._route(ctx, raw, None)
        try:
            return await self._route(ctx, raw, ctx.trace)
        except RequestError as exc:
            ctx.trace.failed(exc)
            raise

    async def _route(self, ctx: RequestContext, raw: bytes | bytearray, trace: RequestTrace | None) -> RoutingDecision:
        metrics = self.metrics
        try:
            parsed = self.parser.parse(raw, ctx.path)
        except RequestError:
            if metrics is not None:
                metrics.request_error_total.labels("", "", errors.BAD_REQUEST).inc()
            raise
        headers = ctx.headers
        target, rule = resolve_target_model(
            parsed.model, headers.get(REWRITE_HEADER), self.datastore.rewrites, self.rng
        )
        objective = headers.get(OBJECTIVE_HEADER)
        priority = resolve_priority(self.datastore, objective, parsed.model)
        tenant = ctx.tenant = self.tenants.resolve(headers, ctx.claims)
        req = LLMRequest(
            request_id=ctx.request_id,
            target_model=target,
            incoming_model=parsed.model,
            api=parsed.api,
            body=parsed.body,
            headers=headers,
            prefix_text=parsed.prefix_text,
            stream=parsed.stream,
            max_tokens=parsed.max_tokens,
            estimated_prompt_tokens=estimate_prompt_tokens(len(parsed.prefix_text)),
            priority=priority,
            fairness_id=tenant.fairness_id,
            objective=objective,
            cache_salt=parsed.cache_salt,
        )
        ctx.request = req
        if trace is not None:
            trace.started(req)
        series = None
        if self._series is not None:
            labels = self._labels
            assert labels is not None
            model_label = labels.label(parsed.model)
            target_label = model_label if target == parsed.model else labels.label(target)
            req.model_label, req.target_label = model_label, target_label
            series = ctx.series = self._series.get(model_label, target_label)
            series.requests(priority).inc()
            series.request_sizes.observe(len(raw))
            if metrics is not None and rule is not None:
                metrics.model_rewrite_decisions.labels(rule.source, model_label, target_label).inc()
        for prep in self.prepare_request:
            await prep.prepare_request(req)
        selection = headers.get(conformance.SELECTION_HEADER) if self.conformance_hooks else None
        try:
            if self.placement is not None:
                await self.placement.ensure(req)  # may hold the request while its model loads
                ctx.placed = True
            admit_at = time.monotonic()
            if trace is None:
                candidates = await self.admission.admit(req, lambda: self._candidates(ctx))
            else:
                candidates = await trace.admit(self.admission, req, lambda: self._candidates(ctx))
            ctx.queue_seconds = time.monotonic() - admit_at
            ctx.admitted = True
            try:
                if selection is not None:
                    result = conformance.selected(self.datastore, selection)
                elif trace is None:
                    result = self.scheduler.schedule(req, candidates)
                else:
                    result = trace.schedule(self.scheduler, req, candidates)
            except SchedulingError as exc:
                raise errors.shed(f"failed to schedule the request: {exc}") from None
        except RequestError as exc:
            if series is not None:
                series.errors(exc.code).inc()
            if self.usage is not None and (exc.status == 429 or exc.status == 503):
                self.usage.rejected(tenant.tenant, tenant.tier)
            raise
        picked_at = time.time_ns() if trace is not None else 0
        if selection is None:  # the test header's pick skips the plugins that learn from a pick
            for plugin in self.pre_request:
                plugin.pre_request(req, result)
        targets = result.targets
        primary = targets[0]
        ctx.endpoint = primary
        if ctx.placed and self.placement is not None:
            self.placement.routed(req, primary)
        ctx.inflight_tokens = req.estimated_prompt_tokens + (req.max_tokens or 0)
        primary.inflight += 1
        primary.inflight_tokens += ctx.inflight_tokens
        primary.last_picked = time.monotonic()
        ctx.destination = primary.key if len(targets) == 1 else ",".join(e.key for e in targets)
        if series is not None:
            series.running.inc()
            ctx.running = True
        ctx.rewriter = BodyRewriter(ctx.response, target, parsed.model)
        if target != parsed.model:
            decision = RoutingDecision(
                ctx.destination, _rewritten(parsed.body, raw, target), True, result.headers,
                tuple(result.remove_headers),
            )
        else:
            decision = RoutingDecision(ctx.destination, raw, False, result.headers, tuple(result.remove_headers))
        strip = self.tenants.strip_headers  # an untrusted client fairness header
        if strip:
            decision.remove_headers = (*decision.remove_headers, *strip)
        if trace is not None:
            decision.set_headers = dict(decision.set_headers)  # the trace context goes upstream too
            trace.picked(picked_at, ctx.destination, decision.set_headers,
                         "conformance-header" if selection is not None else "scheduler")
        return decision

    # --------------------------------------------------------------- response
    def response_headers(self, ctx: RequestContext, headers: Mapping[str, str], served: str | None) -> None:
        info = ctx.response
        try:
            info.status = int(headers.get(":status", "0"))
        except ValueError:
            info.status = 0
        info.streaming = "text/event-stream" in headers.get("content-type", "")
        info.served_endpoint = served
        if ctx.rewriter is None:
            ctx.rewriter = BodyRewriter(info)
        m = self.metrics
        if m is not None:
            if served:
                key = (served, ctx.destination.split(",", 1)[0] == served)
                child = self._served.get(key)
                if child is None:
                    child = self._served_child(m, key)
                child.inc()
            if (info.status >= 400 or info.status == 0) and ctx.series is not None:
                ctx.series.errors(errors.MODEL_SERVER_ERROR).inc()

    def wants_response_body(self, ctx: RequestContext) -> bool:
        """Whether this response's body must pass through the picker (asked for per response
        when Envoy sends no response body by default: ``epp envoy-config`` ``auto``).

        ``auto``: only when something needs it: a rewritten model name to restore, or the
        ``usage`` that token fair share, the per-tenant token series and GIE's token
        histograms read, which a JSON answer always carries (one body message, whatever its
        length) and a stream carries only when the client asked for it
        (``stream_options.include_usage``). A stream without either costs the picker the
        same whatever its length. ``full``: every successful response; ``none``: never.
        """
        mode = self.response_processing
        if mode == "none" or ctx.request is None:
            return False
        info = ctx.response
        if not 200 <= info.status < 300:
            return False  # an error answer carries no usage
        if mode == "full":
            return True
        rw = ctx.rewriter
        if rw is not None and rw.restores:
            return True
        if not info.streaming:
            return True
        options = ctx.request.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    def conformance_served(self, ctx: RequestContext) -> str | None:
        """``x-conformance-test-served-endpoint`` for this response (conformance hooks on)."""
        return conformance.served_endpoint(ctx.response.served_endpoint, ctx.destination)

    def _served_child(self, m: EppMetrics, key: tuple[str, bool]) -> Any:
        """The served-endpoint counter child; an address outside the pool (metadata is
        whatever the ext_proc peer sent) is counted as ``other``, so the label stays bounded."""
        if len(self._served) > 4096:  # endpoints churn in Kubernetes; keep it bounded
            for endpoint, matched in self._served:
                try:
                    m.served_endpoint_total.remove(endpoint, "true" if matched else "false")
                except KeyError:
                    pass
            self._served.clear()
        endpoint = key[0] if self.datastore.get(key[0]) is not None else OTHER
        child = m.served_endpoint_total.labels(endpoint, "true" if key[1] else "false")
        if endpoint == key[0]:
            self._served[key] = child
        return child

    def complete(self, ctx: RequestContext) -> None:
        """Response finished, the request was rejected, or the stream ended early (client
        gone, upstream reset, protocol violation). Idempotent; releases only what was taken."""
        if ctx.completed:
            return
        ctx.completed = True
        if ctx.trace is not None:
            ctx.trace.end(ctx.response)
        ep = ctx.endpoint
        if ep is not None:
            ep.inflight -= 1
            ep.inflight_tokens -= ctx.inflight_tokens
        req = ctx.request
        info = ctx.response
        if req is None:
            return
        if ctx.admitted:
            self.admission.release(req, info)
        if self.usage is not None and ep is not None and ctx.tenant is not None:
            self.usage.served(ctx.tenant.tenant, ctx.tenant.tier, info.prompt_tokens, info.cached_tokens,
                              info.completion_tokens, ctx.queue_seconds)
        if ctx.placed and self.placement is not None:
            self.placement.release(req, ep)
        s = ctx.series
        if 200 <= info.status < 300 and ep is not None and self._labels is not None:
            self._labels.observe_served(req.target_model)
        if s is not None and ctx.running:
            s.running.dec()
            elapsed = time.monotonic() - ctx.received_at
            s.duration.observe(elapsed)
            if ctx.rewriter is not None:
                s.response_sizes.observe(ctx.rewriter.size)
            if info.prompt_tokens is not None:
                s.input_tokens.observe(info.prompt_tokens)
            if info.completion_tokens:
                s.output_tokens.observe(info.completion_tokens)
                s.tpot.observe(elapsed / info.completion_tokens)
            if info.cached_tokens is not None:
                s.cached_tokens.observe(info.cached_tokens)
        if ep is not None:
            for plugin in self.response_complete:
                plugin.response_complete(req, info, ep)


def _rewritten(body: dict[str, Any], raw: bytes | bytearray, target: str) -> bytes:
    """The body with ``model`` = ``target``: re-encoded (fast), or, when orjson cannot encode
    it (nested deeper than 254), the client's bytes with only the model value spliced in."""
    try:
        body["model"] = target
        return orjson.dumps(body)
    except orjson.JSONEncodeError:
        spliced = replace_model(raw, target)
        if spliced is None:
            raise errors.bad_request("cannot rewrite the model of this request body") from None
        return spliced
