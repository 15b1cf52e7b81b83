"""The picker's own request path, in process, without gRPC: ``python -m benchmarks.request_path``.

Drives ``ExtProcServicer.Process`` with real Envoy protobuf messages, the way Envoy does for
one request, against the default configuration (queue, KV-cache and prefix scorers, the
usage recorder) over 4 endpoints, and reports the thread CPU per request for:

* ``auto, JSON``: request headers, the whole body (BUFFERED), response headers, the JSON body
  the picker asks for (usage);
* ``auto, stream``: the same without a response body (a stream that needs nothing);
* ``full, JSON``: FULL_DUPLEX both ways (GIE's setting).

each with the Prometheus metrics on (``epp serve``) and off, which is the cost of the
per-request series (GIE's nine histogram observations, counters, gauges). The gRPC machinery
(~300 µs per stream + ~70 µs per message on this machine) comes on top; see
``benchmarks/overhead``. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import AsyncIterator

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.config import build_scheduling, load_config
from epp.datalayer.datastore import Datastore
from epp.framework.datalayer import Endpoint
from epp.framework.plugin import PluginContext
from epp.handlers.extproc import ExtProcServicer
from epp.metrics import EppMetrics
from epp.requestcontrol.director import Director
from epp.requestcontrol.usage import UsageRecorder

M = processing_mode_pb2.ProcessingMode
HEADERS = [("host", "x"), (":method", "POST"), (":path", "/v1/completions"), ("content-type", "application/json"),
           ("user-agent", "aiohttp"), ("x-request-id", "abc"), (":scheme", "http"), (":authority", "x")]
BODY = orjson.dumps({"model": "sim-model", "prompt": "The city council asks: " + "word " * 40, "max_tokens": 1})
ANSWER = (b'{"id":"cmpl-1","object":"text_completion","model":"sim-model","choices":[{"index":0,"text":" ok",'
          b'"finish_reason":"length"}],"usage":{"prompt_tokens":50,"completion_tokens":1,"total_tokens":51,'
          b'"prompt_tokens_details":{"cached_tokens":0}}}')


def _hmap(pairs: list[tuple[str, str]]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs])


def messages(case: str) -> list[pb.ProcessingRequest]:
    full = case.startswith("full")
    req_mode, resp_mode = (M.FULL_DUPLEX_STREAMED, M.FULL_DUPLEX_STREAMED) if full else (M.BUFFERED, M.NONE)
    ctype = "text/event-stream" if case.endswith("stream") else "application/json"
    out = [pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=_hmap(HEADERS)),
                                protocol_config=pb.ProtocolConfiguration(request_body_mode=req_mode,
                                                                         response_body_mode=resp_mode))]
    out.append(pb.ProcessingRequest(request_body=pb.HttpBody(body=BODY, end_of_stream=not full)))
    if full:
        out.append(pb.ProcessingRequest(request_body=pb.HttpBody(body=b"", end_of_stream=True)))
    rh = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=_hmap([(":status", "200"),
                                                                             ("content-type", ctype)])))
    rh.metadata_context.filter_metadata["envoy.lb"].fields["x-gateway-destination-endpoint-served"].string_value = \
        "10.0.0.1:8000"
    out.append(rh)
    if ctype == "application/json":
        out.append(pb.ProcessingRequest(response_body=pb.HttpBody(body=ANSWER, end_of_stream=not full)))
        if full:
            out.append(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"", end_of_stream=True)))
    return out


def servicer(with_metrics: bool) -> ExtProcServicer:
    ds = Datastore()
    eps = [Endpoint(f"p{i}", f"10.0.0.{i + 1}", 8000) for i in range(4)]
    for e in eps:
        e.metrics.updated_at = time.monotonic() + 1e9  # fresh for the whole run
    ds.replace_endpoints(eps)
    metrics = EppMetrics() if with_metrics else None
    b = build_scheduling(load_config(None), PluginContext(ds, metrics))
    d = Director(datastore=ds, scheduler=b.scheduler, metrics=metrics, pre_request=tuple(b.pre_request),
                 response_complete=tuple(b.response_complete), parser=b.parser,
                 usage=UsageRecorder(metrics, lambda: "pool", 100) if metrics is not None else None)
    return ExtProcServicer(d)


async def per_request(sv: ExtProcServicer, msgs: list[pb.ProcessingRequest], n: int) -> float:
    async def one() -> None:
        async def it() -> AsyncIterator[pb.ProcessingRequest]:
            for m in msgs:
                yield m

        async for _ in sv.Process(it(), None):  # type: ignore[arg-type]
            pass

    for _ in range(200):
        await one()
    t = time.thread_time()
    for _ in range(n):
        await one()
    return (time.thread_time() - t) / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    import uvloop

    print("| case | metrics on µs/request | metrics off µs/request | of it: metrics |")
    print("|---|---|---|---|")
    for case in ("auto, JSON", "auto, stream", "full, JSON"):
        msgs = messages(case.replace(", ", "-").replace(" ", ""))
        on = statistics.median(uvloop.run(per_request(servicer(True), msgs, args.requests)) for _ in range(args.repeat))
        off = statistics.median(uvloop.run(per_request(servicer(False), msgs, args.requests))
                                for _ in range(args.repeat))
        print(f"| {case} | {on * 1e6:.0f} | {off * 1e6:.0f} | {(on - off) * 1e6:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
