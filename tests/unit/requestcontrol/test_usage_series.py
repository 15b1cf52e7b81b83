"""Per-tenant usage series: the names ``epp usage`` reads, right values, bounded cardinality."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from epp.datalayer.datastore import Datastore
from epp.flowcontrol.legacy import LegacyAdmission
from epp.framework.datalayer import Endpoint
from epp.framework.errors import RequestError
from epp.framework.scheduling import LLMRequest, ProfileRunResult, SchedulingResult
from epp.metrics import EppMetrics
from epp.requestcontrol.director import Director
from epp.requestcontrol.tenants import FAIRNESS_HEADER, TenantSource, TierNames
from epp.requestcontrol.usage import UsageRecorder
from epp.usage import series
from epp.usage.sources import read_picker_metrics


class _First:
    def schedule(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
        return SchedulingResult({"default": ProfileRunResult([candidates[0]])}, "default")


def _samples(m: EppMetrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in fam.samples:
            if s.name.startswith("epp_tenant_") and not s.name.endswith("_created"):
                out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def test_exported_names_and_labels_are_the_ones_epp_usage_reads() -> None:
    m = EppMetrics()
    rec = UsageRecorder(m, lambda: "pool")
    rec.served("acme", "gold", 10, 4, 3, 0.5)
    rec.rejected("acme", "gold")
    got = _samples(m)
    assert set(got) == {series.REQUESTS, series.TOKENS, series.QUEUE_SECONDS}
    assert {k for labels, _ in got[series.REQUESTS] for k in labels} == {"tenant", "tier", "outcome", "inference_pool"}
    assert {k for labels, _ in got[series.TOKENS] for k in labels} == {"tenant", "tier", "type", "inference_pool"}
    assert {lbl["type"] for lbl, _ in got[series.TOKENS]} == set(series.TOKEN_TYPES)


def _director(pool: list[Endpoint], tenants: TenantSource | None = None, max_tenants: int = 100) -> Director:
    ds = Datastore()
    ds.replace_endpoints(pool)
    m = EppMetrics()
    return Director(datastore=ds, scheduler=_First(), metrics=m, admission=LegacyAdmission(None),
                    tenants=tenants or TenantSource(),
                    usage=UsageRecorder(m, lambda: ds.pool.name, max_tenants))


async def _served(d: Director, tenant: str, usage: dict[str, object] | None) -> None:
    ctx = d.new_context({":path": "/v1/completions", FAIRNESS_HEADER: tenant})
    await d.route(ctx, orjson.dumps({"model": "m", "prompt": "hello"}))
    d.response_headers(ctx, {":status": "200", "content-type": "application/json"}, None)
    assert ctx.rewriter is not None
    ctx.rewriter.json_chunk(orjson.dumps({"model": "m", "choices": [], **({"usage": usage} if usage else {})}))
    ctx.rewriter.json_finish()
    d.complete(ctx)


async def test_served_requests_record_tokens_by_type_and_the_report_reads_them() -> None:
    d = _director([Endpoint("a", "10.0.0.1", 8000)],
                  TenantSource(tiers=TierNames.from_tiers([("gold", ["city-*"])])))
    usage = {"prompt_tokens": 100, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 60}}
    await _served(d, "city-berlin", usage)
    await _served(d, "city-berlin", usage)
    await _served(d, "dept-a", None)  # a response without usage (streamed without include_usage)
    assert d.metrics is not None
    text = generate_latest(d.metrics.registry).decode()
    rows = _rows(text)
    berlin = rows[("city-berlin", "gold")]
    assert (berlin.requests, berlin.rejected) == (2, 0)
    assert (berlin.prompt_tokens, berlin.cached_tokens, berlin.completion_tokens) == (80, 120, 14)
    dept = rows[("dept-a", "default")]
    assert (dept.requests, dept.tokens) == (1, 0)


def _rows(text: str) -> dict[tuple[str, str], series.TenantUsage]:
    """What `epp usage --metrics` computes from a /metrics page (its own parser)."""
    import http.server
    import threading

    body = text.encode()

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            return None

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        return read_picker_metrics(f"http://127.0.0.1:{srv.server_address[1]}/metrics")
    finally:
        srv.shutdown()
        srv.server_close()


async def test_capacity_rejections_are_counted_and_bad_requests_are_not() -> None:
    d = _director([])  # empty pool: legacy admission answers 503
    ctx = d.new_context({":path": "/v1/completions", FAIRNESS_HEADER: "acme"})
    with pytest.raises(RequestError) as ei:
        await d.route(ctx, orjson.dumps({"model": "m", "prompt": "x"}))
    assert ei.value.status == 503
    d.complete(ctx)
    bad = d.new_context({":path": "/v1/completions", FAIRNESS_HEADER: "acme"})
    with pytest.raises(RequestError):
        await d.route(bad, b"{not json")
    d.complete(bad)
    assert d.metrics is not None
    got = {(lbl["tenant"], lbl["outcome"]): v for lbl, v in _samples(d.metrics)[series.REQUESTS]}
    assert got == {("acme", "served"): 0, ("acme", "rejected"): 1}


async def test_queue_seconds_are_the_admission_wait_of_served_requests() -> None:
    import asyncio
    from collections.abc import Callable

    class SlowAdmission(LegacyAdmission):
        async def admit(self, request: LLMRequest,
                        candidates: Callable[[], Sequence[Endpoint]]) -> Sequence[Endpoint]:
            await asyncio.sleep(0.05)  # stands for a flow-control queue wait
            return await super().admit(request, candidates)

    d = _director([Endpoint("a", "10.0.0.1", 8000)])
    d.admission = SlowAdmission(None)
    await _served(d, "acme", None)
    assert d.metrics is not None
    (labels, waited), = _samples(d.metrics)[series.QUEUE_SECONDS]
    assert labels["tenant"] == "acme"
    assert waited >= 0.05


def test_ten_thousand_tenants_keep_the_series_bounded() -> None:
    m = EppMetrics()
    rec = UsageRecorder(m, lambda: "pool", max_tenants=100)
    for i in range(10_000):
        rec.served(f"tenant-{i}", "gold" if i % 2 else "basic", 10, 0, 1, 0.0)
    got = _samples(m)
    tenants = {lbl["tenant"] for lbl, _ in got[series.REQUESTS]}
    assert len(tenants) == 101 and series.OTHER_TENANT in tenants
    # 101 tenants x at most 2 tiers; per (tenant, tier): 2 outcomes, 3 token types, 1 queue
    assert sum(len(v) for v in got.values()) <= 101 * 2 * 6
    total = sum(v for lbl, v in got[series.REQUESTS] if lbl["outcome"] == "served")
    assert total == 10_000  # folded, never lost
    other = sum(v for lbl, v in got[series.REQUESTS] if lbl["tenant"] == series.OTHER_TENANT)
    assert other == 10_000 - 100
    # tiers from claims are bounded too
    for i in range(1000):
        rec.served("tenant-1", f"tier-{i}", 1, 0, 0, 0.0)
    assert len({lbl["tier"] for lbl, _ in _samples(m)[series.REQUESTS]}) <= 33


async def test_a_streamed_response_counts_its_tokens_when_it_carries_usage() -> None:
    """Streams report usage only with stream_options.include_usage: the last chunk has it."""
    d = _director([Endpoint("a", "10.0.0.1", 8000)])
    ctx = d.new_context({":path": "/v1/chat/completions", FAIRNESS_HEADER: "streamer"})
    await d.route(ctx, orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                     "stream": True, "stream_options": {"include_usage": True}}))
    d.response_headers(ctx, {":status": "200", "content-type": "text/event-stream"}, None)
    assert ctx.rewriter is not None
    ctx.rewriter.sse_chunk(b'data: {"model":"m","choices":[{"delta":{"content":"a"}}]}\n\n', False)
    ctx.rewriter.sse_chunk(b'data: {"model":"m","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,'
                           b'"prompt_tokens_details":{"cached_tokens":5}}}\n\ndata: [DONE]\n\n', True)
    d.complete(ctx)
    assert d.metrics is not None
    got = {lbl["type"]: v for lbl, v in _samples(d.metrics)[series.TOKENS] if lbl["tenant"] == "streamer"}
    assert got == {"prompt": 4, "cached": 5, "completion": 2}
