"""OpenTelemetry spans of the request path, recorded by the SDK's in-memory exporter.

What an operator sees in the trace backend: the picker's ``epp.request`` span inside the
gateway's trace (parent taken from the request's ``traceparent``), with admission, queueing
(only when the request waited), scheduling and the pick as children; errors marked; the
trace handed on to the model server. And when tracing is off, OpenTelemetry is not even
imported.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from epp.datalayer.datastore import Datastore
from epp.flowcontrol.hold import HoldingAdmission
from epp.flowcontrol.legacy import LegacyAdmission
from epp.framework.datalayer import Endpoint
from epp.framework.errors import RequestError
from epp.framework.scheduling import LLMRequest, ProfileRunResult, SchedulingError, SchedulingResult
from epp.requestcontrol.director import Director
from epp.requestcontrol.tracing import RequestTracer
from tests.waiting import eventually

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
GATEWAY_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{GATEWAY_SPAN}-01"
BODY = orjson.dumps({"model": "m", "prompt": "hello there", "max_tokens": 4})


class _First:
    def schedule(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
        return SchedulingResult({"default": ProfileRunResult([candidates[0]])}, "default")


class _Refuses:
    def schedule(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
        raise SchedulingError("every endpoint filtered out")


def _traced(admission: Any = None, scheduler: Any = None, endpoints: bool = True
            ) -> tuple[Director, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ds = Datastore()
    if endpoints:
        ds.replace_endpoints([Endpoint("a", "10.0.0.1", 8000), Endpoint("b", "10.0.0.2", 8000)])
    d = Director(datastore=ds, scheduler=scheduler or _First(), tracer=RequestTracer(provider),
                 admission=admission or LegacyAdmission(None))
    return d, exporter


def _headers(**extra: str) -> dict[str, str]:
    return {":path": "/v1/completions", ":method": "POST", "x-request-id": "req-1", **extra}


def _by_name(spans: Sequence[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans}


async def test_span_tree_joins_the_gateways_trace() -> None:
    d, exporter = _traced()
    ctx = d.new_context(_headers(traceparent=TRACEPARENT))
    decision = await d.route(ctx, BODY)
    d.response_headers(ctx, {":status": "200"}, "10.0.0.1:8000")
    assert [s.name for s in exporter.get_finished_spans()] == ["epp.admission", "epp.scheduling", "epp.pick"]
    d.complete(ctx)
    spans = _by_name(exporter.get_finished_spans())
    assert set(spans) == {"epp.request", "epp.admission", "epp.scheduling", "epp.pick"}  # nothing queued
    root = spans["epp.request"]
    assert root.context is not None and root.parent is not None
    assert format(root.context.trace_id, "032x") == TRACE_ID  # the gateway's trace ...
    assert format(root.parent.span_id, "016x") == GATEWAY_SPAN  # ... under the gateway's span
    assert root.kind == SpanKind.SERVER
    for name in ("epp.admission", "epp.scheduling", "epp.pick"):
        child = spans[name]
        assert child.parent is not None and child.parent.span_id == root.context.span_id, name
        assert child.context is not None and child.context.trace_id == root.context.trace_id
        assert root.start_time is not None and child.start_time is not None and root.end_time is not None
        assert child.end_time is not None
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time
    attrs = root.attributes or {}
    assert attrs["gen_ai.request.model"] == "m" and attrs["epp.request_id"] == "req-1"
    assert attrs["epp.destination"] == "10.0.0.1:8000" and attrs["http.response.status_code"] == 200
    assert (spans["epp.pick"].attributes or {})["epp.destination"] == "10.0.0.1:8000"
    # the model server continues the trace under the picker's request span
    upstream = decision.set_headers["traceparent"]
    assert upstream.split("-")[1] == TRACE_ID
    assert upstream.split("-")[2] == format(root.context.span_id, "016x")


async def test_without_traceparent_the_request_starts_a_trace() -> None:
    d, exporter = _traced()
    ctx = d.new_context(_headers())
    await d.route(ctx, BODY)
    d.complete(ctx)
    root = _by_name(exporter.get_finished_spans())["epp.request"]
    assert root.parent is None


async def test_a_gateway_that_did_not_sample_gets_no_spans() -> None:
    """Default sampler (parent-based): the gateway's decision wins."""
    d, exporter = _traced()
    ctx = d.new_context(_headers(traceparent=f"00-{TRACE_ID}-{GATEWAY_SPAN}-00"))
    decision = await d.route(ctx, BODY)
    d.complete(ctx)
    assert exporter.get_finished_spans() == ()
    assert ctx.trace is None  # routed as with tracing off ...
    assert "traceparent" not in decision.set_headers  # ... the gateway's header goes upstream as it came


async def test_a_request_that_waited_has_a_queueing_span() -> None:
    """Held while the pool had no endpoint (scale from zero), then let through."""
    hold = HoldingAdmission(None, Datastore(), empty_pool_wait=30.0)
    d, exporter = _traced(admission=hold, endpoints=False)
    d.datastore = hold.datastore
    ctx = d.new_context(_headers(traceparent=TRACEPARENT))
    routed = asyncio.ensure_future(d.route(ctx, BODY))
    await eventually(lambda: hold.queued == 1, what="the request held for the empty pool")
    hold.datastore.replace_endpoints([Endpoint("a", "10.0.0.1", 8000)])
    await asyncio.wait_for(routed, 5)
    d.complete(ctx)
    spans = _by_name(exporter.get_finished_spans())
    queueing, admission, root = spans["epp.queueing"], spans["epp.admission"], spans["epp.request"]
    assert root.context is not None and queueing.parent is not None
    assert queueing.parent.span_id == root.context.span_id
    assert admission.start_time is not None and queueing.start_time is not None
    assert admission.start_time <= queueing.start_time
    assert queueing.end_time == admission.end_time
    assert (admission.attributes or {})["epp.admission.queued"] is True
    assert (queueing.attributes or {})["epp.queue.outcome"] == "dispatched"


async def test_rejections_mark_the_spans_as_errors() -> None:
    d, exporter = _traced(scheduler=_Refuses())
    ctx = d.new_context(_headers(traceparent=TRACEPARENT))
    with pytest.raises(RequestError) as err:
        await d.route(ctx, BODY)
    d.complete(ctx)
    spans = _by_name(exporter.get_finished_spans())
    assert spans["epp.scheduling"].status.status_code == StatusCode.ERROR
    root = spans["epp.request"]
    assert root.status.status_code == StatusCode.ERROR
    assert (root.attributes or {})["http.response.status_code"] == err.value.status == 429
    assert "epp.pick" not in spans

    d2, exporter2 = _traced()
    ctx2 = d2.new_context(_headers(traceparent=TRACEPARENT))
    with pytest.raises(RequestError):
        await d2.route(ctx2, b"{not json")
    d2.complete(ctx2)
    (only,) = exporter2.get_finished_spans()  # rejected before admission: the request span alone
    assert only.name == "epp.request" and (only.attributes or {})["http.response.status_code"] == 400


def test_tracing_off_imports_no_opentelemetry() -> None:
    """``epp serve`` without the OTEL_* environment, a request routed and completed: not one
    opentelemetry module loaded. With it, the same script loads the SDK (the check can fail)."""
    script = textwrap.dedent("""
        import argparse, asyncio, sys
        import orjson
        import epp.cli
        from epp.runner import cli, server
        from epp.framework.datalayer import Endpoint
        from epp.requestcontrol.director import Director
        p = argparse.ArgumentParser(); cli.add_arguments(p)
        opts = cli.options_from_args(p.parse_args(["--endpoints", "10.0.0.1:8000"]))
        class First:
            def schedule(self, request, candidates):
                from epp.framework.scheduling import ProfileRunResult, SchedulingResult
                return SchedulingResult({"d": ProfileRunResult([candidates[0]])}, "d")
        async def main():
            await opts.discovery.start(server.Datastore())
            ds = server.Datastore(); ds.replace_endpoints([Endpoint("a", "10.0.0.1", 8000)])
            tracer = None
            if opts.tracer_provider is not None:
                from epp.requestcontrol.tracing import RequestTracer
                tracer = RequestTracer(opts.tracer_provider)
            d = Director(datastore=ds, scheduler=First(), tracer=tracer)
            ctx = d.new_context({":path": "/v1/completions"})
            await d.route(ctx, orjson.dumps({"model": "m", "prompt": "x"}))
            d.complete(ctx)
            await opts.discovery.stop()
        asyncio.run(main())
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry"))[:3])
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    off = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip() == "[]"
    on = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                        env={**env, "OTEL_TRACES_EXPORTER": "console"})
    assert on.returncode == 0, on.stderr
    assert "opentelemetry" in on.stdout
