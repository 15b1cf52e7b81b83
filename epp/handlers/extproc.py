"""The ext_proc stream state machine (protocol only).

One gRPC ``Process`` stream per HTTP request. What we send depends on the body modes Envoy
announces in ``protocol_config`` on the first message (envoy_extproc.md §3):

* Response body NONE (``epp envoy-config``'s default, ``auto``): the picker sees the response
  headers and, when Envoy closes the stream, the response's end; it asks for one response's
  body (``mode_override`` on its response_headers answer: STREAMED for SSE, BUFFERED for
  JSON) only when ``Director.wants_response_body`` says so.
* FULL_DUPLEX_STREAMED (GIE's mode): answer nothing until the request body's end of stream,
  then the deferred ``request_headers`` answer carrying the pick (header + ``envoy.lb``
  metadata), then the body as ≤ 62,000-byte ``StreamedBodyResponse`` chunks. Response SSE
  chunks are passed through one for one (model name restored, usage read); a JSON response is
  buffered to its end so the model name and usage are read from the whole document.
* BUFFERED: an empty ``request_headers`` answer, then the pick on the single body answer (with
  ``content-length`` when the body changed).
* NONE / STREAMED request body, or a request with no body: route on the headers alone.

Trailers end a body in every mode: request trailers after DATA route the request with the
body received so far (FULL_DUPLEX: one ``CONTINUE_AND_REPLACE`` headers answer carrying the
pick and the body, see ``messages.routed_replace_response``; BUFFERED: the one body message
is the whole body whatever its ``end_of_stream``); response trailers flush a buffered JSON
body and a partial last SSE line (as chunks without ``end_of_stream``, then the trailers
answer).

One stream carries exactly one request, in order: request headers → request body →
request trailers → response headers → response body → response trailers (each optional as
the modes allow). Anything else (a second ``request_headers``, a body after
``end_of_stream``, a response before the request was routed, ...) is a ``ProtocolError``:
the stream ends with gRPC ``INVALID_ARGUMENT`` naming the violation, after releasing what
the request took. Only Envoy's own local replies (a response before routing) are tolerated.

Every request-path failure is a ``RequestError`` → ImmediateResponse (JSON body), and what
the request took is released at once. Messages that arrive after an ImmediateResponse are
ignored (Envoy may have them in flight). Whatever happened, the stream's request is
completed when the stream closes.
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
from epp.requestcontrol.conformance import SERVED_RESPONSE_HEADER
from epp.requestcontrol.director import DESTINATION_HEADER, Director, RequestContext, RoutingDecision
from epp.requestcontrol.tenants import ClaimsLocation

log = logging.getLogger(__name__)

_Mode = processing_mode_pb2.ProcessingMode
FULL_DUPLEX = _Mode.FULL_DUPLEX_STREAMED
BUFFERED = _Mode.BUFFERED
STREAMED = _Mode.STREAMED
NONE = _Mode.NONE

# Where a stream is on the request side and on the response side.
_IDLE = 0  # nothing yet
_BODY = 1  # headers seen, body (or trailers) may follow
_TRAILERS = 2  # body complete, only trailers may follow (BUFFERED without end_of_stream)
_DONE = 3  # ended


class ProtocolError(Exception):
    """A message the ext_proc protocol does not allow at this point of the stream."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


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


def _claims(msg: pb.ProcessingRequest, where: ClaimsLocation | None) -> Any:
    """The gateway-verified claims (e.g. jwt_authn's ``payload_in_metadata``) as the Struct
    itself: the tenant resolver reads the one or two claims it needs, nothing is converted."""
    if where is None:
        return None
    fm = msg.metadata_context.filter_metadata
    if where.namespace not in fm:
        return None
    payload = fm[where.namespace]
    if where.key is None:
        return payload
    fields = payload.fields
    if where.key not in fields:
        return None
    value = fields[where.key]
    return value.struct_value if value.WhichOneof("kind") == "struct_value" else None


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


def _routed(decision: RoutingDecision, mode: int, trailers: bool) -> list[pb.ProcessingResponse]:
    """The answers that carry a pick made on the whole body (``trailers``: they ended it)."""
    set_headers = {DESTINATION_HEADER: decision.destination, **decision.set_headers}
    out_body = decision.body if decision.body is not None else b""
    if decision.body_mutated:
        set_headers["content-length"] = str(len(out_body))
    if mode == BUFFERED:
        return [
            msgs.routed_buffered_body_response(
                decision.destination,
                set_headers,
                bytes(out_body) if decision.body_mutated else None,
                decision.remove_headers,
            )
        ]
    if trailers:
        return [msgs.routed_replace_response(decision.destination, set_headers, bytes(out_body),
                                             decision.remove_headers)]
    out = [msgs.routed_headers_response(decision.destination, set_headers, decision.remove_headers)]
    out.extend(msgs.streamed_body_responses(out_body, request=True))
    return out


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):
    """``envoy.service.ext_proc.v3.ExternalProcessor`` backed by a Director.

    ``require_tls``: the gRPC server also listens on the plaintext health port; with
    ``--secure-serving`` a stream that did not arrive over TLS is refused, so prompts never
    travel in clear to the picker.
    """

    def __init__(self, director: Director, require_tls: bool = False) -> None:
        self.director = director
        self.require_tls = require_tls

    def _violation(self, exc: ProtocolError) -> None:
        m = self.director.metrics
        if m is not None:
            m.extproc_protocol_errors.labels(exc.kind).inc()
        log.debug("ext_proc protocol violation: %s", exc)

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
        routed = False  # the pick went out: a response may come
        req = _IDLE
        resp = _IDLE
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
                if kind == "response_body":
                    if resp != _BODY or ctx is None:
                        raise ProtocolError(kind, "response body outside an open response")
                    rbody = msg.response_body
                    eos = rbody.end_of_stream
                    rw = ctx.rewriter
                    assert rw is not None  # set by director.response_headers
                    if resp_mode == FULL_DUPLEX:
                        if sse:
                            yield msgs.streamed_response_body(rw.sse_chunk(rbody.body, eos), eos)
                        else:
                            rw.json_chunk(rbody.body)
                            if eos:
                                for out in msgs.streamed_body_responses(rw.json_finish(), request=False):
                                    yield out
                    elif resp_mode == BUFFERED:
                        # The one body message is the whole body; without end_of_stream,
                        # trailers follow. Replace it only when it changed.
                        original = rbody.body
                        if sse:
                            new = rw.sse_chunk(original, True)
                        else:
                            rw.json_chunk(original)
                            new = rw.json_finish()
                        yield msgs.buffered_response_body(new if new != original else None)
                        if not eos:
                            resp = _TRAILERS
                    elif resp_mode == NONE:
                        raise ProtocolError(kind, "response body while the response body mode is NONE")
                    elif resp_mode == STREAMED:
                        # One answer per chunk, the chunk replaced only when it changed. No
                        # partial line is carried over: trailers may end the body, and their
                        # answer cannot carry body bytes. JSON passes unchanged (its usage is
                        # read at the end; the picker asks for JSON bodies BUFFERED).
                        original = rbody.body
                        if sse:
                            new = rw.sse_chunk(original, True)
                            yield msgs.EMPTY_RESPONSE_BODY if new == original else msgs.replaced_response_chunk(new)
                        else:
                            rw.json_chunk(original)
                            if eos:
                                rw.json_finish()
                            yield msgs.EMPTY_RESPONSE_BODY
                    else:
                        yield msgs.EMPTY_RESPONSE_BODY
                    if eos:
                        resp = _DONE
                        director.complete(ctx)
                elif kind == "request_body":
                    if req != _BODY or ctx is None:
                        raise ProtocolError(
                            kind, "request body before request headers" if req == _IDLE
                            else "request body after the request body ended"
                        )
                    rb = msg.request_body
                    if req_mode == FULL_DUPLEX or req_mode == BUFFERED:
                        body += rb.body
                        if len(body) > director.max_body_bytes:
                            answered = True
                            director.complete(ctx)
                            yield _error_response(
                                errors.too_large(f"request body exceeds the limit of {director.max_body_bytes} bytes")
                            )
                            continue
                        if req_mode == FULL_DUPLEX and not rb.end_of_stream:
                            continue
                        # FULL_DUPLEX end of body, or BUFFERED's one body message (whole body;
                        # without end_of_stream, trailers follow).
                        req = _DONE if rb.end_of_stream else _TRAILERS
                        try:
                            decision = await director.route(ctx, body)
                        except RequestError as exc:
                            answered = True
                            director.complete(ctx)
                            yield _error_response(exc)
                            continue
                        routed = True
                        body = bytearray()
                        for out in _routed(decision, req_mode, False):
                            yield out
                    elif req_mode == NONE:
                        raise ProtocolError(kind, "request body while the request body mode is NONE")
                    else:  # STREAMED / BUFFERED_PARTIAL: routed on the headers, pass chunks on
                        yield msgs.EMPTY_REQUEST_BODY
                        if rb.end_of_stream:
                            req = _DONE
                elif kind == "request_headers":
                    if req != _IDLE:
                        raise ProtocolError(kind, "a second request_headers on one stream (one request per stream)")
                    if msg.HasField("protocol_config"):
                        req_mode = msg.protocol_config.request_body_mode
                        resp_mode = msg.protocol_config.response_body_mode
                    ctx = director.new_context(_headers(msg.request_headers.headers), _subset_hint(msg),
                                               _claims(msg, director.tenants.claims_at))
                    eos = msg.request_headers.end_of_stream
                    req = _DONE if eos else _BODY
                    if eos or (req_mode != FULL_DUPLEX and req_mode != BUFFERED):
                        try:
                            decision = director.route_headers_only(ctx)
                        except RequestError as exc:
                            answered = True
                            director.complete(ctx)
                            yield _error_response(exc)
                            continue
                        routed = True
                        yield msgs.routed_headers_response(
                            decision.destination, {DESTINATION_HEADER: decision.destination}, decision.remove_headers
                        )
                    elif req_mode == BUFFERED:
                        yield msgs.EMPTY_REQUEST_HEADERS
                elif kind == "request_trailers":
                    if (req != _BODY and req != _TRAILERS) or ctx is None:
                        raise ProtocolError(kind, "request trailers outside an open request")
                    if req == _BODY and req_mode == FULL_DUPLEX:
                        # Trailers end the body: route on what came and hand Envoy the pick and
                        # the body in one answer (which also answers these trailers).
                        req = _DONE
                        try:
                            decision = await director.route(ctx, body)
                        except RequestError as exc:
                            answered = True
                            director.complete(ctx)
                            yield _error_response(exc)
                            continue
                        routed = True
                        body = bytearray()
                        for out in _routed(decision, req_mode, True):
                            yield out
                        continue
                    if req == _BODY and req_mode == BUFFERED:
                        # No body message came: the pick could only ride on a body answer.
                        answered = True
                        director.complete(ctx)
                        yield _error_response(errors.bad_request("request has trailers but no body"))
                        continue
                    req = _DONE
                    yield msgs.EMPTY_REQUEST_TRAILERS
                elif kind == "response_headers":
                    if ctx is None and req == _IDLE:
                        # Envoy's local reply to a request a filter before ext_proc stopped
                        # (jwt_authn's 401, ext_authz's 403): the picker never saw the request,
                        # it passes the reply on unchanged.
                        if msg.HasField("protocol_config"):
                            resp_mode = msg.protocol_config.response_body_mode
                        ctx = RequestContext(request_id="", headers={})
                    if resp != _IDLE or ctx is None:
                        raise ProtocolError(kind, "response headers before request headers" if ctx is None
                                            else "a second response_headers on one stream")
                    if not routed:
                        req = _DONE  # Envoy's own local reply: the request goes no further
                    rh = msg.response_headers
                    director.response_headers(ctx, _response_headers(rh.headers), _served(msg))
                    sse = ctx.response.streaming
                    served = director.conformance_served(ctx) if director.conformance_hooks else None
                    body_mode = None
                    if resp_mode == NONE and not rh.end_of_stream and director.wants_response_body(ctx):
                        # Envoy sends no response body unless asked: ask for this one's
                        resp_mode = body_mode = STREAMED if sse else BUFFERED
                    if served is None and body_mode is None:
                        yield msgs.EMPTY_RESPONSE_HEADERS
                    else:  # GIE conformance hooks: report what served
                        yield msgs.response_headers_response(
                            {} if served is None else {SERVED_RESPONSE_HEADER: served}, body_mode)
                    if rh.end_of_stream:
                        resp = _DONE
                        director.complete(ctx)
                    else:
                        resp = _BODY
                elif kind == "response_trailers":
                    if (resp != _BODY and resp != _TRAILERS) or ctx is None:
                        raise ProtocolError(kind, "response trailers outside an open response")
                    if resp == _BODY and resp_mode == FULL_DUPLEX:
                        # Trailers end the body: flush what the picker held back.
                        rw = ctx.rewriter
                        assert rw is not None
                        tail = rw.sse_flush() if sse else rw.json_finish()
                        for out in msgs.streamed_body_responses(tail, request=False, end_of_stream=False):
                            yield out
                    elif resp == _BODY and resp_mode == STREAMED and not sse:
                        rw = ctx.rewriter
                        assert rw is not None
                        rw.json_finish()  # usage of a JSON body ended by trailers
                    resp = _DONE
                    yield msgs.EMPTY_RESPONSE_TRAILERS
                    director.complete(ctx)
                else:
                    raise ProtocolError("none", "a ProcessingRequest without a request/response message")
        except ProtocolError as exc:
            if ctx is not None:
                director.complete(ctx)
            self._violation(exc)
            if context is None:  # called directly (tests): the caller sees the error
                raise
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"ext_proc protocol violation: {exc}")
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
