"""Property: no sequence of ext_proc messages can break the picker or leak a count.

Hypothesis generates streams (plausible prefixes with random tails, and plain random
sequences): request/response headers, bodies and trailers, with and without end_of_stream,
in any order, in every body mode, with valid, invalid, deep, oversized and binary bodies. Each
is sent over a real gRPC stream to an in-process ``epp serve`` (flow control on). After each:

* the stream ended OK, or as a protocol violation (INVALID_ARGUMENT naming it, counted in
  ``epp_extproc_protocol_errors_total``), never with another error; no answer was a 500
  (internal error) and every error answer is a JSON body;
* the picker logged no error (no traceback);
* every in-flight count and gauge is back to zero (none ever below zero);
* a normal request is still routed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .grpc_picker import IDLE, Picker, picker
from .test_extproc_stream import CHAT, POST, Mode, _body, _dest_md, _hdrs, _resp_body, _resp_headers

CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- {type: queue-scorer}
- {type: prefix-cache-scorer}
- {type: concurrency-detector, parameters: {maxConcurrency: 4}}
- {type: max-score-picker, parameters: {maxNumOfEndpoints: 2}}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}, {pluginRef: prefix-cache-scorer}, {pluginRef: max-score-picker}]
saturationDetector: {pluginRef: concurrency-detector}
flowControl: {defaultRequestTTL: 2s}
"""
MAX_BODY = 2048
ENDPOINTS = "127.0.0.1:1,127.0.0.1:2"
JSON_OK = {":status": "200", "content-type": "application/json"}
NORMAL = [_hdrs(POST), _body(CHAT, True), _resp_headers(JSON_OK), _resp_body(b'{"model":"m"}', True)]

_modes = st.sampled_from([Mode.FULL_DUPLEX_STREAMED, Mode.BUFFERED, Mode.NONE, Mode.STREAMED,
                          Mode.BUFFERED_PARTIAL])
_request_bodies = st.one_of(
    st.sampled_from([
        CHAT,
        orjson.dumps({"model": "unknown-model", "prompt": "p", "max_tokens": 3}),
        b'{"model":"m","messages":' + b"[" * 400 + b"]" * 400 + b"}",
        b'{"model":"m","x":' + b"[" * 1100 + b"]" * 1100 + b"}",
        b"{oops",
        b"",
        b'{"model":"m","prompt":"' + b"x" * (MAX_BODY + 10) + b'"}',
    ]),
    st.binary(max_size=64),
)
_response_bodies = st.one_of(
    st.sampled_from([
        b'{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":2}}',
        b'data: {"model":"m","choices":[]}\n\ndata: {"usage":{"prompt_tokens":1}}',
        b"data: [DONE]\n\n",
        b"",
    ]),
    st.binary(max_size=64),
)
_request_headers = st.sampled_from([
    POST,
    {**POST, ":path": "/v1/completions", "x-gateway-inference-objective": "batch"},
    {**POST, "x-gateway-model-name-rewrite": "other-model"},
    {":method": "GET", ":path": "/v1/models"},
])


@st.composite
def _message(draw: Any) -> pb.ProcessingRequest:
    kind = draw(st.sampled_from(["request_headers", "request_body", "request_trailers", "response_headers",
                                 "response_body", "response_trailers", "none"]))
    eos = draw(st.booleans())
    if kind == "request_headers":
        subset = draw(st.sampled_from([None, None, "127.0.0.1", "10.9.9.9", []]))
        return _hdrs(draw(_request_headers), eos=eos, mode=draw(_modes), subset=subset)
    if kind == "request_body":
        return _body(draw(_request_bodies), eos)
    if kind == "response_headers":
        status = draw(st.sampled_from(["200", "404", "500", "x"]))
        ctype = draw(st.sampled_from(["application/json", "text/event-stream"]))
        served = draw(st.sampled_from([None, "127.0.0.1:1", "10.9.9.9:80"]))
        return _resp_headers({":status": status, "content-type": ctype}, served=served, eos=eos)
    if kind == "response_body":
        return _resp_body(draw(_response_bodies), eos)
    if kind == "request_trailers":
        return pb.ProcessingRequest(request_trailers=pb.HttpTrailers(
            trailers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key="x-t", raw_value=b"1")])))
    if kind == "response_trailers":
        return pb.ProcessingRequest(response_trailers=pb.HttpTrailers())
    return pb.ProcessingRequest()


@st.composite
def _plausible(draw: Any) -> list[pb.ProcessingRequest]:
    """Headers, body chunks, trailers, response: each part present or not, in order."""
    mode = draw(_modes)
    out = [_hdrs(draw(_request_headers), eos=draw(st.booleans()), mode=mode)]
    body = draw(_request_bodies)
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    end_with_trailers = draw(st.booleans())
    for i, piece in enumerate(pieces):
        out.append(_body(piece, i == len(pieces) - 1 and not end_with_trailers))
    if end_with_trailers:
        out.append(pb.ProcessingRequest(request_trailers=pb.HttpTrailers()))
    if draw(st.booleans()):
        ctype = draw(st.sampled_from(["application/json", "text/event-stream"]))
        out.append(_resp_headers({":status": "200", "content-type": ctype}, served="127.0.0.1:1"))
        for chunk in draw(st.lists(_response_bodies, max_size=3)):
            out.append(_resp_body(chunk, False))
        if draw(st.booleans()):
            out.append(pb.ProcessingRequest(response_trailers=pb.HttpTrailers()))
        else:
            out.append(_resp_body(b"", True))
    return out


_sequences = st.one_of(
    st.tuples(_plausible(), st.lists(_message(), max_size=3)).map(lambda t: t[0] + t[1]),
    st.lists(_message(), min_size=1, max_size=8),
)


@pytest.fixture(scope="module")
def live() -> Iterator[Picker]:
    with picker(ENDPOINTS, CONFIG, max_request_body_bytes=MAX_BODY) as p:
        yield p


def _check_answers(responses: list[pb.ProcessingResponse]) -> None:
    for r in responses:
        if r.WhichOneof("response") == "immediate_response":
            ir = r.immediate_response
            assert ir.status.code in (400, 413, 429, 503), ir
            assert orjson.loads(ir.body)["error"]["code"] == ir.status.code


@pytest.mark.slow  # ~10 s: 250 sequences, each followed by a normal request
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")  # the picker's own RNG
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequence=_sequences)
def test_any_message_sequence_leaves_the_picker_whole(live: Picker, sequence: list[pb.ProcessingRequest]) -> None:
    before = live.violations()
    res = live.stream(sequence, timeout=10)
    violated = live.violations() - before
    if res.code == grpc.StatusCode.OK:
        assert violated == 0
    elif res.code == grpc.StatusCode.INVALID_ARGUMENT:
        assert violated == 1 and "protocol violation" in res.details, res
    else:
        # The picker ended the stream (a violation) while this client was still writing: grpc.aio
        # then reports its own failed write as INTERNAL instead of the picker's status.
        assert (res.code, res.details, violated) == (grpc.StatusCode.INTERNAL, "Internal error from Core", 1), res
    _check_answers(res.responses)
    assert not live.errors.records, [r.getMessage() for r in live.errors.records]
    assert live.gauges() == IDLE

    normal = live.stream(NORMAL, timeout=10)
    assert normal.code == grpc.StatusCode.OK, normal
    kinds = [r.WhichOneof("response") for r in normal.responses]
    assert kinds == ["request_headers", "request_body", "response_headers", "response_body"], normal
    assert _dest_md(normal.responses[0]).split(",")[0] in ENDPOINTS.split(",")
    assert live.gauges() == IDLE
