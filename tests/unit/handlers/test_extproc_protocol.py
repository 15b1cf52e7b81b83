"""Message order, trailers, rejections and body limits on one ext_proc stream (in-process).

Each test drives ``ExtProcServicer.Process`` with real Envoy protobuf messages and checks
what a gateway (the answers) and an operator (in-flight counts, gauges) would see.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.datalayer.datastore import Objective, RewriteRule, RewriteTarget
from epp.flowcontrol.legacy import LegacyAdmission
from epp.framework.datalayer import Endpoint
from epp.handlers.extproc import ProtocolError
from epp.requestcontrol.director import Director

from .test_extproc_stream import (
    CHAT,
    POST,
    Mode,
    _body,
    _dest_md,
    _director,
    _hdrs,
    _resp_body,
    _resp_headers,
    _run,
)


def _req_trailers() -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_trailers=pb.HttpTrailers())


def _resp_trailers() -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_trailers=pb.HttpTrailers())


def _gauges(d: Director) -> dict[str, float]:
    """Every in-flight count the picker keeps for the pool, summed."""
    assert d.metrics is not None
    running = [s.value for fam in d.metrics.running_requests.collect() for s in fam.samples]
    return {
        "inflight": sum(e.inflight for e in d.datastore.endpoints()),
        "inflight_tokens": sum(e.inflight_tokens for e in d.datastore.endpoints()),
        "running": sum(running),
        "running_min": min(running, default=0.0),
    }


IDLE = {"inflight": 0, "inflight_tokens": 0, "running": 0.0, "running_min": 0.0}
JSON_OK = {":status": "200", "content-type": "application/json"}
SSE_OK = {":status": "200", "content-type": "text/event-stream"}


# ---------------------------------------------------------------- one request per stream


@pytest.mark.parametrize(
    "sequence",
    [
        pytest.param([_hdrs(POST), _body(CHAT, True), _hdrs(POST), _body(CHAT, True)], id="second-request-headers"),
        pytest.param([_hdrs(POST), _body(CHAT, True), _body(CHAT, True)], id="body-after-end-of-stream"),
        pytest.param([_hdrs(POST), _body(CHAT, True), _resp_headers(JSON_OK), _resp_headers(JSON_OK)],
                     id="second-response-headers"),
        pytest.param([_hdrs(POST), _body(CHAT, True), _resp_body(b"{}", True)], id="response-body-before-headers"),
        pytest.param([_hdrs(POST), _body(CHAT, True), _resp_headers(JSON_OK, eos=True), _resp_trailers()],
                     id="trailers-after-end-of-response"),
        pytest.param([_body(CHAT, True)], id="body-before-headers"),
        pytest.param([_hdrs({":method": "GET", ":path": "/v1/models"}, eos=True), _body(b"x", True)],
                     id="body-after-headers-end-of-stream"),
        pytest.param([_hdrs(POST), _resp_headers(JSON_OK), _body(CHAT, True)], id="request-body-after-local-reply"),
    ],
)
async def test_out_of_order_message_ends_the_stream_and_releases_everything(
        sequence: list[pb.ProcessingRequest]) -> None:
    d = _director()
    with pytest.raises(ProtocolError):
        await _run(d, sequence)
    assert _gauges(d) == IDLE
    assert d.metrics is not None
    assert sum(s.value for f in d.metrics.extproc_protocol_errors.collect() for s in f.samples
               if s.name.endswith("_total")) == 1


async def test_twelve_double_requests_leave_the_pool_as_free_as_before() -> None:
    d = _director(1)
    for _ in range(12):
        with pytest.raises(ProtocolError):
            await _run(d, [_hdrs(POST), _body(CHAT, True), _hdrs(POST), _body(CHAT, True),
                           _resp_headers(JSON_OK)])
    assert _gauges(d) == IDLE
    out = await _run(d, [_hdrs(POST), _body(CHAT, True)])
    assert _dest_md(out[0]) == "10.0.0.1:8000"


# ---------------------------------------------------------------- rejected before admission


class _Saturated:
    def is_saturated(self, endpoints: Sequence[Endpoint]) -> bool:
        return True

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        return 2.0


@pytest.mark.parametrize(
    ("headers", "subset", "status"),
    [({"x-gateway-inference-objective": "batch"}, None, 429), ({}, "10.9.9.9", 503), ({}, [], 503)],
)
async def test_rejected_requests_never_drive_the_running_gauge_negative(
        headers: dict[str, str], subset: object, status: int) -> None:
    d = _director(admission=LegacyAdmission(_Saturated()))  # type: ignore[arg-type]
    d.datastore.objectives["batch"] = Objective("batch", -1)
    for _ in range(3):
        out = await _run(d, [_hdrs({**POST, **headers}, subset=subset), _body(CHAT, True)])
        assert out[0].immediate_response.status.code == status
    assert _gauges(d) == IDLE
    # ... and a normal request afterwards is counted as running while it runs.
    seen: list[dict[str, float]] = []

    async def it():  # type: ignore[no-untyped-def]
        yield _hdrs(POST)
        yield _body(CHAT, True)
        seen.append(_gauges(d))

    from epp.handlers.extproc import ExtProcServicer

    [r async for r in ExtProcServicer(d).Process(it(), None)]  # type: ignore[arg-type]
    assert seen[0]["running"] == 1 and seen[0]["inflight"] == 1
    assert _gauges(d) == IDLE


# ---------------------------------------------------------------- trailers end the body


async def test_full_duplex_request_trailers_route_and_forward_the_body() -> None:
    d = _director()
    out = await _run(d, [_hdrs(POST), _body(CHAT[:9], False), _body(CHAT[9:], False), _req_trailers()])
    # One answer: the pick and the whole body, replacing what Envoy holds (it then forwards
    # the body once and the trailers after it; the trailers need no answer of their own).
    assert [r.WhichOneof("response") for r in out] == ["request_headers"]
    assert _dest_md(out[0]).startswith("10.0.0.")
    common = out[0].request_headers.response
    assert common.status == pb.CommonResponse.CONTINUE_AND_REPLACE
    assert common.body_mutation.body == CHAT
    assert _gauges(d) == IDLE


async def test_buffered_request_body_without_end_of_stream_is_the_whole_body() -> None:
    d = _director()
    out = await _run(d, [_hdrs(POST, mode=Mode.BUFFERED), _body(CHAT, False), _req_trailers()])
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body", "request_trailers"]
    assert _dest_md(out[1]).startswith("10.0.0.")


async def test_full_duplex_response_trailers_flush_a_buffered_json_body() -> None:
    d = _director()
    d.datastore.rewrites = (RewriteRule("r", ("m",), (RewriteTarget("target", 1),)),)
    doc = orjson.dumps({"model": "target", "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    out = await _run(d, [_hdrs(POST), _body(CHAT, True), _resp_headers(JSON_OK), _resp_body(doc[:10], False),
                         _resp_body(doc[10:], False), _resp_trailers()])
    kinds = [r.WhichOneof("response") for r in out]
    assert kinds == ["request_headers", "request_body", "response_headers", "response_body", "response_trailers"]
    sb = out[3].response_body.response.body_mutation.streamed_response
    assert orjson.loads(sb.body)["model"] == "m" and not sb.end_of_stream
    assert _gauges(d) == IDLE


async def test_full_duplex_response_trailers_flush_a_partial_last_sse_line() -> None:
    d = _director()
    d.datastore.rewrites = (RewriteRule("r", ("m",), (RewriteTarget("target", 1),)),)
    ev = b'data: {"model":"target","choices":[]}\n\ndata: {"model":"target","usage":{"prompt_tokens":4}}'
    out = await _run(d, [_hdrs(POST), _body(CHAT, True), _resp_headers(SSE_OK), _resp_body(ev, False),
                         _resp_trailers()])
    passed = b"".join(r.response_body.response.body_mutation.streamed_response.body for r in out
                      if r.WhichOneof("response") == "response_body")
    assert passed == ev.replace(b'"model":"target"', b'"model":"m"')
    assert out[-1].WhichOneof("response") == "response_trailers"


async def test_buffered_response_with_trailers_is_answered_and_restored() -> None:
    d = _director()
    d.datastore.rewrites = (RewriteRule("r", ("m",), (RewriteTarget("target", 1),)),)
    doc = orjson.dumps({"model": "target"})
    out = await _run(d, [_hdrs(POST, mode=Mode.BUFFERED), _body(CHAT, True), _resp_headers(JSON_OK),
                         _resp_body(doc, False), _resp_trailers()])
    kinds = [r.WhichOneof("response") for r in out]
    assert kinds == ["request_headers", "request_body", "response_headers", "response_body", "response_trailers"]
    assert orjson.loads(out[3].response_body.response.body_mutation.body)["model"] == "m"


# ---------------------------------------------------------------- body limits and depth


async def test_oversized_body_gets_413_with_a_json_body_and_takes_nothing() -> None:
    d = _director(max_body_bytes=100)
    out = await _run(d, [_hdrs(POST), _body(b"x" * 80, False), _body(b"x" * 80, False), _body(b"", True)])
    assert len(out) == 1
    ir = out[0].immediate_response
    assert ir.status.code == 413
    err = orjson.loads(ir.body)["error"]
    assert err["code"] == 413 and "100 bytes" in err["message"]
    assert _gauges(d) == IDLE


def _deep(depth: int, where: str = "metadata") -> bytes:
    nested = b"[" * depth + b"]" * depth
    if where == "messages":
        return b'{"model":"m","messages":[{"role":"user","content":' + nested + b"}]}"
    return b'{"model":"m","messages":[{"role":"user","content":"hi"}],"' + where.encode() + b'":' + nested + b"}"


@pytest.mark.parametrize("depth", [254, 255, 600, 1020])
@pytest.mark.parametrize("where", ["metadata", "messages"])
@pytest.mark.parametrize("rewrite", [False, True])
async def test_deeply_nested_json_is_routed_never_a_500(depth: int, where: str, rewrite: bool) -> None:
    d = _director()
    if rewrite:
        d.datastore.rewrites = (RewriteRule("r", ("m",), (RewriteTarget("target", 1),)),)
    raw = _deep(depth, where)
    out = await _run(d, [_hdrs(POST), _body(raw, True)])
    assert out[0].WhichOneof("response") == "request_headers", out[0]
    forwarded = b"".join(r.request_body.response.body_mutation.streamed_response.body for r in out[1:])
    assert orjson.loads(forwarded)["model"] == ("target" if rewrite else "m")
    assert forwarded == (raw.replace(b'"model":"m"', b'"model":"target"') if rewrite else raw)


async def test_json_deeper_than_the_parser_allows_is_a_400() -> None:
    out = await _run(_director(), [_hdrs(POST), _body(_deep(1100), True)])
    assert out[0].immediate_response.status.code == 400
