"""Clients for what ordinary HTTP libraries will not send: HTTP/2 request trailers (``h2``
over a plain socket, prior knowledge) and raw HTTP/1.0. Blocking, bounded by a deadline on
every socket operation; call them through ``asyncio.to_thread`` from async tests."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events

from epp.local.topology import HOST


@dataclass(slots=True)
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def h2_request(port: int, method: str, path: str, headers: dict[str, str], body: bytes,
               trailers: dict[str, str] | None, timeout: float = 30.0, chunk: int = 1000) -> Reply:
    """One HTTP/2 request: HEADERS, the body as DATA frames of ``chunk`` bytes (none with
    END_STREAM when there are trailers), then the trailers HEADERS with END_STREAM."""
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((HOST, port), timeout=timeout)
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        req = [(":method", method), (":path", path), (":scheme", "http"), (":authority", f"{HOST}:{port}"),
               *headers.items()]
        conn.send_headers(sid, req, end_stream=not body and not trailers)
        for i in range(0, len(body), chunk):
            last = i + chunk >= len(body)
            conn.send_data(sid, body[i : i + chunk], end_stream=last and not trailers)
        if trailers:
            conn.send_headers(sid, list(trailers.items()), end_stream=True)
        sock.sendall(conn.data_to_send())
        reply = Reply(0)
        data = bytearray()
        while True:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            raw = sock.recv(65536)
            if not raw:
                raise ConnectionError(f"connection closed before the response ended (status {reply.status})")
            for ev in conn.receive_data(raw):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    reply.headers = {str(k): str(v) for k, v in ev.headers}
                    reply.status = int(reply.headers[":status"])
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    reply.body = bytes(data)
                    return reply
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    raise ConnectionError(f"stream reset by the server (error {ev.error_code})")
            pending = conn.data_to_send()
            if pending:
                sock.sendall(pending)
    finally:
        sock.close()


def http10_request(port: int, method: str, path: str, headers: dict[str, str], body: bytes = b"",
                   timeout: float = 30.0) -> tuple[str, Reply]:
    """One HTTP/1.0 request on a fresh connection, read until the server closes it.
    Returns the status line and the reply."""
    lines = [f"{method} {path} HTTP/1.0", *(f"{k}: {v}" for k, v in headers.items())]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    deadline = time.monotonic() + timeout
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(raw)
        buf = bytearray()
        while True:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            got = sock.recv(65536)
            if not got:
                break
            buf += got
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    if not head:
        return "", Reply(0)
    status_line, *hdr_lines = head.decode("latin-1").split("\r\n")
    hdrs = {}
    for line in hdr_lines:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return status_line, Reply(int(status_line.split()[1]), hdrs, rest)
