"""Builders for the ext_proc ``ProcessingResponse`` messages the picker sends.

Kept apart from the stream state machine so each message shape is written (and tested)
once. Types come from ``xds-protos`` (C-backed protobuf: ~1 µs to build or parse a message,
vs ~200 µs for a pure-Python binding).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

# GIE BodyByteLimit: body mutations are re-emitted in chunks of at most this size.
BODY_CHUNK_LIMIT = 62_000
DESTINATION_NAMESPACE = "envoy.lb"
DESTINATION_KEY = "x-gateway-destination-endpoint"
SERVED_KEY = "x-gateway-destination-endpoint-served"

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

EMPTY_REQUEST_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
EMPTY_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
EMPTY_REQUEST_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
EMPTY_RESPONSE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
EMPTY_REQUEST_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
EMPTY_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE
    )


def destination_metadata(destination: str) -> struct_pb2.Struct:
    """``{"envoy.lb": {"x-gateway-destination-endpoint": destination}}``."""
    md = struct_pb2.Struct()
    md.fields[DESTINATION_NAMESPACE].struct_value.fields[DESTINATION_KEY].string_value = destination
    return md


def header_mutation(set_headers: Mapping[str, str], remove: tuple[str, ...] = ()) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[_header(k, v) for k, v in set_headers.items()], remove_headers=list(remove)
    )


def routed_headers_response(
    destination: str, set_headers: Mapping[str, str], remove: tuple[str, ...] = ()
) -> pb.ProcessingResponse:
    """The (deferred) request_headers answer carrying the pick as header AND metadata."""
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(
                header_mutation=header_mutation(set_headers, remove), clear_route_cache=True
            )
        ),
        dynamic_metadata=destination_metadata(destination),
    )


def response_headers_response(set_headers: Mapping[str, str], body_mode: int | None = None) -> pb.ProcessingResponse:
    """A response_headers answer that sets headers on the client's response and, with
    ``body_mode`` (``ProcessingMode.STREAMED`` / ``BUFFERED``), asks Envoy for this response's
    body (``mode_override``: honoured with ``allow_mode_override`` outside FULL_DUPLEX)."""
    if not set_headers and body_mode is not None:
        return ASK_RESPONSE_BODY[body_mode]
    out = pb.ProcessingResponse(
        response_headers=pb.HeadersResponse(response=pb.CommonResponse(header_mutation=header_mutation(set_headers)))
    )
    if body_mode is not None:
        out.mode_override.CopyFrom(_body_mode(body_mode))
    return out


def _body_mode(body_mode: int) -> processing_mode_pb2.ProcessingMode:
    m = processing_mode_pb2.ProcessingMode
    # the rest of the stream: this response's body in ``body_mode``, its trailers (an end)
    return m(response_header_mode=m.SEND, response_body_mode=body_mode, response_trailer_mode=m.SEND)


#: response_headers answers that only ask for the body, per body mode
ASK_RESPONSE_BODY = {
    mode: pb.ProcessingResponse(response_headers=pb.HeadersResponse(), mode_override=_body_mode(mode))
    for mode in (processing_mode_pb2.ProcessingMode.STREAMED, processing_mode_pb2.ProcessingMode.BUFFERED)
}


def replaced_response_chunk(body: bytes) -> pb.ProcessingResponse:
    """STREAMED response body: this chunk's bytes replaced (a model name restored)."""
    return pb.ProcessingResponse(
        response_body=pb.BodyResponse(response=pb.CommonResponse(body_mutation=pb.BodyMutation(body=body)))
    )


def routed_replace_response(
    destination: str, set_headers: Mapping[str, str], body: bytes, remove: tuple[str, ...] = ()
) -> pb.ProcessingResponse:
    """FULL_DUPLEX request whose body was ended by trailers: the pick and the whole body in
    one ``CONTINUE_AND_REPLACE`` headers answer. Envoy 1.40 forwards body chunks injected
    before the trailers answer twice (the upstream got the body doubled), while a replaced
    body goes out once, followed by the trailers; the request side then needs no more answers
    (Envoy stops processing it, the pending trailers message included)."""
    resp = routed_headers_response(destination, set_headers, remove)
    common = resp.request_headers.response
    common.status = pb.CommonResponse.CONTINUE_AND_REPLACE
    common.body_mutation.body = body
    return resp


def routed_buffered_body_response(
    destination: str, set_headers: Mapping[str, str], body: bytes | None, remove: tuple[str, ...] = ()
) -> pb.ProcessingResponse:
    """BUFFERED mode: the pick rides on the body response (the router has not run yet)."""
    common = pb.CommonResponse(header_mutation=header_mutation(set_headers, remove), clear_route_cache=True)
    if body is not None:
        common.body_mutation.body = body
    return pb.ProcessingResponse(
        request_body=pb.BodyResponse(response=common), dynamic_metadata=destination_metadata(destination)
    )


def streamed_body_responses(
    body: bytes | bytearray | memoryview, *, request: bool, end_of_stream: bool = True
) -> Iterator[pb.ProcessingResponse]:
    """FULL_DUPLEX_STREAMED: the body as ``StreamedBodyResponse`` chunks (≤ 62,000 bytes),
    ``end_of_stream`` on the last. An empty body is one empty end-of-stream chunk.

    ``end_of_stream=False`` when trailers follow (they end the stream, and Envoy expects the
    trailers answer after body chunks that did not end it); an empty body is then no chunk.
    """
    view = memoryview(body)
    n = len(view)
    if n == 0 and not end_of_stream:
        return
    start = 0
    while True:
        end = min(start + BODY_CHUNK_LIMIT, n)
        chunk = pb.StreamedBodyResponse(body=bytes(view[start:end]), end_of_stream=end_of_stream and end >= n)
        common = pb.CommonResponse(body_mutation=pb.BodyMutation(streamed_response=chunk))
        if request:
            yield pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))
        else:
            yield pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))
        start = end
        if start >= n:
            return


def streamed_response_body(chunk: bytes, end_of_stream: bool) -> pb.ProcessingResponse:
    """One response-body chunk passed through in FULL_DUPLEX_STREAMED mode."""
    return pb.ProcessingResponse(
        response_body=pb.BodyResponse(
            response=pb.CommonResponse(
                body_mutation=pb.BodyMutation(
                    streamed_response=pb.StreamedBodyResponse(body=chunk, end_of_stream=end_of_stream)
                )
            )
        )
    )


def buffered_response_body(body: bytes | None) -> pb.ProcessingResponse:
    """BUFFERED response body: replace only when it changed."""
    if body is None:
        return EMPTY_RESPONSE_BODY
    return pb.ProcessingResponse(
        response_body=pb.BodyResponse(
            response=pb.CommonResponse(
                header_mutation=header_mutation({"content-length": str(len(body))}),
                body_mutation=pb.BodyMutation(body=body),
            )
        )
    )


def immediate_response(status: int, body: bytes, details: str) -> pb.ProcessingResponse:
    """Answer the client directly (errors): JSON body, the status, and a details string that
    Envoy logs as %RESPONSE_CODE_DETAILS%."""
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=header_mutation({"content-type": "application/json"}),
            body=body,
            details=details,
        )
    )
