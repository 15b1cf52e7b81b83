"""Which response bodies the picker asks Envoy for when Envoy sends none by default (``epp
envoy-config``'s ``auto``: request body BUFFERED, response body NONE), and what it does with
them; in-process with real Envoy protobuf messages."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.datalayer.datastore import RewriteRule, RewriteTarget
from epp.requestcontrol.director import Director

from .test_extproc_stream import POST, _body, _director, _hdrs, _resp_body, _resp_headers, _run

Mode = processing_mode_pb2.ProcessingMode
SSE = {":status": "200", "content-type": "text/event-stream"}
JSON = {":status": "200", "content-type": "application/json"}


def _auto(mode: str = "auto", **kw: Any) -> Director:
    return _director(response_processing=mode, **kw)


def _first(director: Director, body: dict[str, Any]) -> list[pb.ProcessingRequest]:
    """A BUFFERED request (headers, then the whole body) with Envoy sending no response body."""
    first = _hdrs(POST, mode=Mode.BUFFERED)
    first.protocol_config.response_body_mode = Mode.NONE
    return [first, _body(orjson.dumps(body), True)]


def _asked(out: list[pb.ProcessingResponse]) -> int | None:
    """The response body mode the picker asked for on its response_headers answer."""
    for r in out:
        if r.WhichOneof("response") == "response_headers":
            return r.mode_override.response_body_mode if r.HasField("mode_override") else None
    raise AssertionError("no response_headers answer")


CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def test_a_stream_without_usage_or_rewrite_is_not_asked_for_and_ends_with_the_stream() -> None:
    d = _auto()
    out = await _run(d, [*_first(d, {**CHAT, "stream": True}), _resp_headers(SSE)])
    assert _asked(out) is None
    # the stream closed (iterator ended) with no body: the request is complete, in-flight back
    assert sum(e.inflight for e in d.datastore.endpoints()) == 0


async def test_usage_in_a_stream_or_a_json_answer_asks_for_the_body() -> None:
    d = _auto()
    stream = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    usage = b'data: {"model":"m","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n'
    out = await _run(d, [*_first(d, stream), _resp_headers(SSE), _resp_body(b'data: {"model":"m"}\n\n', False),
                         _resp_body(usage + b"data: [DONE]\n\n", True)])
    assert _asked(out) == Mode.STREAMED
    # chunks pass unchanged: empty answers (no body mutation) for each
    bodies = [r for r in out if r.WhichOneof("response") == "response_body"]
    assert len(bodies) == 2 and not any(r.response_body.response.HasField("body_mutation") for r in bodies)
    d2 = _auto()
    out = await _run(d2, [*_first(d2, CHAT), _resp_headers(JSON)])
    assert _asked(out) == Mode.BUFFERED


async def test_a_rewritten_model_is_restored_chunk_by_chunk() -> None:
    d = _auto()
    d.datastore.rewrites = (RewriteRule("r", ("m",), (RewriteTarget("base", 1),)),)
    out = await _run(d, [*_first(d, {**CHAT, "stream": True}), _resp_headers(SSE),
                         _resp_body(b'data: {"model":"base","x":1}\n\n', False),
                         _resp_body(b'data: {"model":"base","x":2}\n\ndata: [DONE]\n\n', True)])
    assert _asked(out) == Mode.STREAMED
    bodies = [r.response_body.response.body_mutation.body for r in out if r.WhichOneof("response") == "response_body"]
    assert bodies == [b'data: {"model":"m","x":1}\n\n', b'data: {"model":"m","x":2}\n\ndata: [DONE]\n\n']


@pytest.mark.parametrize(("mode", "asked"), [("none", None), ("full", Mode.STREAMED)])
async def test_none_and_full(mode: str, asked: int | None) -> None:
    d = _auto(mode)
    out = await _run(d, [*_first(d, {**CHAT, "stream": True}), _resp_headers(SSE)])
    assert _asked(out) == asked


async def test_an_error_answer_is_not_asked_for() -> None:
    d = _auto("full")
    out = await _run(d, [*_first(d, CHAT), _resp_headers({":status": "500", "content-type": "application/json"})])
    assert _asked(out) is None
