"""The scraper's HTTP/1.1 client against raw servers on 127.0.0.1: every framing a metrics
endpoint may use, connection reuse, and failures that must not hang or leak."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from epp.datalayer.scrape_http import Connection, HttpError, Target

PAGE = b'vllm:num_requests_waiting{engine="0"} 3\n'


class RawServer:
    """Answers each request with ``respond(n)`` (n = requests so far on that connection);
    counts connections."""

    def __init__(self, respond: Callable[[int], bytes], close_after: bool = False) -> None:
        self.respond = respond
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                writer.write(self.respond(n))
                n += 1
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


@pytest.fixture
async def conn_to() -> AsyncIterator[Callable[[RawServer], Connection]]:
    made: list[Connection] = []

    def make(server: RawServer) -> Connection:
        c = Connection(Target.from_url(f"http://127.0.0.1:{server.port}/metrics"))
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def _length(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body


async def test_content_length_and_one_connection_for_many_scrapes(
        conn_to: Callable[[RawServer], Connection]) -> None:
    async with RawServer(lambda n: _length(PAGE + b"# scrape %d\n" % n)) as srv:
        c = conn_to(srv)
        for i in range(5):
            status, body = await asyncio.wait_for(c.get(), 5)
            assert (status, body) == (200, PAGE + b"# scrape %d\n" % i)
        assert srv.connections == 1
        head = srv.requests[0]
        assert head.startswith(b"GET /metrics HTTP/1.1\r\n")
        assert b"Host: 127.0.0.1:" in head


async def test_chunked_body_with_extensions_and_trailers(conn_to: Callable[[RawServer], Connection]) -> None:
    chunked = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nvllm:\r\n" + b"%x\r\n" % (len(PAGE) - 5) + PAGE[5:] + b"\r\n0\r\nx-trailer: y\r\n\r\n")
    async with RawServer(lambda n: chunked) as srv:
        c = conn_to(srv)
        assert await asyncio.wait_for(c.get(), 5) == (200, PAGE)
        assert await asyncio.wait_for(c.get(), 5) == (200, PAGE)  # framing left the connection usable
        assert srv.connections == 1


async def test_body_to_end_of_connection_and_connection_close(conn_to: Callable[[RawServer], Connection]) -> None:
    async with RawServer(lambda n: b"HTTP/1.0 200 OK\r\n\r\n" + PAGE, close_after=True) as srv:
        c = conn_to(srv)
        assert await asyncio.wait_for(c.get(), 5) == (200, PAGE)
        assert await asyncio.wait_for(c.get(), 5) == (200, PAGE)
        assert srv.connections == 2  # reconnected after the server closed
    async with RawServer(lambda n: _length(PAGE, b"connection: close\r\n"), close_after=True) as srv:
        c = conn_to(srv)
        for _ in range(2):
            assert await asyncio.wait_for(c.get(), 5) == (200, PAGE)
        assert srv.connections == 2


async def test_status_is_returned_and_garbage_is_an_error(conn_to: Callable[[RawServer], Connection]) -> None:
    async with RawServer(lambda n: b"HTTP/1.1 302 Found\r\nlocation: /x\r\ncontent-length: 0\r\n\r\n") as srv:
        assert (await asyncio.wait_for(conn_to(srv).get(), 5))[0] == 302
    async with RawServer(lambda n: b"SSH-2.0-OpenSSH\r\n\r\n") as srv:
        with pytest.raises(HttpError):
            await asyncio.wait_for(conn_to(srv).get(), 5)
    async with RawServer(lambda n: b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort", close_after=True) as srv:
        with pytest.raises(HttpError, match="closed"):
            await asyncio.wait_for(conn_to(srv).get(), 5)


async def test_refused_connection_raises_oserror() -> None:
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    with pytest.raises(OSError):
        await asyncio.wait_for(Connection(Target.from_url(f"http://127.0.0.1:{port}/metrics")).get(), 5)


def test_target_from_url() -> None:
    t = Target.from_url("https://[::1]:8443/m?x=1")
    assert (t.host, t.port, t.tls) == ("::1", 8443, True)
    assert t.request.startswith(b"GET /m?x=1 HTTP/1.1\r\nHost: [::1]:8443\r\n")
    assert Target.from_url("http://pod/metrics").port == 80
    with pytest.raises(ValueError):
        Target.from_url("ftp://pod/metrics")
