"""The ext_proc stream state machine (protocol only).

One gRPC ``Process`` stream per HTTP request. What we send depends on the body modes Envoy
announces in ``protocol_config`` on the first message (envoy_extproc.md §3):

* FULL_DUPLEX_STREAMED (GIE's mode): answer nothing until the request body's end of stream,
  then the deferred ``request_headers`` answer carrying the pick (header + ``envoy.lb``
  metadata), then the body as ≤ 62,000-byte ``StreamedBodyResponse`` chunks. Response SSE
  chunks are passed through one for one (model name restored, usage read); a JSON response is
  buffered to its end so the model name and usage are read from the whole document.
* BUFFERED: an empty ``request_headers`` answer, then the pick on the single body answer (with
  ``content-length`` when the body changed).
* NONE / STREAMED request body, or a request with no body: route on the headers alone.

Every request-path failure is a ``RequestError`` → ImmediateResponse (JSON body). Chunks that
arrive after an ImmediateResponse are ignored. The in-flight count is released when the
response ends or, whatever happened, when the stream closes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from epp.framework import errors
from epp.framework.errors import RequestError
from epp.handlers import messages as msgs
from epp.requestcontrol.candidates import SUBSET_KEY, SUBSET_NAMESPACE
from epp.requestcontrol.director import DESTINATION_HEADER, Director, RequestContext

log = logging.getLogger(__name__)

_Mode = processing_mode_pb2.ProcessingMode
FULL_DUPLEX = _Mode.FULL_DUPLEX_STREAMED
BUFFERED = _Mode.BUFFERED
NONE = _Mode.NONE


def _headers(header_map: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in header_map.headers:
        raw = h.raw_value
        out[h.key] = raw.decode("utf-8", "replace") if raw else h.value
    return out


def _response_headers(header_map: Any) -> dict[str, str]:
    """Only what the response path reads (status, content type): cheaper than all of them."""
    out: dict[str, str] = {}
    for h in header_map.headers:
        key = h.key
        if key == ":status" or key == "content-type":
            raw = h.raw_value
            out[key] = raw.decode("utf-8", "replace") if raw else h.value
    return out


def _value(v: struct_pb2.Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "list_value":
        return [_value(x) for x in v.list_value.values]
    return None


def _subset_hint(msg: pb.ProcessingRequest) -> Any:
    fm = msg.metadata_context.filter_metadata
    if SUBSET_NAMESPACE not in fm:
        return None
    fields = fm[SUBSET_NAMESPACE].fields
    if SUBSET_KEY not in fields:
        return None
    value = _value(fields[SUBSET_KEY])
    return value if value is not None else []


def _served(msg: pb.ProcessingRequest) -> str | None:
    fm = msg.metadata_context.filter_metadata
    if msgs.DESTINATION_NAMESPACE not in fm:
        return None
    fields = fm[msgs.DESTINATION_NAMESPACE].fields
    if msgs.SERVED_KEY not in fields:
        return None
    return fields[msgs.SERVED_KEY].string_value or None


def _error_response(exc: RequestError) -> pb.ProcessingResponse:
    return msgs.immediate_response(exc.status, exc.body(), f"epp_{exc.code}")


def _over_tls(context: grpc.aio.ServicerContext) -> bool:
    return context.auth_context().get("transport_security_type") == [b"ssl"]


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):
    """``envoy.service.ext_proc.v3.ExternalProcessor`` backed by a Director.

    ``require_tls``: the gRPC server also listens on the plaintext health port; with
    ``--secure-serving`` a stream that did not arrive over TLS is refused, so prompts never
    travel in clear to the picker.
    """

    def __init__(self, director: Director, require_tls: bool = False) -> None:
        self.director = director
        self.require_tls = require_tls

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        if self.require_tls and context is not None and not _over_tls(context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "ext_proc is TLS-only (--secure-serving)")
        director = self.director
        ctx: RequestContext | None = None
        req_mode = FULL_DUPLEX
        resp_mode = FULL_DUPLEX
        body = bytearray()
        answered = False  # an ImmediateResponse ended the request
        sse = False
        processing = False  # False while awaiting the next message: errors there are the stream's
        messages = request_iterator.__aiter__()
        try:
            while True:
                processing = False
                try:
                    msg = await messages.__anext__()
                except StopAsyncIteration:
                    break
                if answered:
                    continue
                processing = True
                kind = msg.WhichOneof("request")
                if kind == "request_headers":
                    if msg.HasField("protocol_config"):
                        req_mode = msg.protocol_config.request_body_mode
                        resp_mode = msg.protocol_config.response_body_mode
                    ctx = director.new_context(_headers(msg.request_headers.headers), _subset_hint(msg))
                    if msg.request_headers.end_of_stream or req_mode not in (FULL_DUPLEX, BUFFERED):
                        try:
                            decision = director.route_headers_only(ctx)
                        except RequestError as exc:
                            answered = True
                            yield _error_response(exc)
                            continue
                        yield msgs.routed_headers_response(
                            decision.destination, {DESTINATION_HEADER: decision.destination}
                        )
                    elif req_mode == BUFFERED:
                        yield msgs.EMPTY_REQUEST_HEADERS
                elif kind == "request_body":
                    if ctx is None:
                        raise RequestError(errors.BAD_REQUEST, "request body before headers")
                    rb = msg.request_body
                    if req_mode not in (FULL_DUPLEX, BUFFERED):
                        if req_mode == _Mode.STREAMED:
                            yield msgs.EMPTY_REQUEST_BODY
                        continue
                    body += rb.body
                    if len(body) > director.max_body_bytes:
                        answered = True
                        yield _error_response(
                            errors.bad_request(
                                f"request body exceeds the limit of {director.max_body_bytes} bytes"
                            )
                        )
                        continue
                    if not rb.end_of_stream:
                        continue
                    try:
                        decision = await director.route(ctx, body)
                    except RequestError as exc:
                        answered = True
                        yield _error_response(exc)
                        continue
                    set_headers = {DESTINATION_HEADER: decision.destination, **decision.set_headers}
                    out_body = decision.body if decision.body is not None else b""
                    if decision.body_mutated:
                        set_headers["content-length"] = str(len(out_body))
                    if req_mode == BUFFERED:
                        yield msgs.routed_buffered_body_response(
                            decision.destination,
                            set_headers,
                            bytes(out_body) if decision.body_mutated else None,
                            decision.remove_headers,
                        )
                    else:
                        yield msgs.routed_headers_response(decision.destination, set_headers, decision.remove_headers)
                        for out in msgs.streamed_body_responses(out_body, request=True):
                            yield out
                    body = bytearray()
                elif kind == "request_trailers":
                    yield msgs.EMPTY_REQUEST_TRAILERS
                elif kind == "response_headers":
                    if ctx is None:
                        yield msgs.EMPTY_RESPONSE_HEADERS
                        continue
                    rh = msg.response_headers
                    hdrs = _response_headers(rh.headers)
                    director.response_headers(ctx, hdrs, _served(msg))
                    sse = ctx.response.streaming
                    yield msgs.EMPTY_RESPONSE_HEADERS
                    if rh.end_of_stream:
                        director.complete(ctx)
                elif kind == "response_body":
                    rbody = msg.response_body
                    if ctx is None or ctx.rewriter is None:
                        yield (
                            msgs.streamed_response_body(rbody.body, rbody.end_of_stream)
                            if resp_mode == FULL_DUPLEX
                            else msgs.EMPTY_RESPONSE_BODY
                        )
                        continue
                    rw = ctx.rewriter
                    if resp_mode == FULL_DUPLEX:
                        if sse:
                            yield msgs.streamed_response_body(
                                rw.sse_chunk(rbody.body, rbody.end_of_stream), rbody.end_of_stream
                            )
                        else:
                            rw.json_chunk(rbody.body)
                            if rbody.end_of_stream:
                                for out in msgs.streamed_body_responses(rw.json_finish(), request=False):
                                    yield out
                    elif resp_mode == BUFFERED:
                        rw.json_chunk(rbody.body)
                        if rbody.end_of_stream:
                            original = bytes(rbody.body)
                            new = rw.json_finish()
                            yield msgs.buffered_response_body(new if new != original else None)
                    else:
                        yield msgs.EMPTY_RESPONSE_BODY
                    if rbody.end_of_stream:
                        director.complete(ctx)
                elif kind == "response_trailers":
                    yield msgs.EMPTY_RESPONSE_TRAILERS
                    if ctx is not None:
                        director.complete(ctx)
        except RequestError as exc:
            yield _error_response(exc)
        except Exception:
            if not processing:
                raise  # the stream itself broke (client gone, Envoy reset): nothing to answer
            log.exception("ext_proc stream failed")
            if not answered:
                yield _error_response(RequestError(errors.INTERNAL, "internal picker error"))
        finally:
            if ctx is not None:
                director.complete(ctx)
