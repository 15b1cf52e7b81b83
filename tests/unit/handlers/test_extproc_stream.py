"""The ext_proc state machine, driven in-process with real Envoy protobuf messages.

A deterministic scheduler (always the lowest-loaded endpoint by key) stands in for the
scoring plugins: what is under test here is the protocol, not the choice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.datalayer.datastore import Datastore, RewriteRule, RewriteTarget
from epp.framework.datalayer import Endpoint
from epp.framework.scheduling import LLMRequest, ProfileRunResult, SchedulingResult
from epp.handlers.extproc import ExtProcServicer
from epp.handlers.messages import BODY_CHUNK_LIMIT
from epp.metrics import EppMetrics
from epp.requestcontrol.director import Director

Mode = processing_mode_pb2.ProcessingMode


class FirstByKey:
    def __init__(self, n: int = 1) -> None:
        self.n = n

    def schedule(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
        ordered = sorted(candidates, key=lambda e: (e.inflight, e.key))[: self.n]
        return SchedulingResult({"default": ProfileRunResult(ordered)}, "default")


def _director(n_endpoints: int = 3, picks: int = 1, **kw: object) -> Director:
    ds = Datastore()
    ds.replace_endpoints(Endpoint(f"ep{i}", f"10.0.0.{i + 1}", 8000) for i in range(n_endpoints))
    return Director(datastore=ds, scheduler=FirstByKey(picks), metrics=EppMetrics(), **kw)  # type: ignore[arg-type]


def _hdrs(d: dict[str, str], eos: bool = False, mode: int = Mode.FULL_DUPLEX_STREAMED,
          subset: object = None) -> pb.ProcessingRequest:
    hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in d.items()])
    msg = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=hm, end_of_stream=eos),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=mode, response_body_mode=mode),
    )
    if subset is not None:
        st = msg.metadata_context.filter_metadata["envoy.lb.subset_hint"]
        if isinstance(subset, str):
            st.fields["x-gateway-destination-endpoint-subset"].string_value = subset
        else:
            st.fields["x-gateway-destination-endpoint-subset"].list_value.extend(subset)  # type: ignore[arg-type]
    return msg


def _body(data: bytes, eos: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=eos))


def _resp_headers(d: dict[str, str], served: str | None = None, eos: bool = False) -> pb.ProcessingRequest:
    hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in d.items()])
    msg = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=hm, end_of_stream=eos))
    if served:
        msg.metadata_context.filter_metadata["envoy.lb"].fields[
            "x-gateway-destination-endpoint-served"].string_value = served
    return msg


def _resp_body(data: bytes, eos: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=eos))


async def _run(director: Director, msgs: list[pb.ProcessingRequest]) -> list[pb.ProcessingResponse]:
    async def it() -> AsyncIterator[pb.ProcessingRequest]:
        for m in msgs:
            yield m

    servicer = ExtProcServicer(director)
    return [r async for r in servicer.Process(it(), None)]  # type: ignore[arg-type]


POST = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json",
        "x-request-id": "req-1"}
CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


def _set_headers(resp: pb.ProcessingResponse, which: str = "request_headers") -> dict[str, str]:
    common = getattr(resp, which).response
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


def _dest_md(resp: pb.ProcessingResponse) -> str:
    return resp.dynamic_metadata.fields["envoy.lb"].struct_value.fields["x-gateway-destination-endpoint"].string_value


async def test_full_duplex_defers_headers_answer_until_body_end_and_sends_pick_both_ways() -> None:
    out = await _run(_director(), [_hdrs(POST), _body(CHAT[:10], False), _body(CHAT[10:], False), _body(b"", True)])
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body"]
    hdr = _set_headers(out[0])
    assert hdr["x-gateway-destination-endpoint"] == "10.0.0.1:8000" == _dest_md(out[0])
    assert out[0].request_headers.response.clear_route_cache
    sb = out[1].request_body.response.body_mutation.streamed_response
    assert sb.end_of_stream and sb.body == CHAT


async def test_fallback_list_is_comma_joined_primary_first() -> None:
    out = await _run(_director(3, picks=2), [_hdrs(POST), _body(CHAT, True)])
    assert _dest_md(out[0]) == "10.0.0.1:8000,10.0.0.2:8000" == _set_headers(out[0])["x-gateway-destination-endpoint"]


async def test_large_body_reemitted_in_62000_byte_chunks() -> None:
    big = orjson.dumps({"model": "m", "prompt": "x" * 200_000})
    out = await _run(_director(), [_hdrs({**POST, ":path": "/v1/completions"}), _body(big, True)])
    chunks = [r.request_body.response.body_mutation.streamed_response for r in out[1:]]
    assert all(len(c.body) <= BODY_CHUNK_LIMIT for c in chunks)
    assert b"".join(c.body for c in chunks) == big
    assert [c.end_of_stream for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert len(chunks) == -(-len(big) // BODY_CHUNK_LIMIT)


async def test_buffered_mode_routes_on_body_response_and_fixes_content_length_on_rewrite() -> None:
    d = _director()
    d.datastore.rewrites = (RewriteRule("r", ("m",), (RewriteTarget("m-longer-name", 1),)),)
    out = await _run(d, [_hdrs(POST, mode=Mode.BUFFERED), _body(CHAT, True)])
    assert out[0].request_headers == pb.HeadersResponse()
    common = out[1].request_body.response
    new_body = common.body_mutation.body
    assert orjson.loads(new_body)["model"] == "m-longer-name"
    hdr = _set_headers(out[1], "request_body")
    assert hdr["content-length"] == str(len(new_body))
    assert hdr["x-gateway-destination-endpoint"] == _dest_md(out[1])


async def test_header_only_request_is_routed_at_once() -> None:
    out = await _run(_director(), [_hdrs({":method": "GET", ":path": "/v1/models"}, eos=True)])
    assert len(out) == 1 and _dest_md(out[0]).startswith("10.0.0.")


@pytest.mark.parametrize(
    ("body", "status"), [(b"{oops", 400), (b'{"prompt":"no model"}', 400)]
)
async def test_bad_body_gets_json_immediate_response_and_late_chunks_are_ignored(body: bytes, status: int) -> None:
    out = await _run(_director(), [_hdrs(POST), _body(body, True), _body(b"late", False), _resp_body(b"x", True)])
    assert len(out) == 1
    ir = out[0].immediate_response
    assert ir.status.code == status
    assert orjson.loads(ir.body)["error"]["code"] == status
    assert any(h.header.key == "content-type" for h in ir.headers.set_headers)


async def test_oversized_body_is_rejected() -> None:
    out = await _run(_director(max_body_bytes=100), [_hdrs(POST), _body(b"x" * 80, False), _body(b"x" * 80, False)])
    assert out[0].immediate_response.status.code == 413
    assert b"exceeds the limit" in out[0].immediate_response.body


async def test_empty_pool_is_503() -> None:
    out = await _run(_director(0), [_hdrs(POST), _body(CHAT, True)])
    assert out[0].immediate_response.status.code == 503


async def test_subset_hint_restricts_and_empty_subset_is_503() -> None:
    out = await _run(_director(), [_hdrs(POST, subset="10.0.0.3"), _body(CHAT, True)])
    assert _dest_md(out[0]) == "10.0.0.3:8000"
    out = await _run(_director(), [_hdrs(POST, subset=["10.0.0.2:8000", "10.0.0.3:9999"]), _body(CHAT, True)])
    assert _dest_md(out[0]) == "10.0.0.2:8000"
    out = await _run(_director(), [_hdrs(POST, subset=[]), _body(CHAT, True)])
    assert out[0].immediate_response.status.code == 503
    out = await _run(_director(), [_hdrs(POST, subset="10.9.9.9"), _body(CHAT, True)])
    assert out[0].immediate_response.status.code == 503


async def test_streaming_response_passes_through_restored_and_releases_inflight() -> None:
    d = _director()
    d.datastore.rewrites = (RewriteRule("r", ("m",), (RewriteTarget("target", 1),)),)
    ev1 = b'data: {"model":"target","choices":[{"delta":{"content":"a"}}]}\n\n'
    ev2 = b'data: {"model":"target","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":1}}\n\n'
    ep = d.datastore.get("10.0.0.1:8000")
    assert ep is not None
    msgs = [_hdrs(POST), _body(CHAT, True),
            _resp_headers({":status": "200", "content-type": "text/event-stream"}, served="10.0.0.1:8000"),
            _resp_body(ev1, False), _resp_body(ev2 + b"data: [DONE]\n\n", False), _resp_body(b"", True)]
    out = await _run(d, msgs)
    kinds = [r.WhichOneof("response") for r in out]
    assert kinds == ["request_headers", "request_body", "response_headers", "response_body", "response_body",
                     "response_body"]
    passed = b"".join(r.response_body.response.body_mutation.streamed_response.body for r in out[3:])
    assert b'"model":"m"' in passed and b"target" not in passed
    assert out[-1].response_body.response.body_mutation.streamed_response.end_of_stream
    assert ep.inflight == 0 and ep.inflight_tokens == 0
    assert d.metrics is not None
    served = d.metrics.served_endpoint_total.labels("10.0.0.1:8000", "true")._value.get()
    assert served == 1


async def test_inflight_is_held_during_the_response_and_released_on_stream_reset() -> None:
    d = _director(2)
    seen: list[int] = []

    async def it() -> AsyncIterator[pb.ProcessingRequest]:
        yield _hdrs(POST)
        yield _body(CHAT, True)
        seen.append(sum(e.inflight for e in d.datastore.endpoints()))
        raise ConnectionResetError("envoy went away")  # the HTTP stream was reset mid-response

    servicer = ExtProcServicer(d)
    with pytest.raises(ConnectionResetError):
        async for _ in servicer.Process(it(), None):  # type: ignore[arg-type]
            pass
    assert seen == [1]
    assert all(e.inflight == 0 for e in d.datastore.endpoints())


async def test_second_request_avoids_the_endpoint_with_one_in_flight() -> None:
    d = _director(2)
    first = await _run(d, [_hdrs(POST), _body(CHAT, True)])  # stream ends → released
    assert _dest_md(first[0]) == "10.0.0.1:8000"
    ep1 = d.datastore.get("10.0.0.1:8000")
    assert ep1 is not None
    ep1.inflight = 1  # as if a response were still streaming
    second = await _run(d, [_hdrs(POST), _body(CHAT, True)])
    assert _dest_md(second[0]) == "10.0.0.2:8000"


async def test_stale_endpoint_gets_no_traffic_while_a_fresh_one_exists() -> None:
    import time

    d = _director(2)
    now = time.monotonic()
    fresh = d.datastore.get("10.0.0.2:8000")
    stale = d.datastore.get("10.0.0.1:8000")
    assert fresh is not None and stale is not None
    fresh.metrics.updated_at = now
    stale.metrics.updated_at = now - 10  # older than the 2 s threshold
    for _ in range(5):
        out = await _run(d, [_hdrs(POST), _body(CHAT, True)])
        assert _dest_md(out[0]) == "10.0.0.2:8000"
    fresh.metrics.updated_at = now - 10  # every endpoint stale: fail open, still routed
    out = await _run(d, [_hdrs(POST), _body(CHAT, True)])
    assert _dest_md(out[0]) in ("10.0.0.1:8000", "10.0.0.2:8000")


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(st.binary(max_size=300), _json_values.map(orjson.dumps),
                   st.just(b'{"model":"m","prompt":"x","max_tokens":100000000000000000000000000000}'),
                   st.dictionaries(st.sampled_from(["model", "prompt", "messages", "max_tokens", "stream"]),
                                   _json_values, max_size=5).map(orjson.dumps)),
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/x", ""]),
    mode=st.sampled_from([Mode.FULL_DUPLEX_STREAMED, Mode.BUFFERED]),
    split=st.integers(0, 300),
)
async def test_any_body_gets_a_pick_or_a_json_error_and_never_breaks_the_stream(
        body: bytes, path: str, mode: int, split: int) -> None:
    d = _director()
    # FULL_DUPLEX streams the body in chunks; BUFFERED sends it whole, in one message (Envoy's
    # sequences: a second body message in BUFFERED mode is a protocol violation, tested apart)
    chunks = [_body(body[:split], False), _body(body[split:], True)] if mode == Mode.FULL_DUPLEX_STREAMED \
        else [_body(body, True)]
    out = await _run(d, [_hdrs({**POST, ":path": path}, mode=mode), *chunks])
    kinds = [r.WhichOneof("response") for r in out]
    if "immediate_response" in kinds:
        ir = out[kinds.index("immediate_response")].immediate_response
        assert ir.status.code in (400, 429, 503)
        assert "error" in orjson.loads(ir.body)
    else:
        routed = out[0] if mode == Mode.FULL_DUPLEX_STREAMED else out[1]
        assert _dest_md(routed).startswith("10.0.0.")
    assert all(e.inflight == 0 for e in d.datastore.endpoints())  # nothing leaked
