"""Per-request cost of OpenTelemetry tracing in the director: ``python -m benchmarks.tracing``.

Times one request's picker-side work in process — ``new_context`` → ``route`` (parse,
admission, the default scheduler over 8 endpoints, pre-request hooks) → ``response_headers``
→ ``complete`` — with tracing

* ``off``: no tracer (what ``epp serve`` does without OTEL_* variables; opentelemetry is not
  imported);
* ``on, sampled``: an SDK TracerProvider with a BatchSpanProcessor and an exporter that drops
  the batches (what is paid on the request path; exporting happens on the SDK's thread), the
  request carrying a sampled ``traceparent``;
* ``on, gateway did not sample``: the same provider, the gateway's ``traceparent`` says not
  sampled (parent-based sampling drops the request);
* ``on, ratio sampler said no``: no ``traceparent``, a ``parentbased_traceidratio`` sampler
  with ratio 0 (the sampler is asked for every request and drops it);
* ``baseline`` (``--baseline REV``): the director of git revision REV (before tracing existed),
  loaded from ``git show``, to show what "off" costs against no tracing code at all.

Modes are interleaved in rounds and the median round is reported, so a busy shared machine
disturbs them alike. Prints µs per request. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from epp.config import build_scheduling, load_config
from epp.datalayer.datastore import Datastore
from epp.framework.datalayer import Endpoint
from epp.framework.plugin import PluginContext
from epp.requestcontrol.director import Director

ROOT = Path(__file__).resolve().parents[1]
SAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
NOT_SAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


def _datastore(endpoints: int) -> Datastore:
    ds = Datastore()
    eps = [Endpoint(f"pod-{i}", f"10.0.0.{i + 1}", 8000) for i in range(endpoints)]
    now = time.monotonic()
    for i, e in enumerate(eps):
        e.metrics.waiting_queue_size = i % 3
        e.metrics.kv_cache_usage = 0.05 * i
        e.metrics.updated_at = now
    ds.replace_endpoints(eps)
    return ds


def _director(director_cls: Any, endpoints: int, tracer: Any = None) -> Any:
    ds = _datastore(endpoints)
    bundle = build_scheduling(load_config(None), PluginContext(ds, None))
    kw: dict[str, Any] = {"tracer": tracer} if tracer is not None else {}
    return director_cls(datastore=ds, scheduler=bundle.scheduler, pre_request=tuple(bundle.pre_request), **kw)


def _baseline_director(rev: str) -> Any:
    """``Director`` as it was at ``rev`` (a module loaded from ``git show``)."""
    src = subprocess.run(["git", "show", f"{rev}:epp/requestcontrol/director.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("benchmarks._baseline_director", loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    exec(compile(src, f"{rev}:epp/requestcontrol/director.py", "exec"), mod.__dict__)
    return mod.Director


async def _one_round(d: Any, headers: dict[str, str], bodies: Sequence[bytes]) -> float:
    t = time.perf_counter()
    for body in bodies:
        ctx = d.new_context(dict(headers))
        await d.route(ctx, body)
        d.response_headers(ctx, {":status": "200"}, None)
        d.complete(ctx)
    return (time.perf_counter() - t) / len(bodies) * 1e6


def _tracer(ratio: float | None = None) -> tuple[Any, Callable[[], None]]:
    """A tracer whose exporter drops the batches; ``ratio``: parent-based trace-id ratio sampler."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    from epp.requestcontrol.tracing import RequestTracer

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider(sampler=None if ratio is None else ParentBasedTraceIdRatio(ratio))
    provider.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=65536))
    return RequestTracer(provider), provider.shutdown


async def main(args: argparse.Namespace) -> None:
    bodies = [orjson.dumps({"model": "m", "max_tokens": 16, "messages": [
        {"role": "system", "content": f"system prompt {i % 16}: " * 40},
        {"role": "user", "content": f"question {i}"}]}) for i in range(args.requests)]
    base_headers = {":path": "/v1/chat/completions", ":method": "POST", "content-type": "application/json"}
    tracer, shutdown = _tracer()
    ratio0, shutdown0 = _tracer(ratio=0.0)
    modes: dict[str, tuple[Any, dict[str, str]]] = {
        "off": (_director(Director, args.endpoints), base_headers),
        "on, sampled": (_director(Director, args.endpoints, tracer), {**base_headers, "traceparent": SAMPLED}),
        "on, gateway did not sample": (_director(Director, args.endpoints, tracer),
                                       {**base_headers, "traceparent": NOT_SAMPLED}),
        "on, ratio sampler said no": (_director(Director, args.endpoints, ratio0), base_headers),
    }
    if args.baseline:
        modes[f"baseline ({args.baseline})"] = (_director(_baseline_director(args.baseline), args.endpoints),
                                                base_headers)
    for d, h in modes.values():  # warm the prefix index and the caches
        await _one_round(d, h, bodies)
    results: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode, (d, h) in modes.items():
            results[mode].append(await _one_round(d, h, bodies))
    shutdown()
    shutdown0()
    off = statistics.median(results["off"])
    print(f"{args.endpoints} endpoints, {args.requests} requests x {args.rounds} rounds (median round)")
    print(f"{'mode':<28} {'µs/request':>11} {'vs off':>9}")
    for mode, vals in results.items():
        med = statistics.median(vals)
        print(f"{mode:<28} {med:>11.1f} {med - off:>+8.1f}")


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoints", type=int, default=8)
    p.add_argument("--requests", type=int, default=2000, help="requests per round and mode")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--baseline", default="", help="git revision whose director has no tracing code")
    asyncio.run(main(p.parse_args()))


if __name__ == "__main__":
    cli()
