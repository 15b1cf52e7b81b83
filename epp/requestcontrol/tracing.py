"""OpenTelemetry spans for the request path (opt-in: see ``epp.runner.tracing``).

One ``epp.request`` span per HTTP request, from its ext_proc headers to the end of its
response, parented on the gateway's trace (``traceparent``/``tracestate`` of the request,
through the configured propagator), with children

* ``epp.admission`` — the admission call (legacy shedding, empty-pool holding or the flow
  controller), including any time the request waited;
* ``epp.queueing`` — only for a request that had to wait: from the moment admission first
  suspended it (queued, or held while the pool had no endpoint) until it was let through;
* ``epp.scheduling`` — the scheduling cycle (filters, scorers, picker);
* ``epp.pick`` — the chosen destination (``epp.destination``) and the hand-off to the gateway.

The upstream request gets the ``epp.request`` span's ``traceparent``, so a model server that
traces (vLLM's ``--otlp-traces-endpoint``) joins the same trace under the picker. A request
the sampler drops (parent-based by default: the gateway's decision) costs the extraction and
one sampling decision, and is then routed exactly as with tracing off.

Why this shape: zero cost when tracing is off. Nothing here imports opentelemetry at module
level; ``RequestTracer()`` does, and the runner builds one only when tracing is on. The
director then checks one attribute per request (``RequestContext.trace is None``) and takes
the plain path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from epp.framework.datalayer import Endpoint
from epp.framework.errors import RequestError
from epp.framework.requestcontrol import Admission, ResponseInfo
from epp.framework.scheduling import LLMRequest, SchedulingResult

INSTRUMENTATION_NAME = "epp"


class _SuspendWatch:
    """Awaits a coroutine and notes when it first suspended (``suspended_ns``; None if it
    returned without ever waiting). Forwards every value and exception unchanged, so the
    awaited coroutine behaves exactly as when awaited directly (cancellation included)."""

    __slots__ = ("_coro", "suspended_ns")

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._coro = coro
        self.suspended_ns: int | None = None

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value
        self.suspended_ns = time.time_ns()
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # CancelledError and friends go to the coroutine
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


@dataclass(slots=True)
class RequestTrace:
    """The spans of one request (``RequestContext.trace``)."""

    tracer: Any  # opentelemetry.trace.Tracer
    span: Any  # the epp.request span
    context: Any  # a Context holding ``span``: the parent of the children
    propagator: Any

    def _child(self, name: str, start_ns: int, end_ns: int | None = None,
               attributes: Mapping[str, Any] | None = None, error: BaseException | None = None) -> None:
        child = self.tracer.start_span(name, context=self.context, start_time=start_ns, attributes=attributes)
        if error is not None:
            _record_error(child, error)
        child.end(end_time=end_ns if end_ns is not None else time.time_ns())

    def started(self, request: LLMRequest) -> None:
        """What the request is, once its body is parsed."""
        attrs = {
            "epp.request_id": request.request_id,
            "gen_ai.request.model": request.incoming_model,
            "epp.target_model": request.target_model,
            "epp.priority": request.priority,
            "epp.fairness_id": request.fairness_id,
            "epp.api": request.api,
        }
        if request.objective:
            attrs["epp.objective"] = request.objective
        self.span.set_attributes(attrs)

    async def admit(self, admission: Admission, request: LLMRequest,
                    candidates: Callable[[], Sequence[Endpoint]]) -> Sequence[Endpoint]:
        start = time.time_ns()
        watch = _SuspendWatch(admission.admit(request, candidates))
        try:
            eps: Sequence[Endpoint] = await watch
        except BaseException as exc:
            self._finish_admission(start, watch.suspended_ns, exc)
            raise
        self._finish_admission(start, watch.suspended_ns, None, len(eps))
        return eps

    def _finish_admission(self, start: int, suspended: int | None, error: BaseException | None,
                          candidates: int = 0) -> None:
        end = time.time_ns()
        if suspended is not None:
            self._child("epp.queueing", suspended, end,
                        {"epp.queue.outcome": "dispatched" if error is None else _outcome(error)})
        attrs: dict[str, Any] = {"epp.admission.queued": suspended is not None}
        if error is None:
            attrs["epp.candidates"] = candidates
        self._child("epp.admission", start, end, attrs, error)

    def schedule(self, scheduler: Any, request: LLMRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
        start = time.time_ns()
        try:
            result: SchedulingResult = scheduler.schedule(request, candidates)
        except Exception as exc:
            self._child("epp.scheduling", start, None, {"epp.candidates": len(candidates)}, exc)
            raise
        self._child("epp.scheduling", start, None, {"epp.candidates": len(candidates)})
        return result

    def picked(self, start_ns: int, destination: str, set_headers: dict[str, str], how: str) -> None:
        """The pick went out: record it and hand the trace on to the model server."""
        self._child("epp.pick", start_ns, None, {"epp.destination": destination, "epp.pick.source": how})
        self.span.set_attribute("epp.destination", destination)
        self.propagator.inject(set_headers, context=self.context)

    def failed(self, exc: RequestError) -> None:
        """The client gets an error answer (400, 429, 503, ...) from the picker."""
        _record_error(self.span, exc)
        self.span.set_attribute("http.response.status_code", exc.status)

    def end(self, info: ResponseInfo) -> None:
        span = self.span
        attrs: dict[str, Any] = {}
        if info.status:
            attrs["http.response.status_code"] = info.status
        if info.served_endpoint:
            attrs["epp.served_endpoint"] = info.served_endpoint
        if info.prompt_tokens is not None:
            attrs["gen_ai.usage.input_tokens"] = info.prompt_tokens
        if info.completion_tokens is not None:
            attrs["gen_ai.usage.output_tokens"] = info.completion_tokens
        if attrs:
            span.set_attributes(attrs)
        if info.status >= 500:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, f"model server answered {info.status}"))
        span.end()


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, RequestError):
        return exc.code
    return type(exc).__name__


def _record_error(span: Any, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, str(exc)))
    span.set_attribute("error.type", _outcome(exc))


class RequestTracer:
    """Starts a ``RequestTrace`` per request. Built only when tracing is on: importing the
    OpenTelemetry API happens here, not when this module is imported."""

    __slots__ = ("_extract", "_kind", "_propagator", "_set_in_context", "_skip_unsampled", "_tracer")

    def __init__(self, tracer_provider: Any = None) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.sdk.trace.sampling import ParentBased

        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        import epp

        self._tracer = provider.get_tracer(INSTRUMENTATION_NAME, epp.__version__)
        self._propagator = propagate.get_global_textmap()
        self._extract = self._propagator.extract
        self._set_in_context = trace.set_span_in_context
        self._kind = trace.SpanKind.SERVER
        # With a parent-based sampler (every OTEL_TRACES_SAMPLER=parentbased_*, the default) and
        # W3C propagation only, a traceparent whose flags say "not sampled" decides the request:
        # it is dropped without extracting the context or asking the sampler (~1 µs, not ~50).
        self._skip_unsampled = (isinstance(getattr(provider, "sampler", None), ParentBased)
                                and set(self._propagator.fields) <= {"traceparent", "tracestate", "baggage"})

    def start(self, headers: Mapping[str, str], start_ns: int | None = None) -> RequestTrace | None:
        """The request span, a child of the trace the gateway sent in ``headers`` (if any).

        None when the sampler drops the request (the gateway did not sample it, or a ratio
        sampler said no): the request then takes the untraced path, and the gateway's own
        ``traceparent`` reaches the model server unchanged."""
        if self._skip_unsampled:
            tp = headers.get("traceparent")
            if tp is not None and len(tp) == 55 and tp[:3] == "00-" and tp[54] in "02468ace":  # sampled bit 0
                return None
        parent = self._extract(headers)
        attrs = {"http.request.method": headers.get(":method", ""), "url.path": headers.get(":path", "")}
        span = self._tracer.start_span("epp.request", context=parent, kind=self._kind,
                                       start_time=start_ns, attributes=attrs)
        if not span.is_recording():
            return None
        return RequestTrace(self._tracer, span, self._set_in_context(span), self._propagator)
